"""A frozen prefix of the network, run once per data set.

The default zoo fine-tunes only EfficientNet-Lite0's last block, conv head and head: the stem and the
first 15 blocks are the same tensors in every ingredient, so they are the same in every soup of them.
In eval mode such a prefix is a fixed function of the image. A run that evaluates many models on one
data set (greedy soup: every ingredient and every candidate) or takes many MEHL steps on the held-out
split computes the prefix's output once and afterwards runs only the rest of the network; finetune.py
computes its frozen blocks' activations once per zoo.

Using it is a step each recipe takes (utils/run/inputs.py): `precomputed` gives the prefix's outputs,
computed once, and the rest of the model (`Tail`) when the prefix may stand for the model, else nothing.

The prefix stands for the model only when it computes what the whole model would:
- the architecture declares where its prefix ends (utils/archs: `register_split`; today
  EfficientNet-Lite0: everything before the last block, or a chosen depth for finetune.py);
- every module of the prefix is in eval mode (no batch statistics, no dropout or drop-connect);
- the outputs were computed with prefix tensors (parameters and buffers) equal, element for element, to
  the model's: they are found under a sha256 of every prefix tensor (`prefix_key`), computed at every
  use, so a different prefix computes them again.
Logits then equal model(x) up to the order of floating-point sums (a convolution may sum in another order
for another batch size). Outputs of a data set larger than LIMIT_BYTES are not kept: its images go
through the whole model, as without this module. The process keeps the outputs of one prefix (the
latest) per data set object.

Across processes (the demo runs 18 soup processes on the same images and the same prefix), the outputs
are also kept on disk when a folder is configured (`configure`; the scripts' --prefix-cache) and the
data set says exactly what its items are (`fingerprint()`, and `items(indices)` to compute a few afresh:
datasets/fashion_mnist.py's ImageTensors). A file is named by a hash of everything its numbers depend
on: the prefix tensors (every element), the data set's fingerprint, the batch size, the device type and
CPU threads, and torch's version; so a run computes from the file exactly the outputs it would compute
itself. The folder is trusted as the code is: the checks catch accidental damage and stale files, not a
deliberate edit (docs/GUARANTEES.md). A file is read only when it is a regular file (a FIFO or a device
is never opened) whose size and zip entries are within what a write could produce (the ingredient
loader's bound, utils/files/state_dicts.py), and used only after it loads as plain tensors
(weights_only), holds the key it is named by, the right number of finite outputs, labels and a checksum
that match, and a few random items computed afresh agree with it. Anything else is a warning, and the
outputs are computed again and the file replaced. A folder that cannot be written costs a warning, not
the run."""
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from utils.archs import split_of
from utils.files.cache import cache_folder
from utils.files.identity import sha256_bytes
from utils.files.state_dicts import atomic_write, check_unpacked_size
from utils.runtime import distributed
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

LIMIT_BYTES = 512 * 2**20   # per data set, on the CPU
FORMAT = 1                  # of the files on disk: a change of what they hold changes it
SPOT_CHECKS = 8             # items of a file computed afresh and compared before it is used
PASS_BATCH = 128            # images per prefix pass of a recipe, whatever its own batch size (see precomputed)
_MEMORY = {"key": None, "outputs": {}}      # prefix_key -> {id(dataset): (dataset, h or None, y)}
_DISK = {"folder": None, "warned": False}   # the on-disk cache (configure); None: memory only


# ------------------------------------------------------------------------ what a recipe runs
class Tail(nn.Module):
    """The model after its frozen prefix, as a module: its parameters are the model's under `model.`, so
    that `functional_call` can put a soup's parameters in (utils/run/inputs.py `Inputs.key_prefix`)."""

    def __init__(self, model, tail):
        super().__init__()
        self.model, self.tail = model, tail

    def forward(self, h):
        return self.tail(h)


def precomputed(model, dataset, device, learned=(), desc="prefix", split=None):
    """(the prefix's outputs on `dataset` as a data set, `Tail`) when the prefix stands for the model (see
    the module's docstring) and holds none of the `learned` tensors, else None. Ask at each use: the
    prefix tensors are checked when it is called. `split`: a Split of the model (utils/archs), default
    the one its architecture declares. utils/run/inputs.py is where a recipe asks.

    The prefix runs PASS_BATCH images at a time whatever the recipe's batch size: a convolution may sum in
    another order for another batch, so outputs computed at the recipe's size would be found only by
    recipes of that size, and Learned-Soup (256) would pass over every set again after the others (128)."""
    split = split_of(model) if split is None else split
    if split is None or set(split.keys) & set(learned):
        return None
    found = outputs(model, dataset, device, PASS_BATCH, desc, split)
    if found is None:
        return None
    _, h, y = found
    return TensorDataset(h, y), Tail(model, split.tail)


# -------------------------------------------------------------------------- the outputs, once
def prefix_key(model, split):
    """sha256 of every prefix tensor (name, dtype, shape and each element) and the model's class."""
    state = model.state_dict()

    def parts():
        yield f"{type(model).__module__}.{type(model).__qualname__}"
        for key in split.keys:
            t = state[key].detach()
            yield f"{key} {t.dtype} {tuple(t.shape)}"
            yield _tensor_bytes(t)
    return sha256_bytes(parts())


def _tensor_bytes(t):
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


@torch.no_grad()
def outputs(model, dataset, device, batch_size=256, desc="prefix", split=None, bounded=True):
    """(split, h, y): the prefix's output for every item of `dataset`, in order (on the CPU), and the
    labels; or None when the prefix cannot stand for the model here (no split registered for it, a
    prefix module in train mode, or outputs above LIMIT_BYTES unless not `bounded`). Every rank computes
    the whole set."""
    split = split_of(model) if split is None else split
    if split is None or any(m.training for m in split.modules):
        return None
    key = prefix_key(model, split)
    if _MEMORY["key"] != key:
        _MEMORY.update(key=key, outputs={})
    hit = _MEMORY["outputs"].get(id(dataset))
    if hit is not None and hit[0] is dataset and (hit[1] is not None or bounded):
        return None if hit[1] is None else (split, hit[1], hit[2])
    disk = _disk_entry(key, dataset, device, batch_size)
    if disk is not None:
        found = _read(disk, split, dataset, device)
        if found is not None:
            _MEMORY["outputs"][id(dataset)] = (dataset, *found)
            return (split, *found)
    h, y = _compute(split, dataset, device, batch_size, desc, LIMIT_BYTES if bounded else None)
    _MEMORY["outputs"][id(dataset)] = (dataset, h, y)
    if h is None:
        return None
    if disk is not None and distributed.is_primary():
        _write(disk, h, y)
    return split, h, y


def _compute(split, dataset, device, batch_size, desc, limit):
    """(h, y) of every item, or (None, None) as soon as h would take more than `limit` bytes."""
    hs, ys, size = [], [], 0
    # its own generator: a DataLoader draws a seed, which must not move the global RNG
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())
    for x, y in tqdm(loader, desc=f"{desc} (frozen layers, once)", leave=False,
                     disable=not distributed.is_primary()):
        h = split.head(x.to(device)).cpu()
        size += h.numel() * h.element_size()
        if limit is not None and size / len(hs + [h]) * -(-len(dataset) // batch_size) > limit:
            return None, None
        hs.append(h)
        ys.append(torch.as_tensor(y))
    return torch.cat(hs), torch.cat(ys)


# ------------------------------------------------------------------------------- on disk
def default_folder():
    """The prefix outputs' default folder: `prefix` in the toolkit's cache (utils/files/cache.py)."""
    return cache_folder("prefix")


def configure(folder):
    """Keep outputs on disk in `folder` from now on (None: in memory only, the default)."""
    _DISK["folder"], _DISK["warned"] = (None if folder is None else Path(folder)), False


@dataclass(frozen=True)
class _Entry:
    path: Path
    key: str


def _disk_entry(prefix, dataset, device, batch_size):
    """Where the outputs of `dataset` through the prefix whose `prefix_key` is `prefix` live on disk, or
    None (no folder configured, or a data set that cannot say exactly what its items are)."""
    folder = _DISK["folder"]
    fingerprint = getattr(dataset, "fingerprint", None)
    if folder is None or fingerprint is None or not hasattr(dataset, "items"):
        return None
    data = fingerprint()
    if data is None:
        return None
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = sha256_bytes((f"format {FORMAT}", prefix, torch.__version__, device.type, threads, batch_size,
                        len(dataset), str(data)))
    return _Entry(folder / f"{key}.pt", key)


def _checksum(h, y):
    digest = hashlib.sha256(_tensor_bytes(h))
    digest.update(_tensor_bytes(y))
    return digest.hexdigest()


def _most_bytes(n):
    """The most a file of n items can hold: outputs of at most LIMIT_BYTES, n int64 labels, metadata."""
    return LIMIT_BYTES + 8 * n + 2**16


def _read(entry, split, dataset, device):
    """(h, y) from the file, or None when there is none or it fails a check (a warning then). Only a
    regular file is opened (a FIFO would block the run, a device never end), and only after the sizes it
    declares, its zip entries' too, are checked against what a write could produce (a deflated entry of
    a few MB could otherwise inflate to GBs inside torch.load)."""
    try:
        mode = os.stat(entry.path).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        return _distrust(entry, f"cannot be read ({err.strerror or err})")
    if not stat.S_ISREG(mode):
        return _distrust(entry, "not a regular file")
    try:
        check_unpacked_size(entry.path, _most_bytes(len(dataset)), f"a cache file of {len(dataset)} items")
    except UserError as err:  # the ingredient loader's bound; its message names the file first
        return _distrust(entry, str(err).removeprefix(f"{entry.path}: "))
    try:
        saved = torch.load(entry.path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is computed again
        return _distrust(entry, f"unreadable ({type(err).__name__})")
    why = _problem(saved, entry, len(dataset))
    if why is None:
        why = _spot_check(saved["h"], saved["y"], split, dataset, device)
    if why is not None:
        return _distrust(entry, why)
    log.debug("frozen-prefix outputs read from %s", entry.path)
    return saved["h"], saved["y"]


def _problem(saved, entry, n):
    """Why the loaded object is not the outputs of `entry` for n items, or None."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("key") != entry.key:
        return "not this cache's format or key"
    h, y = saved.get("h"), saved.get("y")
    if not (isinstance(h, torch.Tensor) and isinstance(y, torch.Tensor)) or h.layout != torch.strided \
            or y.layout != torch.strided:
        return "no dense output tensors"
    if not h.is_floating_point() or h.dim() < 2 or len(h) != n or y.dtype != torch.int64 or y.shape != (n,):
        return f"wrong shapes or types for {n} items"
    if saved.get("checksum") != _checksum(h, y):
        return "checksum mismatch (a damaged file)"
    if not torch.isfinite(h).all():
        return "non-finite outputs"
    return None


def _spot_check(h, y, split, dataset, device):
    """A few random items (not drawn from the global RNG) through the prefix again: stale files, e.g.
    written by code whose transforms or prefix computed something else, disagree here."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
    idx = torch.randperm(len(h), generator=gen)[:SPOT_CHECKS]
    if not len(idx):
        return None
    x, labels = dataset.items(idx.tolist())
    fresh, saved = split.head(x.to(device)).cpu(), h[idx]
    if not torch.equal(torch.as_tensor(labels, dtype=torch.int64), y[idx]):
        return "labels differ from the data set's"
    scale = max(saved.abs().max().item(), 1.0)
    if fresh.shape != saved.shape or fresh.dtype != saved.dtype or \
            not torch.allclose(fresh, saved, rtol=1e-4, atol=1e-4 * scale):
        return "items computed afresh differ from the file"
    return None


def _distrust(entry, why):
    log.warning("frozen-prefix cache file %s ignored: %s; computing the outputs again", entry.path, why)
    return None


def _write(entry, h, y):
    payload = {"format": FORMAT, "key": entry.key, "h": h, "y": y, "checksum": _checksum(h, y)}
    try:
        atomic_write(entry.path, lambda tmp: torch.save(payload, tmp), overwrite=True)
    except UserError as err:
        if not _DISK["warned"]:
            log.warning("frozen-prefix outputs not kept on disk (%s); the run goes on without", err)
            _DISK["warned"] = True
