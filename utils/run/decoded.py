"""Images decoded once: a run that evaluates or learns on the same image files many times (greedy soup
evaluates the held-out split for every ingredient and candidate, MEHL-Soup+ takes 20 passes over it,
every ingredient's evaluation reads val and the shifts) decodes each file once and keeps it as uint8
at the model's input size.

What is kept. A data set of image files opts in by having `paths` (its files, in item order),
`labels`, `transform` and `image(i)` (item i decoded, before the transform): datasets/imagenet.py's
ImageFiles, used by ImageNet and ImageFolder. Its transform is split at its ToDtype (v2) or ToTensor
(v1) step when it is a torchvision Compose of known steps, nested Composes flattened (`stages`: RGB, to a
tensor, resize, centre crop; then ToDtype and Normalize, as utils/archs `image_transform` and
`clip_transform` build it; or torchvision v1's Resize, CenterCrop on the PIL image, then ToTensor and
Normalize, as timm's eval transforms are; the factory path's and timm's `pil_rgb_then` wrapper included).
The first part gives uint8 images of one shape: they are kept. The second is applied per batch, on the
device, to the kept uint8 images; it is elementwise, so a batch is bit for bit the transform's output
item by item (v1's ToTensor divides by 255 where v2 multiplies by 1/255: each is done as its step does),
and the accuracies are those without this module. A transform that cannot be split (an unknown step,
images of varying size) is not kept: its images are decoded in every pass, and the log says so once per set.

Where (--decode-cache, `configure`), chosen for the paper's job, a sequence of processes over ImageNet:
- a folder, the default ($MODEL_SOUPS_CACHE/decoded, else $XDG_CACHE_HOME/model_soups/decoded or
  ~/.cache/model_soups/decoded): one uint8 .npy file per set, memory-mapped. The operating system's page
  cache holds it, so the phases of a job (separate processes) and the ranks on one host share one copy,
  and it costs no private memory: under pressure its pages are dropped and read again from the file.
  ImageNet's 26 k held-out images at 224 px are 3.9 GB; val and the five shifts about 30 GB more. A set
  is written only when the file system keeps MARGIN_BYTES free after it.
- `memory`: uint8 arrays in the process, a set only when it fits in MEMORY_FRACTION of the available
  memory (divided among the ranks on one host); each rank keeps the items it reads (its share of an
  evaluation; every item for learning).
- `none`: decode in every pass.

The files follow utils/run/prefix.py's rules. A file is named by a hash of what its numbers depend on:
every file's path (its bytes: any name is accepted) and `identity.stamp` (inode, status-change time,
size and modification time: a file rewritten in place, even with its times set back, or another file
put in its place names another file), the border, the split's first part (its steps and
their settings), and the versions of torch, torchvision and Pillow. It is trusted only after checks:
a regular file beside a JSON header of bounded size holding its key, its shape and a CRC-32 of its
bytes; the .npy header says uint8 in C order of exactly that shape and the file's size matches; the
checksum matches; a few random items decoded afresh equal their rows. Anything else is a warning, and
the images are decoded again and the file replaced. It is written to a temporary file (space reserved
first, so a full disk fails cleanly) renamed into place, header last. A folder that cannot be written
costs a warning, and the set is kept in memory instead.

Under torchrun every rank calls in at the same point (an evaluation, a learning epoch). With a folder
that every rank sees (checked: rank 0 creates the temporary file and every rank looks for it), each rank
decodes its strided share (rank, rank + world, ...) into that one file; otherwise each rank decodes every
image into its own file (a warning says so)."""
import json
import logging
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as F1
from torchvision.transforms import v2
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from utils.archs import pil_rgb, to_rgb
from utils.files import identity
from utils.files.cache import cache_folder
from utils.files.state_dicts import atomic_write, drop_temporary, finish_temporary, remove_leftovers, temporary
from utils.runtime import distributed
from utils.runtime.memory import mem_available
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1                    # of the files on disk: a change of what they hold changes it
SPOT_CHECKS = 4               # items of a file decoded afresh and compared before it is used
MARGIN_BYTES = 2 * 2**30      # left free on the cache's file system
MEMORY_FRACTION = 0.5         # of the available memory, for `memory`
HEADER_LIMIT = 64 * 2**10     # bytes of a JSON header read at most
CHUNK = 64 * 2**20            # bytes per checksum update
DECODE_BATCH = 32             # images per batch while decoding
_STATE = {"where": "memory", "warned": set()}   # a Path, "memory" or None (none)


def default_folder():
    """The decoded images' default folder: `decoded` in the toolkit's cache (utils/files/cache.py)."""
    return cache_folder("decoded")


def configure(flag):
    """From --decode-cache: None (the default folder), a folder, 'memory' or 'none'."""
    if flag is not None and not flag.strip():
        raise UserError("--decode-cache: give a folder, 'memory', or 'none'")
    where = default_folder() if flag is None else {"none": None, "memory": "memory"}.get(flag.lower(), Path(flag))
    _STATE["where"], _STATE["warned"] = where, set()
    return where


def _once(what, level, message, *args):
    """Log `message` the first time `what` happens in this configuration (on the primary rank)."""
    if what not in _STATE["warned"]:
        _STATE["warned"].add(what)
        if distributed.is_primary():
            log.log(level, message, *args)


# ----------------------------------------------------------------------------- the transform
GEOMETRIC = (v2.ToImage, v2.RGB, v2.Resize, v2.CenterCrop)
GEOMETRIC_V1 = (v1.Resize, v1.CenterCrop)   # on PIL images (timm's eval transforms, most users')
RGB_LAMBDAS = (to_rgb, pil_rgb)             # utils/archs: grey to RGB; any image to PIL RGB
# torchvision v1's ToTensor, and timm's subclass that is ToTensor on a PIL image (its eval transform's step)
TO_TENSOR = ("torchvision.transforms.transforms.ToTensor", "timm.data.transforms.MaybeToTensor")


@dataclass(frozen=True)
class Stages:
    """A transform in two stages: the geometric one, whose uint8 output is kept, and the float one,
    applied per batch (`stages`)."""
    geometric: object         # image -> uint8 tensor (3, H, W): a v2.Compose, or a v1.Compose ending in
                              # pil_to_tensor
    floats: tuple             # steps on a batch of uint8 images: ToDtype or ToTensor, then Normalize
    shape: tuple              # (3, H, W) of every uint8 image
    description: str          # the geometric steps and their settings (part of a file's key)
    v1: bool = False          # the float steps are torchvision v1's (ToTensor divides by 255)

    def to_float(self, x):
        """The float steps on a batch, through the kernels the steps call (a step object on a plain
        tensor costs several times its kernel on the CPU); Normalize in place on the fresh float batch."""
        if self.v1:  # ToTensor: x.to(float32).div(255); v1's normalize: sub_(mean).div_(std), per channel
            x = _fresh_float(x).div_(255)
            for step in self.floats[1:]:
                x = F1.normalize(x, step.mean, step.std, inplace=True)
            return x
        x = _scaled(x) if x.device.type == "cpu" and _SCALED_IS_TO_DTYPE else F.to_dtype(x, torch.float32, scale=True)
        for step in self.floats[1:]:
            x = F.normalize(x, step.mean, step.std, inplace=True)
        return x


def _fresh_float(x):
    """x as float32 in fresh memory (numpy's on the CPU: huge pages, see `_scaled`)."""
    if x.device.type != "cpu":
        return x.to(torch.float32)
    return torch.from_numpy(np.empty(tuple(x.shape), dtype=np.float32)).copy_(x)


def _scaled(x):
    """ToDtype(float32, scale=True) of a uint8 batch (torchvision computes x.to(float32) * (1 / 255)) into
    memory numpy allocates: numpy asks the kernel for huge pages for large arrays, so a fresh batch costs a
    few page faults instead of one per 4 KiB (measured here: most of a kept pass's CPU time)."""
    return _fresh_float(x).mul_(1.0 / 255)


# Elementwise, so equal on every uint8 value means equal on every image; else the kernel is used.
_EVERY_VALUE = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
_SCALED_IS_TO_DTYPE = torch.equal(_scaled(_EVERY_VALUE), F.to_dtype(_EVERY_VALUE, torch.float32, scale=True))


def _describe(step):
    if isinstance(step, (v2.Lambda, v1.Lambda)):
        return step.lambd.__name__
    if isinstance(step, (v2.Resize, v1.Resize)):
        kind = "v1." if isinstance(step, v1.Resize) else ""  # PIL's resize: other pixels than the tensor's
        return f"{kind}Resize({step.size}, {step.interpolation}, {step.max_size}, {step.antialias})"
    if isinstance(step, (v2.CenterCrop, v1.CenterCrop)):
        return f"{'v1.' if isinstance(step, v1.CenterCrop) else ''}CenterCrop({step.size})"
    return type(step).__name__


def _steps(transform):
    """The steps of a transform, nested Composes (v1 or v2) flattened: the factory path and timm's wrap
    theirs in `pil_rgb_then` (utils/archs), a Compose around the user's or timm's own; None when a part
    is not a Compose."""
    if not isinstance(transform, (v2.Compose, v1.Compose)):
        return None
    out = []
    for step in transform.transforms:
        inner = _steps(step) if isinstance(step, (v2.Compose, v1.Compose)) else [step]
        if inner is None:
            return None
        out += inner
    return out


def _is_rgb_lambda(step):
    return isinstance(step, (v2.Lambda, v1.Lambda)) and any(step.lambd is f for f in RGB_LAMBDAS)


def _name(step):
    return f"{type(step).__module__}.{type(step).__qualname__}"


def stages(transform):
    """The transform as Stages, or None when it is not a Compose (v2 or v1, nested in any number of
    Composes) of known steps giving one image size (a final CenterCrop, or a Resize to (H, W)):
    - v2: to_rgb / pil_rgb, then ToImage, then to_rgb / RGB / Resize / CenterCrop, then
      ToDtype(float32, scale=True) and Normalize;
    - v1 (timm's eval transforms: Resize, CenterCrop, ToTensor, Normalize): to_rgb / pil_rgb / Resize /
      CenterCrop on the PIL image, then ToTensor (or timm's MaybeToTensor) and v1 Normalize.
    The image is RGB before the first step (the data sets' `image(i)`, datasets/images.py); a decoded
    image of another shape stops the decoding (`_decode_into`)."""
    steps = _steps(transform) or []
    cut = next((k for k, s in enumerate(steps) if isinstance(s, v2.ToDtype) or _name(s) in TO_TENSOR), None)
    if not steps or cut is None:
        return None
    geometric, floats = steps[:cut], steps[cut:]
    if isinstance(floats[0], v2.ToDtype):
        first = next((k for k, s in enumerate(geometric) if not _is_rgb_lambda(s)), len(geometric))
        known = first < len(geometric) and isinstance(geometric[first], v2.ToImage) and all(
            isinstance(s, GEOMETRIC) or _is_rgb_lambda(s) for s in geometric[first:])
        float_ok = floats[0].dtype in (torch.float32, {torch.Tensor: torch.float32}) and floats[0].scale \
            and all(type(s) is v2.Normalize for s in floats[1:])
        sized = [s for s in geometric if isinstance(s, (v2.Resize, v2.CenterCrop))]
        whole = v2.Compose(geometric)
    else:
        known = all(type(s) in GEOMETRIC_V1 or _is_rgb_lambda(s) for s in geometric)
        float_ok = all(type(s) is v1.Normalize for s in floats[1:])
        sized = [s for s in geometric if isinstance(s, (v1.Resize, v1.CenterCrop))]
        whole = v1.Compose([*geometric, F1.pil_to_tensor])
    if not (known and float_ok):
        return None
    size = list(sized[-1].size) if sized and isinstance(sized[-1].size, (list, tuple)) else None
    if size is None or len(size) not in (1, 2) or (isinstance(sized[-1], (v2.Resize, v1.Resize)) and len(size) != 2):
        return None  # images of varying shape cannot be kept in one array
    h, w = size if len(size) == 2 else size * 2
    return Stages(whole, tuple(floats), (3, h, w), " ".join(_describe(s) for s in geometric),
                 v1=not isinstance(floats[0], v2.ToDtype))


def _stages_of(dataset, desc):
    """The dataset's transform as Stages, or None (not image files, or a transform that cannot be split: said once)."""
    if not all(hasattr(dataset, a) for a in ("paths", "labels", "transform", "image")):
        return None
    staged = stages(dataset.transform)
    if staged is None:
        _once(("transform", id(dataset)), logging.INFO, "%s: images decoded in every pass: the transform is not "
              "a torchvision Compose of known steps giving one image size (utils/run/decoded.py)", desc)
    return staged


# ------------------------------------------------------------------------------ kept images
class Decoded(Dataset):
    """Items `rows` of a data set as (uint8 image, label), from `array` (uint8 (M, 3, H, W): every item
    of the set, or exactly `rows`); `to_float` makes a batch of them what the transform gives."""

    def __init__(self, array, stored, rows, labels, staged):
        self.array, self.stored, self.rows, self.staged = array, stored, rows, staged
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, j):
        i = self.rows[j]
        row = np.array(self.array[(i - self.stored.start) // self.stored.step])  # not a view of the file
        return torch.from_numpy(row), int(self.labels[i])

    def batch(self, start, stop):
        """Items start..stop-1 as (uint8 images, labels): a view of the kept array where it can be."""
        rows = self.rows[start:stop]
        first, step = (rows.start - self.stored.start) // self.stored.step, rows.step // self.stored.step
        x = torch.from_numpy(np.ascontiguousarray(self.array[first:first + step * len(rows):step]))
        return x, torch.as_tensor(self.labels[rows.start:rows.stop:rows.step], dtype=torch.int64)

    def to_float(self, x):
        return self.staged.to_float(x)


class FromUint8(nn.Module):
    """The model on kept uint8 images, which it makes float first (on their device), as the transform
    would; its parameters are the model's, under `model.` (for torch.func.functional_call)."""

    def __init__(self, model, to_float):
        super().__init__()
        self.model, self.to_float = model, to_float

    def forward(self, x):
        return self.model(self.to_float(x))


def _covers(stored, rows, n):
    return stored == rows or stored == range(n)


def images(dataset, rows=None, workers=0, desc="images"):
    """`dataset`'s items `rows` (a range; default every item) as a Decoded set, decoding the images
    the first time; None when they are not kept (see the module docstring). Under torchrun every rank
    calls it at the same point with its own `rows`."""
    n = len(dataset)
    rows = range(n) if rows is None else rows
    where = _STATE["where"]
    staged = None if where is None or n == 0 else _stages_of(dataset, desc)
    if staged is None:
        return None
    kept = dataset.__dict__.get("_decoded")
    if kept is not None and kept[0] == (n, dataset.transform) and _covers(kept[1], rows, n):
        return Decoded(kept[2], kept[1], rows, dataset.labels, staged)
    array, stored = None, range(n)
    if isinstance(where, Path):
        array = _from_disk(where, dataset, staged, workers, desc)
    if array is None:
        stored = rows
        array = _in_memory(dataset, staged, rows, workers, desc)
    if array is None:
        return None
    dataset.__dict__["_decoded"] = ((n, dataset.transform), stored, array)
    return Decoded(array, stored, rows, dataset.labels, staged)


class _Geometric(Dataset):
    def __init__(self, dataset, staged, rows):
        self.dataset, self.staged, self.rows = dataset, staged, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, j):
        return self.staged.geometric(self.dataset.image(self.rows[j])).as_subclass(torch.Tensor)


def _decode_into(out, dataset, staged, rows, workers, desc):
    """Decode items `rows` into `out` (uint8 (len(rows), 3, H, W)) with `workers` processes."""
    loader = DataLoader(_Geometric(dataset, staged, rows), batch_size=DECODE_BATCH, num_workers=workers)
    start = 0
    for x in tqdm(loader, desc=f"{desc}: decoding (once)", leave=False, disable=not distributed.is_primary()):
        if tuple(x.shape[1:]) != staged.shape:
            raise RuntimeError(f"{desc}: decoded images of shape {tuple(x.shape[1:])}, expected {staged.shape}")
        out[start:start + len(x)] = x.numpy()
        start += len(x)


def _in_memory(dataset, staged, rows, workers, desc):
    need = len(rows) * int(np.prod(staged.shape))
    budget = (mem_available() or float("inf")) * MEMORY_FRACTION / distributed.local_world_size()
    if need > budget:
        _once(("memory", id(dataset)), logging.WARNING, "%s: %.1f GiB of decoded images exceed the memory "
              "budget (%.1f GiB): decoded in every pass", desc, need / 2**30, budget / 2**30)
        return None
    array = np.empty((len(rows), *staged.shape), dtype=np.uint8)
    _decode_into(array, dataset, staged, rows, workers, desc)
    log.info("%s: %d images decoded once, kept in memory (%.1f MiB)", desc, len(rows), need / 2**20)
    return array


# ------------------------------------------------------------------------------------ on disk
@dataclass(frozen=True)
class _Entry:
    data: Path      # <key>.npy: uint8 (N, 3, H, W)
    header: Path    # <key>.json: format, key, shape, crc32 of the data
    key: str
    shape: tuple


def _entry(folder, dataset, staged):
    def parts():
        yield from (f"format {FORMAT}", torch.__version__, torchvision.__version__, PIL.__version__,
                    staged.description, f"border {getattr(dataset, 'border', 0)}", len(dataset))
        for p in dataset.paths:  # each image file by its identity: a rewritten file names another entry
            # os.fsencode: a name is any byte string (img_\xe9.JPEG is not UTF-8), hashed as its bytes
            yield os.fsencode(os.path.abspath(p))
            yield identity.stamp(p)
    key = identity.sha256_bytes(parts())
    return _Entry(folder / f"{key}.npy", folder / f"{key}.json", key, (len(dataset), *staged.shape))


def _all(ok):
    """Whether `ok` holds on every rank."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    return int(distributed.all_reduce_sum(flag).item()) == 0


def _from_disk(folder, dataset, staged, workers, desc):
    """Every item's image from the folder's file (read, or decoded and written), or None when the
    folder cannot take it (the caller keeps the images in memory then)."""
    entry = _entry(folder, dataset, staged)
    array = _read(entry, dataset, staged)
    if _all(array is not None):
        log.debug("%s: decoded images read from %s", desc, entry.data)
        return array
    tmp = _create(entry) if distributed.is_primary() else None
    tmp = distributed.broadcast_object(tmp)
    if tmp is None:
        return None
    if _all(os.path.isfile(tmp) and os.path.getsize(tmp) >= int(np.prod(entry.shape))):
        return _fill_shared(entry, Path(tmp), dataset, staged, workers, desc)
    _once("unshared", logging.WARNING, "--decode-cache %s is not one folder for every rank: each rank decodes "
          "every image into its own file", folder)
    own = Path(tmp) if distributed.is_primary() else _create(entry)
    if own is None:
        return None
    array = _open(own, entry.shape, "r+")
    _decode_into(array, dataset, staged, range(len(dataset)), workers, desc)
    array.flush()
    del array
    return None if _commit(entry, own, desc) is None else _open(entry.data, entry.shape, "c")


def _fill_shared(entry, tmp, dataset, staged, workers, desc):
    """Every rank decodes its strided share into the one temporary file; rank 0 checks it and puts it
    in place."""
    rank, world, n = distributed.rank(), distributed.world_size(), entry.shape[0]
    array = _open(tmp, entry.shape, "r+")
    _decode_into(array[rank::world], dataset, staged, range(rank, n, world), workers, desc)
    array.flush()
    del array
    counts = torch.zeros(world, dtype=torch.int64)
    counts[rank] = len(range(rank, n, world))
    if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
        counts = counts.cuda()
    counts = distributed.all_reduce_sum(counts).cpu().tolist()  # also: every share is written
    done = _commit(entry, tmp, desc, counts) if distributed.is_primary() else None
    return _open(entry.data, entry.shape, "c") if distributed.broadcast_object(done is not None) else None


def _create(entry):
    """A temporary file in the folder with room for the data and a .npy header; its path as a string,
    or None (a warning) when the folder cannot take it."""
    folder, size, tmp = entry.data.parent, int(np.prod(entry.shape)), None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(entry.data)  # only what a killed write of this toolkit left
        free = os.statvfs(folder)
        if free.f_bavail * free.f_frsize < size + MARGIN_BYTES:
            _once(("space", entry.key), logging.WARNING, "decoded images not kept on disk: %s has %.1f GiB free, "
                  "they need %.1f GiB and %.1f GiB is left free", folder, free.f_bavail * free.f_frsize / 2**30,
                  size / 2**30, MARGIN_BYTES / 2**30)
            return None
        tmp_folder, tmp, fd = temporary(entry.data)  # a private folder: no link planted there is followed
        _TEMPORARY[str(tmp)] = tmp_folder, fd         # its folder flock'ed until committed: not a leftover
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=entry.shape)
        with open(tmp, "r+b") as f:  # space reserved now: writing a mapping on a full disk would kill the run
            os.posix_fallocate(f.fileno(), 0, array.offset + size)
        del array
        return str(tmp)
    except OSError as err:
        _once(("write", str(folder)), logging.WARNING, "decoded images not kept on disk (%s: %s); kept in "
              "memory instead", folder, err.strerror or err)
        if tmp is not None:
            _drop(tmp)
        return None


_TEMPORARY = {}  # this process's temporary files: path -> (their private folder, the flock'ed fd)


def _drop(tmp):
    """Remove this process's temporary file `tmp` (what is left of it) and its folder."""
    if str(tmp) in _TEMPORARY:
        tmp_folder, fd = _TEMPORARY.pop(str(tmp))
        drop_temporary(tmp_folder, tmp, fd)


def _open(path, shape, mode):
    """The .npy file's data as a memory map of `shape`, checked: uint8, C order, exactly that shape and
    size. A ValueError says what differs."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got, fortran, dtype = read(f)
        offset = f.tell()
    if tuple(got) != tuple(shape) or fortran or dtype != np.uint8:
        raise ValueError(f"holds {dtype} {tuple(got)}, expected uint8 {tuple(shape)}")
    if os.path.getsize(path) != offset + int(np.prod(shape)):
        raise ValueError("its size does not match its header (a truncated file)")
    return np.memmap(path, dtype=np.uint8, mode=mode, offset=offset, shape=tuple(shape))


def _crc(array):
    flat, crc = array.reshape(-1), 0
    for s in range(0, len(flat), CHUNK):
        crc = zlib.crc32(flat[s:s + CHUNK], crc)
    return crc


def _commit(entry, tmp, desc, counts=None):
    """Checksum the filled temporary file, rename it into place and write its header (last: a file
    without a header is never used). Returns the final path, or None (a warning)."""
    try:
        crc = _crc(_open(tmp, entry.shape, "r"))
        finish_temporary(tmp)  # a regular file (no link), the umask's mode
        os.replace(tmp, entry.data)
        header = {"format": FORMAT, "key": entry.key, "shape": list(entry.shape), "crc32": crc}
        atomic_write(entry.header, lambda part: Path(part).write_text(json.dumps(header)), overwrite=True)
    except (OSError, ValueError, UserError) as err:
        _once(("write", entry.key), logging.WARNING, "decoded images not kept on disk (%s: %s)", entry.data, err)
        return None
    finally:
        _drop(tmp)
    log.info("%s: %d images decoded once%s, kept in %s (%.1f MiB)", desc, entry.shape[0],
             f" (per rank: {', '.join(map(str, counts))})" if counts else "", entry.data,
             int(np.prod(entry.shape)) / 2**20)
    return entry.data


def _read(entry, dataset, staged):
    """The file's array when it exists and passes every check, else None (a warning if it exists)."""
    try:
        modes = [os.stat(p).st_mode for p in (entry.header, entry.data)]
    except FileNotFoundError:
        return None
    except OSError as err:
        return _distrust(entry, f"cannot be read ({err.strerror or err})")
    if not all(stat.S_ISREG(m) for m in modes):
        return _distrust(entry, "not a regular file")
    try:
        with open(entry.header, "rb") as f:
            text = f.read(HEADER_LIMIT + 1)
        if len(text) > HEADER_LIMIT:
            return _distrust(entry, f"a header larger than {HEADER_LIMIT} bytes")
        header = json.loads(text)
        if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("key") != entry.key \
                or header.get("shape") != list(entry.shape):
            return _distrust(entry, "not this cache's format, key or shape")
        array = _open(entry.data, entry.shape, "c")  # copy-on-write: writable for torch, never written
    except (OSError, ValueError) as err:
        return _distrust(entry, f"unreadable ({err})")
    if _crc(array) != header.get("crc32"):
        return _distrust(entry, "checksum mismatch (a damaged file)")
    gen = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))  # not the run's random state
    for i in gen.choice(len(array), size=min(SPOT_CHECKS, len(array)), replace=False):
        if not np.array_equal(staged.geometric(dataset.image(int(i))).numpy(), array[i]):
            return _distrust(entry, "images decoded afresh differ from the file")
    return array


def _distrust(entry, why):
    if distributed.is_primary():
        log.warning("decoded-image cache file %s ignored: %s; decoding the images again", entry.data, why)
    return None
