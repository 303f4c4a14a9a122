"""Accuracy that is exact across ranks: each rank takes indices rank, rank+world, ... (no padding, no
repeats) and the correct / total counts are all-reduced. What is evaluated is given: a module and the
items it maps to logits (a recipe's `Inputs`, utils/run/inputs.py). Image files are decoded once
(utils/run/decoded.py); a set that is decoded in every pass keeps its loader's worker processes from one
evaluation to the next (`close_loaders` ends them). Batches are pinned on CUDA. Per-example top-5
predictions are kept on request, for the report's paired tests (utils/files/predictions.py)."""
import atexit

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from utils.run import decoded
from utils.runtime import distributed

_LOADERS = {}   # (id(dataset), rows, batch size, workers, pin) -> (dataset, DataLoader with persistent workers)


def make_loader(dataset, batch_size, workers, shuffle=False, generator=None, shard=True, device=None,
                desc="images"):
    """Batches (x, y) of `dataset`, this rank's strided share under torchrun when `shard`. Images kept
    decoded come as uint8 batches made float per batch (on `device` when given: the float part runs
    there) and give the numbers the transform gives; other sets come through a DataLoader, whose
    workers persist across calls for the same set unless `shuffle`."""
    n, pin = len(dataset), device is not None and torch.device(device).type == "cuda"
    rows = range(distributed.rank(), n, distributed.world_size()) if shard else range(n)
    kept = decoded.images(dataset, rows, workers, desc)
    if kept is not None:
        return _Floats(kept, batch_size, shuffle, generator, device, pin)
    key = (id(dataset), rows, batch_size, workers, pin)
    if workers > 0 and not shuffle and key in _LOADERS and _LOADERS[key][0] is dataset:
        return _LOADERS[key][1]
    persist = workers > 0 and not shuffle
    loader = DataLoader(dataset if rows == range(n) else Subset(dataset, rows), batch_size=batch_size,
                        shuffle=shuffle, num_workers=workers, generator=generator, pin_memory=pin,
                        persistent_workers=persist)
    if persist:
        if not _LOADERS:
            atexit.register(close_loaders)
        _LOADERS[key] = (dataset, loader)
    return loader


class _Floats:
    """Batches of kept uint8 images, each moved to `device` (when given; pinned first on CUDA) and made
    float there. In order, a batch is a slice of the kept array; shuffled, a DataLoader draws the order."""

    def __init__(self, kept, batch_size, shuffle, generator, device, pin):
        self.kept, self.batch_size, self.device, self.pin = kept, batch_size, device, pin
        self.loader = DataLoader(kept, batch_size=batch_size, shuffle=True, generator=generator) if shuffle else None

    def __len__(self):
        return -(-len(self.kept) // self.batch_size)

    def __iter__(self):
        batches = self.loader if self.loader is not None else (
            self.kept.batch(s, s + self.batch_size) for s in range(0, len(self.kept), self.batch_size))
        for x, y in batches:
            if self.device is not None:
                x = x.pin_memory() if self.pin else x
                x = x.to(self.device, non_blocking=True)
            yield self.kept.to_float(x), y


def close_loaders():
    """End the worker processes of every persistent loader (the end of a run)."""
    for _, loader in _LOADERS.values():
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        loader._iterator = None
    _LOADERS.clear()


TOP = 5               # predicted classes kept per example (best first)
CHUNK_ROWS = 1 << 16  # predictions copied to the host this many rows at a time (one sync each)


@torch.no_grad()
def accuracy(model, dataset, device, batch_size=256, workers=0, project=None, desc="eval", keep=False):
    """Top-1 accuracy in percent of `model` (in eval mode) on the items of `dataset`; `project` maps
    logits onto the set's labels. With `keep`, (accuracy, rows): rows is an int16 array (N, 1 + TOP)
    in the set's order, each row the label then the TOP best classes (-1 past the number of classes),
    gathered from every rank.

    No host sync per batch: the correct count stays on the device and is read once per set, and the
    kept rows are copied to the host CHUNK_ROWS at a time."""
    model.eval()
    correct, total = torch.zeros((), dtype=torch.int64, device=device), 0
    labels, chunks, pending, pending_rows = [], [], [], 0
    loader = make_loader(dataset, batch_size, workers, device=device, desc=desc)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not distributed.is_primary()):
        logits = model(x.to(device, non_blocking=True))
        if project is not None:
            logits = project(logits)
        y_dev = y.to(device, non_blocking=True)
        correct += (logits.argmax(1) == y_dev).sum()
        total += len(y)
        if keep:
            labels.append(y)
            pending.append(logits.topk(min(TOP, logits.shape[1]), dim=1).indices.to(torch.int16))
            pending_rows += len(y)
            if pending_rows >= CHUNK_ROWS:
                chunks.append(torch.cat(pending).cpu())
                pending, pending_rows = [], 0
    if pending:
        chunks.append(torch.cat(pending).cpu())
    counts = torch.stack([correct.to(torch.float64), torch.tensor(float(total), dtype=torch.float64,
                                                                  device=correct.device)])
    if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
        counts = distributed.all_reduce_sum(counts)
    else:
        counts = counts.cpu()
        distributed.all_reduce_sum(counts)
    counts = counts.cpu()
    score = 100.0 * counts[0].item() / max(1.0, counts[1].item())
    if not keep:
        return score
    return score, _rows(labels, chunks, len(dataset))


def _rows(labels, chunks, n):
    """(n, 1 + TOP) int16 rows of the whole set: this rank's (rank, rank + world, ...) interleaved
    with the other ranks'."""
    top = torch.cat(chunks) if chunks else torch.zeros((0, TOP), dtype=torch.int16)
    mine = torch.full((len(top), 1 + TOP), -1, dtype=torch.int16)
    if len(top):
        mine[:, 0] = torch.cat(labels).to(torch.int16)
        mine[:, 1:1 + top.shape[1]] = top
    if not distributed.is_distributed():
        return mine.numpy()
    shares = [None] * distributed.world_size()
    torch.distributed.all_gather_object(shares, mine.numpy())
    rows = np.full((n, 1 + TOP), -1, dtype=np.int16)
    for r, share in enumerate(shares):
        rows[r::distributed.world_size()] = share
    return rows


def evaluate_all(inputs_of, bundle, device, batch_size=256, heldout=True, test=True, shifts=True, keep=False):
    """Held-out, test and every shift accuracy of what `inputs_of(dataset, desc)` gives to run on each
    data set (`utils.run.inputs.evaluation`); a missing shift is reported as None and listed.
    With `keep`, the scores also hold "predictions": {set name: rows of `accuracy`} with the set names
    "heldout", "test" and "shift/<name>" (utils/files/predictions.py writes them to a file)."""
    kept = {}

    def score(dataset, project, desc, name):
        inputs = inputs_of(dataset, desc)
        got = accuracy(inputs.forward, inputs.dataset, device, batch_size, inputs.workers, project, desc, keep)
        if not keep:
            return got
        kept[name] = got[1]
        return got[0]

    out = {}
    if heldout:
        out["heldout"] = score(bundle.heldout, None, "held-out", "heldout")
    if test:
        out["test"] = score(bundle.test.dataset, bundle.test.project, "test", "test")
    if shifts:
        out["shifts"] = {}
        for s in bundle.shifts:
            out["shifts"][s.name] = None if s.dataset is None else score(s.dataset, s.project, s.name,
                                                                         f"shift/{s.name}")
        present = [v for v in out["shifts"].values() if v is not None]
        out["shift_mean"] = sum(present) / len(present) if present else None
        out["missing_shifts"] = [s.name for s in bundle.shifts if s.dataset is None]
    if keep:
        out["predictions"] = kept
    return out
