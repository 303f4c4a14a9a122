"""Accuracy that is exact across ranks: each rank takes indices rank, rank+world, ... (no padding, no
repeats) and the correct / total counts are all-reduced. What is evaluated is given: a module and the
items it maps to logits (a recipe's `Inputs`, utils/run/prefix.py: the whole model on the images, or the
rest of the model on its frozen prefix's outputs)."""

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from utils.runtime import distributed


def make_loader(dataset, batch_size, workers, shuffle=False, generator=None, shard=True):
    if shard and distributed.is_distributed():
        dataset = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=generator, persistent_workers=False)


@torch.no_grad()
def accuracy(model, dataset, device, batch_size=256, workers=0, project=None, desc="eval"):
    """Top-1 accuracy in percent of `model` (in eval mode) on the items of `dataset`; `project` maps
    logits onto the set's labels."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    loader = make_loader(dataset, batch_size, workers)
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not distributed.is_primary()):
        logits = model(x.to(device, non_blocking=True))
        if project is not None:
            logits = project(logits)
        counts[0] += (logits.argmax(1).cpu() == y).sum().item()
        counts[1] += len(y)
    if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
        counts = distributed.all_reduce_sum(counts.to(device)).cpu()
    else:
        distributed.all_reduce_sum(counts)
    return 100.0 * counts[0].item() / max(1.0, counts[1].item())


def evaluate_all(inputs_of, bundle, device, batch_size=256, heldout=True, test=True, shifts=True):
    """Held-out, test and every shift accuracy of what `inputs_of(dataset, desc)` gives to run on each
    data set (`utils.run.prefix.evaluation_inputs`); a missing shift is reported as None and listed."""
    def score(dataset, project, desc):
        inputs = inputs_of(dataset, desc)
        return accuracy(inputs.forward, inputs.dataset, device, batch_size, inputs.workers, project, desc)

    out = {}
    if heldout:
        out["heldout"] = score(bundle.heldout, None, "held-out")
    if test:
        out["test"] = score(bundle.test.dataset, bundle.test.project, "test")
    if shifts:
        out["shifts"] = {}
        for s in bundle.shifts:
            out["shifts"][s.name] = None if s.dataset is None else score(s.dataset, s.project, s.name)
        present = [v for v in out["shifts"].values() if v is not None]
        out["shift_mean"] = sum(present) / len(present) if present else None
        out["missing_shifts"] = [s.name for s in bundle.shifts if s.dataset is None]
    return out
