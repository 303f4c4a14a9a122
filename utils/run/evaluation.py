"""Accuracy that is exact across ranks: each rank takes indices rank, rank+world, ... (no padding, no
repeats) and the correct / total counts are all-reduced. A frozen prefix that the model shares with
the previous evaluation of the same data set is not run again (utils/run/prefix.py)."""

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm import tqdm

from utils.run import prefix
from utils.runtime import distributed


def make_loader(dataset, batch_size, workers, shuffle=False, generator=None, shard=True):
    if shard and distributed.is_distributed():
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=generator, persistent_workers=False)


@torch.no_grad()
def accuracy(model, dataset, device, batch_size=256, workers=0, project=None, desc="eval"):
    """Top-1 accuracy in percent of `model` on `dataset`; `project` maps logits onto the set's labels."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    forward, cached = model, prefix.outputs(model, dataset, device, batch_size, desc)
    if cached is not None:  # the same images' prefix outputs, computed with these prefix tensors
        split, h, y = cached
        forward, dataset, workers = split.tail, TensorDataset(h, y), 0
    loader = make_loader(dataset, batch_size, workers)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not distributed.is_primary()):
        logits = forward(x.to(device, non_blocking=True))
        if project is not None:
            logits = project(logits)
        counts[0] += (logits.argmax(1).cpu() == y).sum().item()
        counts[1] += len(y)
    if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
        counts = distributed.all_reduce_sum(counts.to(device)).cpu()
    else:
        distributed.all_reduce_sum(counts)
    return 100.0 * counts[0].item() / max(1.0, counts[1].item())


def evaluate_all(model, bundle, device, batch_size=256, workers=0, heldout=True, test=True, shifts=True):
    """Held-out, test and every shift accuracy; a missing shift is reported as None and listed."""
    out = {}
    if heldout:
        out["heldout"] = accuracy(model, bundle.heldout, device, batch_size, workers, desc="held-out")
    if test:
        out["test"] = accuracy(model, bundle.test.dataset, device, batch_size, workers,
                               bundle.test.project, desc="test")
    if shifts:
        out["shifts"] = {}
        for s in bundle.shifts:
            out["shifts"][s.name] = (None if s.dataset is None else
                                     accuracy(model, s.dataset, device, batch_size, workers, s.project,
                                              desc=s.name))
        present = [v for v in out["shifts"].values() if v is not None]
        out["shift_mean"] = sum(present) / len(present) if present else None
        out["missing_shifts"] = [s.name for s in bundle.shifts if s.dataset is None]
    return out
