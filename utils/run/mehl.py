"""MEHL-Soup's step and group, with the memory they hold. The math is in `utils.soup.hyperplane`; this module
puts it on a model.

Memory of a step, in full-model-sized tensors of the learned parameters (D numbers each):

- the model's own parameters, which *are* the soup: `FlatSoup` makes them views of one flat vector,
  so the soup is written in place by the combine and never copied into the model;
- their gradients, views of one flat vector: the backward pass accumulates into it, so the gradient
  is read in place by the projection (no concatenation);
- the K rows of directions of this rank (K / world size under torchrun), each ingredient loaded
  straight into its slot, tensor by tensor;
- the group's center (the soup when the group started; the first group's mean).

The first two are what a plain forward/backward holds too, so a MEHL step holds K + 1 ingredients more
than a plain step, plus, while a row is loaded, the checkpoint being read (one ingredient, with the
tensors that are not learned). Block products read the rows in place (no (K, D) temporary); with
directions stored in bfloat16 or float16 they read slices of at most `hyperplane.SLICE` numbers per
row cast to float32. Nothing else of size D is allocated per step.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from utils.files.ingredients import load_checked
from utils.runtime import distributed
from utils.soup import hyperplane
from utils.soup.schedules import set_lr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEAN_SLICE = 1 << 22  # numbers per all-reduce when the first center is averaged over ranks


class FlatSoup:
    """The learned parameters of `model` (in `names` order) re-pointed to views of one flat vector
    `theta`, and their gradients to views of one flat vector `grad`."""

    def __init__(self, model, names):
        params = dict(model.named_parameters())
        first = params[names[0]]
        total = sum(params[n].numel() for n in names)
        self.theta = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.theta)
        offset = 0
        with torch.no_grad():
            for n in names:
                p, size = params[n], params[n].numel()
                self.theta[offset:offset + size].copy_(p.reshape(-1))
                p.data = self.theta[offset:offset + size].view_as(p)  # the old storage is freed
                p.grad = self.grad[offset:offset + size].view_as(p)
                offset += size


@dataclass
class Group:
    """One group's learning state on this rank: its center, this rank's directions P and their
    inverse norms, the coefficients X with their optimizer, and the lr schedule."""
    center: torch.Tensor
    P: torch.Tensor
    inv_norms: torch.Tensor
    X: torch.Tensor
    optimizer: torch.optim.Optimizer
    schedule: Callable
    step: int = 0
    losses: list = field(default_factory=list)


def load_rows(paths, members, names, sizes, reference, dtype, device, center=None):
    """This rank's ingredients `members` as rows (n, D) in `dtype`, each tensor copied straight into its
    slot. With `center`, a row holds theta_i - center, subtracted in the ingredient's precision before
    the cast (a bfloat16 theta_i would lose the small difference)."""
    rows = torch.empty(len(members), sum(sizes), dtype=dtype, device=device)
    for j, i in enumerate(members):
        sd = load_checked(paths[i], reference)
        offset = 0
        for n, size in zip(names, sizes):
            slot, t = rows[j, offset:offset + size], sd[n].reshape(-1)
            if center is None:
                slot.copy_(t)
            else:
                slot.copy_(t.to(device=device, dtype=center.dtype) - center[offset:offset + size])
            offset += size
        del sd
    return rows


def group_mean(rows, count):
    """The mean of the group's rows over every rank (`count` rows in all), accumulated in float64 one
    slice at a time, row by row: `rows[:, s:e].sum(0, dtype=float64)` would first copy all the rows'
    slices to float64 (K x 32 MB)."""
    center = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
    for s in range(0, rows.shape[1], MEAN_SLICE):
        e = min(s + MEAN_SLICE, rows.shape[1])
        acc = torch.zeros(e - s, dtype=torch.float64, device=rows.device)
        for row in rows:
            acc += row[s:e]
        center[s:e] = distributed.all_reduce_sum(acc) / count
    return center


def streamed_mean(paths, members, names, sizes, reference, count, like):
    """The group's mean without holding its rows: this rank's ingredients summed one at a time."""
    total = torch.zeros_like(like)
    for i in members:
        total += load_rows(paths, [i], names, sizes, reference, like.dtype, like.device)[0]
    return distributed.all_reduce_sum(total).div_(count)


def directions(paths, members, count, layout, reference, soup, dtype, first):
    """(center, P, inv_norms) of a group: the center is the current soup, or the group's mean for the
    first group; P holds this rank's unit directions in `dtype`."""
    args = (paths, members, layout.names, layout.sizes, reference)
    if dtype == soup.theta.dtype:
        rows = load_rows(*args, dtype, soup.theta.device)
        center = group_mean(rows, count) if first else soup.theta.clone()
        P, inv_norms = hyperplane.directions_(rows, center, layout.bounds)
        return center, P, inv_norms
    center = streamed_mean(*args, count, soup.theta) if first else soup.theta.clone()
    P = load_rows(*args, dtype, soup.theta.device, center=center)
    return center, P, hyperplane.normalise_(P, layout.bounds)


def gradient(model, soup, batch, n_global, labelsmooth):
    """Fill `soup.grad` with the gradient of the mean loss over the global batch, summed over ranks
    (each rank's loss is a sum over its examples divided by the global batch size); returns the loss.
    `model` is the model, or a function of the batch's inputs giving its logits (MEHL passes the rest
    of the model when the inputs are a frozen prefix's outputs, utils/run/prefix.py)."""
    soup.grad.zero_()
    loss = torch.zeros(1, device=soup.theta.device)
    if batch is not None:
        x, y = batch
        logits = model(x.to(soup.theta.device, non_blocking=True))
        batch_loss = F.cross_entropy(logits, y.to(soup.theta.device), label_smoothing=labelsmooth,
                                     reduction="sum") / n_global
        batch_loss.backward()
        loss += batch_loss.detach()
    distributed.all_reduce_sum(soup.grad)
    return float(distributed.all_reduce_sum(loss))


def step(model, soup, group, bounds, batch, n_global, labelsmooth=0.0, clip=False):
    """One MEHL step: the gradient at the soup (the model's parameters), clipped to norm 1 for ViTs as
    released, projected onto the directions, an optimizer step on X at the schedule's lr, and the new
    soup center + sum_i X[i, b] P[i, b] written into the model. Returns the batch loss."""
    loss = gradient(model, soup, batch, n_global, labelsmooth)
    if clip:
        soup.grad.mul_(min(1.0, 1.0 / (float(soup.grad.norm()) + 1e-6)))
    group.X.grad = hyperplane.project(group.P, soup.grad, bounds).to(group.X.dtype)
    set_lr(group.optimizer, group.schedule(group.step))
    group.optimizer.step()
    group.step += 1
    with torch.no_grad():
        hyperplane.combine(group.X, group.P, bounds, out=soup.theta)
        distributed.all_reduce_sum(soup.theta)
        soup.theta.add_(group.center)
    return loss
