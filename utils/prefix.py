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
through the whole model, as without this module."""
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import distributed

LIMIT_BYTES = 512 * 2**20   # per data set, on the CPU
_SPLITS = {}                # model class -> make(model) -> Split


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
    return split, h, y
