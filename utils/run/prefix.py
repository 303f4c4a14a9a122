"""A frozen prefix of the network, run once per data set.

The default zoo fine-tunes only EfficientNet-Lite0's last block, conv head and head: the stem and the
first 15 blocks are the same tensors in every ingredient, so they are the same in every soup of them.
In eval mode such a prefix is a fixed function of the image. A run that evaluates many models on one
data set (greedy soup: every ingredient and every candidate) or takes many MEHL steps on the held-out
split computes the prefix's output once and afterwards runs only the rest of the network.

It stands for the model only when it computes what the whole model would:
- the architecture declares where its prefix ends (`register`; today EfficientNet-Lite0: everything
  before the last block);
- every module of the prefix is in eval mode (no batch statistics, no dropout or drop-connect);
- the model's prefix tensors (parameters and buffers) equal, element for element, those the outputs
  were computed with: checked at every use, and a different prefix computes them again.
Logits then equal model(x) up to the order of floating-point sums (a convolution may sum in another order
for another batch size). Outputs of a data set larger than LIMIT_BYTES are not kept: its images go
through the whole model, as without this module.

Across processes (the demo runs 18 soup processes on the same images and the same prefix), the outputs
are also kept on disk when a folder is configured (`configure`; the scripts' --prefix-cache) and the
data set says exactly what its items are (`fingerprint()`, and `items(indices)` to compute a few afresh:
datasets/fashion_mnist.py's ImageTensors). A file is named by a hash of everything its numbers depend
on: the prefix tensors (every element), the data set's fingerprint, the batch size, the device type and
CPU threads, and torch's version; so a run computes from the file exactly the outputs it would compute
itself. A file is trusted only after checks: it loads as plain tensors (weights_only), holds the key it
is named by, the right number of finite outputs, labels and a checksum that match, and a few random
items computed afresh agree with it. Anything else is a warning, and the outputs are computed again
and the file replaced. A folder that cannot be written costs a warning, not the run."""
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.files.state_dicts import atomic_write
from utils.runtime import distributed
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

LIMIT_BYTES = 512 * 2**20   # per data set, on the CPU
FORMAT = 1                  # of the files on disk: a change of what they hold changes it
SPOT_CHECKS = 8             # items of a file computed afresh and compared before it is used
_SPLITS = {}                # model class -> make(model) -> Split
_DISK = {"folder": None, "warned": False}   # the on-disk cache (configure); None: memory only


@dataclass(frozen=True)
class Split:
    keys: tuple        # the prefix's state-dict keys (parameters and buffers)
    modules: tuple     # its modules: every one must be in eval mode
    head: Callable     # images -> the prefix's output
    tail: Callable     # the prefix's output -> logits (the rest of the model)


def register(model_class, make):
    """`make(model)` gives the Split of a model of exactly `model_class`."""
    _SPLITS[model_class] = make


def split_of(model):
    make = _SPLITS.get(type(model))
    return None if make is None else make(model)


class _Cache:
    """One model's prefix state and, per data set, the outputs computed with it."""

    def __init__(self):
        self.state = None     # clones of the prefix tensors the outputs belong to
        self.outputs = {}     # id(dataset) -> (dataset, h or None when too large, labels)


def _equal(saved, current):
    return saved is not None and len(saved) == len(current) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
        for a, b in zip(saved, current))


@torch.no_grad()
def outputs(model, dataset, device, batch_size=256, desc="prefix"):
    """(split, h, y): the prefix's output for every item of `dataset`, in order (on the CPU), and the
    labels; or None when the prefix cannot stand for the model here (no split registered for it, a
    prefix module in train mode, or outputs above LIMIT_BYTES). Every rank computes the whole set."""
    split = split_of(model)
    if split is None or any(m.training for m in split.modules):
        return None
    state = model.state_dict()
    current = [state[k].detach() for k in split.keys]
    cache = model.__dict__.setdefault("_prefix_cache", _Cache())
    if not _equal(cache.state, current):
        cache.state, cache.outputs = [t.detach().cpu().clone() for t in current], {}
    hit = cache.outputs.get(id(dataset))
    if hit is not None and hit[0] is dataset:
        return None if hit[1] is None else (split, hit[1], hit[2])
    disk = _disk_entry(model, split, current, dataset, device, batch_size)
    if disk is not None:
        found = _read(disk, split, dataset, device)
        if found is not None:
            cache.outputs[id(dataset)] = (dataset, *found)
            return (split, *found)
    hs, ys, size = [], [], 0
    # its own generator: a DataLoader draws a seed, which must not move the global RNG
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())
    for x, y in tqdm(loader, desc=f"{desc} (frozen layers, once)", leave=False,
                     disable=not distributed.is_primary()):
        h = split.head(x.to(device)).cpu()
        size += h.numel() * h.element_size()
        if size / len(hs + [h]) * -(-len(dataset) // batch_size) > LIMIT_BYTES:
            cache.outputs[id(dataset)] = (dataset, None, None)
            return None
        hs.append(h)
        ys.append(torch.as_tensor(y))
    h, y = torch.cat(hs), torch.cat(ys)
    cache.outputs[id(dataset)] = (dataset, h, y)
    if disk is not None and distributed.is_primary():
        _write(disk, h, y)
    return split, h, y


# ------------------------------------------------------------------------------- on disk
def default_folder():
    """$MODEL_SOUPS_CACHE/prefix, else $XDG_CACHE_HOME/model_soups/prefix, else
    ~/.cache/model_soups/prefix."""
    root = os.environ.get("MODEL_SOUPS_CACHE")
    if root:
        return Path(root) / "prefix"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "model_soups" / "prefix"


def configure(folder):
    """Keep outputs on disk in `folder` from now on (None: in memory only, the default)."""
    _DISK["folder"], _DISK["warned"] = (None if folder is None else Path(folder)), False


@dataclass(frozen=True)
class _Entry:
    path: Path
    key: str


def _tensor_bytes(t):
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _disk_entry(model, split, current, dataset, device, batch_size):
    """Where the outputs of `dataset` through this prefix live on disk, or None (no folder configured,
    or a data set that cannot say exactly what its items are)."""
    folder = _DISK["folder"]
    fingerprint = getattr(dataset, "fingerprint", None)
    if folder is None or fingerprint is None or not hasattr(dataset, "items"):
        return None
    data = fingerprint()
    if data is None:
        return None
    digest = hashlib.sha256()
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    for part in (f"format {FORMAT}", f"{type(model).__module__}.{type(model).__qualname__}", torch.__version__,
                 device.type, threads, batch_size, len(dataset), data):
        digest.update(str(part).encode() + b"\0")
    for key, t in zip(split.keys, current):
        digest.update(f"{key} {t.dtype} {tuple(t.shape)}".encode() + b"\0")
        digest.update(_tensor_bytes(t))
    key = digest.hexdigest()
    return _Entry(folder / f"{key}.pt", key)


def _checksum(h, y):
    return hashlib.sha256(_tensor_bytes(h) + _tensor_bytes(y)).hexdigest()


def _read(entry, split, dataset, device):
    """(h, y) from the file, or None when there is none or it fails a check (a warning then)."""
    try:
        size = entry.path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as err:
        return _distrust(entry, f"cannot be read ({err.strerror or err})")
    if size > LIMIT_BYTES + 2**16:  # never written so large: not loaded into memory
        return _distrust(entry, f"larger than {LIMIT_BYTES} bytes")
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
