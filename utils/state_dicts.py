"""State dicts: safe loading and atomic saving, validation against an architecture, flattening in
`named_parameters()` order, the block partition (`--layer-size`), and parameters identical across
ingredients. Pure functions on tensors apart from the two file helpers."""
import glob
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from utils.checkpoint_formats import unwrap
from utils.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


# ----------------------------------------------------------------------------------------- files
def load_state_dict(path):
    """Load a checkpoint without running code from it: `.safetensors`, or `.pt` through
    `torch.load(weights_only=True)`. Accepts a plain state dict or a dict holding one under
    "state_dict" / "model_state_dict". Any failure is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: refused to load: the pickle asks for objects outside plain tensors "
                        f"(weights_only=True; nothing in it was run): {first}") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable checkpoint (truncated or another format): {first}") from err
    if isinstance(sd, dict):  # a training checkpoint, keys saved from DDP (utils/checkpoint_formats.py)
        sd = unwrap(sd, str(path))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: holds no state dict of tensors (found {type(sd).__name__})")
    return sd


def atomic_write(path, write_fn, overwrite=False):
    """Write through a temporary file in the same folder and `os.replace` it into place, so that the
    final name never holds a half-written file. Refuses an existing `path` unless `overwrite`.

    Any failure to write (disk full, unwritable folder; torch.save reports a full disk as a
    RuntimeError, safetensors as its own error) is a UserError naming the file, and the temporary file
    is removed. Temporary files of this name left by a killed process are removed first."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists: refusing to overwrite it (pass --overwrite, or choose another name)")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write_fn(tmp)
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - every write failure becomes one line naming the file
        raise UserError(f"could not write {path}: {_write_reason(err, path.parent)}") from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def _write_reason(err, folder):
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
    else:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    try:
        free = shutil.disk_usage(folder).free
        reason += f" (free space in {folder}: {free / 2**20:.1f} MiB)"
    except OSError:
        pass
    return reason


def save_state_dict(sd, path, overwrite=False):
    """Save a state dict as `.safetensors` or `.pt` (by suffix), atomically."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        return atomic_write(path, lambda tmp: save_file(sd, tmp), overwrite)
    return atomic_write(path, lambda tmp: torch.save(sd, tmp), overwrite)


def sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ validation
def check_state_dict(sd, reference, name):
    """Refuse a state dict that does not match `reference` (the architecture's own state dict):
    missing, unexpected or mis-shaped keys, and NaN/Inf values. `name` is the file, for the message."""
    missing = [k for k in reference if k not in sd]
    unexpected = [k for k in sd if k not in reference]
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(reference[k].shape)})"
              for k in reference if k in sd and sd[k].shape != reference[k].shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise UserError(f"{name} does not match the architecture: " + "; ".join(problems))
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{name}: tensor {k} holds NaN or Inf")


def check_dtypes(sd, reference, name):
    """Cast floating tensors to the architecture's dtype; refuse integer/float mix-ups.

    Mixed float dtypes (e.g. an fp16 ingredient beside fp32 ones) are cast to the reference dtype, with
    one logged warning per file: souping happens in float32/float64 anyway, and the cast is exact for
    fp16/bf16 -> fp32 (a float64 ingredient is rounded to float32, as loading it into the model would)."""
    out, casts = {}, set()
    for k, v in sd.items():
        ref = reference[k]
        if v.dtype != ref.dtype:
            if v.is_floating_point() and ref.is_floating_point():
                casts.add(str(v.dtype).replace("torch.", ""))
                v = v.to(ref.dtype)
            else:
                raise UserError(f"{name}: tensor {k} is {v.dtype}, the architecture expects {ref.dtype}")
        out[k] = v
    if casts and name not in _CAST_WARNED:  # once per file: ingredients are read several times
        _CAST_WARNED.add(name)
        log.warning("%s: floating tensors stored as %s were cast to the architecture's %s", name,
                    "/".join(sorted(casts)), str(next(v.dtype for v in reference.values()
                                                      if v.is_floating_point())).replace("torch.", ""))
    return out


_CAST_WARNED = set()


# --------------------------------------------------------------------------- flatten and blocks
def param_names(model):
    """Parameter names in `named_parameters()` order (the order blocks are built in)."""
    return [n for n, _ in model.named_parameters()]


def flatten(sd, names, dtype=None):
    """Concatenate the tensors `names` of `sd` into one flat vector."""
    return torch.cat([sd[n].reshape(-1).to(dtype or sd[n].dtype) for n in names])


def unflatten(vec, names, like):
    """Inverse of `flatten`: a dict name -> tensor shaped (and typed) like `like[name]`."""
    total = sum(like[n].numel() for n in names)
    if total != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} numbers, the tensors {total}")
    out, offset = {}, 0
    for n in names:
        numel = like[n].numel()
        out[n] = vec[offset:offset + numel].view(like[n].shape).to(like[n].dtype)
        offset += numel
    return out


def make_blocks(sizes, layer_size):
    """Partition tensors (given by their sizes, in order) into blocks, as the released MEHL code does:
    start a new block when the current one already holds more than `layer_size` numbers, otherwise add
    the tensor to it. layer_size=0: one block per tensor; layer_size >= total: one block.
    Returns a list of lists of tensor indices."""
    if layer_size < 0:
        raise UserError(f"--layer-size must be >= 0, got {layer_size}")
    blocks, current, count = [], [], 0
    for i, size in enumerate(sizes):
        if current and count > layer_size:
            blocks.append(current)
            current, count = [], 0
        current.append(i)
        count += size
    if current:
        blocks.append(current)
    return blocks


def block_ids(sizes, blocks):
    """For each number of the flat vector, the index of its block (a LongTensor of length sum(sizes))."""
    ids = torch.empty(sum(sizes), dtype=torch.long)
    offset = 0
    tensor_block = {t: b for b, ts in enumerate(blocks) for t in ts}
    for t, size in enumerate(sizes):
        ids[offset:offset + size] = tensor_block[t]
        offset += size
    return ids


def identical_keys(first, others_iter, keys):
    """The subset of `keys` whose tensors are bit-identical in `first` and in every state dict of
    `others_iter` (an iterable, consumed once, so ingredients can be streamed)."""
    same = set(keys)
    for sd in others_iter:
        same = {k for k in same if torch.equal(first[k], sd[k])}
        if not same:
            break
    return [k for k in keys if k in same]
