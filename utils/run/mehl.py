"""MEHL-Soup's step and group, with the memory they hold. The math is in `utils.soup.hyperplane`; this module
puts it on a model.

Memory of a step, in full-model-sized tensors of the learned parameters (D numbers each):

- the model's own parameters, which *are* the soup: `FlatSoup` makes them views of one flat vector,
  and the step adds its move into it in place, so the soup is never copied into the model;
- their gradients, views of one flat vector: the backward pass accumulates into it, so the gradient
  is read in place by the projection (no concatenation);
- the K rows of directions of this rank (K / world size under torchrun), each ingredient loaded
  straight into its slot, tensor by tensor.

No center is kept. A group starts with the soup at its center and X at 0 (the first group's mean is
written straight into the soup, a later group's center is the soup as it is), and each step adds
sum_i (X_new - X_old)[i, b] P[i, b] to the soup, so it stays center + sum_i X[i, b] P[i, b] without the
center being held: the float32 additions drift from that sum by about sqrt(steps) roundings (1e-6
relative after hundreds of steps). Under torchrun each rank's share of the move is summed through the
gradient's buffer, which is free between the projection and the next backward pass.

So a step holds K ingredients more than a plain forward/backward that keeps its gradients (K + 1.0 was
measured on a CPU with a center kept), and K + 1 more where a plain step's peak comes before its
gradients exist: on a GPU at batch 128 a plain step peaks early in the backward pass, with its
activations still alive and few of its gradients made (each is made as activations are freed), while
the flat gradient here exists from the start (K + 2.0 was measured on an H200 with a center kept). That
gradient stays: the projection reads it as one vector, for all blocks in a fixed number of kernels;
projecting each tensor's gradient as the backward pass makes it (a hook per tensor) would drop it, at
the cost of a kernel per tensor. While a row is loaded the checkpoint being read is held too (one
ingredient, with the tensors that are not learned). Block products read the rows in place (no (K, D)
temporary): on CUDA the fast path (`utils.soup.segmented`) keeps per-chunk partial sums, K x D / 1024
numbers; the per-block loop with directions stored in bfloat16 or float16 reads slices of at most
`hyperplane.SLICE` numbers per row cast to float32. Nothing else of size D is allocated per step
(tests/test_mehl_step.py counts).

A step reads nothing back from the device (no host sync): x and y are copied with `non_blocking` (on
CUDA they come in page-locked memory from the run's one DataLoader, `sampling.RankLoader`), the loss is
returned as a device tensor, the
ViT clip factor stays one (`clip_factor`), and the non-finite check is a device flag; `StepLog` reads
the losses and the flag together every `LOG_EVERY` steps and at the end of an epoch.

Also here: `Ledger`, what the recipe's loops do at their edges besides the algorithm (progress, the
resume state saved after every group, the per-epoch test log, --stop-after-groups).
"""
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.files import mehl_state
from utils.files.ingredients import index_of, load_checked
from utils.run import inputs
from utils.run.evaluation import evaluate_all
from utils.runtime import distributed
from utils.soup import hyperplane, segmented
from utils.soup.schedules import set_lr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEAN_SLICE = 1 << 22  # numbers per all-reduce when the first center is averaged over ranks
log = logging.getLogger("MEHL_soup")
LOG_EVERY = 20  # steps between reads of the loss and the non-finite flag (each read waits for the device)
# The fast path's products may differ from the per-block loop's by float32 sums taken in another order
# (about 1e-6 of the largest value); a miscompiled kernel or a fault is off by far more.
SELF_CHECK_TOLERANCE = 1e-3


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
    """One group's learning state on this rank: its center (the soup where the group starts; from
    `directions`, the soup's own vector, so no copy is held), this rank's directions P and their inverse
    norms, the coefficients X with their optimizer, the lr schedule, and the first step after which the
    soup was not finite."""
    center: torch.Tensor
    P: torch.Tensor
    inv_norms: torch.Tensor
    X: torch.Tensor
    optimizer: torch.optim.Optimizer
    schedule: Callable
    step: int = 0
    losses: list = field(default_factory=list)
    first_bad: torch.Tensor = None  # the first step after which the soup was not finite (0: none)

    def __post_init__(self):
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int64, device=self.X.device)


def load_rows(paths, members, names, sizes, reference, dtype, device, center=None):
    """This rank's ingredients `members` as rows (n, D) in `dtype`, each tensor copied straight into its
    slot. With `center`, a row holds theta_i - center, subtracted in the ingredient's precision before
    the cast (a bfloat16 theta_i would lose the small difference). The rows are `segmented.padded` apart
    (at most 15 numbers more each), so that the fast path loads them 128 bits at a time."""
    rows = segmented.empty_rows(len(members), sum(sizes), dtype, device)
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


def group_mean(rows, count, out):
    """The mean of the group's rows over every rank (`count` rows in all), accumulated in float64 one
    slice at a time, row by row (`rows[:, s:e].sum(0, dtype=float64)` would first copy all the rows'
    slices to float64: K x 32 MB), written into `out`."""
    for s in range(0, rows.shape[1], MEAN_SLICE):
        e = min(s + MEAN_SLICE, rows.shape[1])
        acc = torch.zeros(e - s, dtype=torch.float64, device=rows.device)
        for row in rows:
            acc += row[s:e]
        out[s:e] = distributed.all_reduce_sum(acc) / count
    return out


def streamed_mean(paths, members, names, sizes, reference, count, out):
    """The group's mean without holding its rows: this rank's ingredients summed one at a time into
    `out`."""
    out.zero_()
    for i in members:
        out += load_rows(paths, [i], names, sizes, reference, out.dtype, out.device)[0]
    return distributed.all_reduce_sum(out).div_(count)


def directions(paths, members, count, layout, reference, soup, dtype, first):
    """(center, P, inv_norms) of a group. The center is the soup itself (`soup.theta`, returned as it
    is): the current soup, or for the first group the group's mean, written into the soup. P holds this
    rank's unit directions in `dtype`."""
    args = (paths, members, layout.names, layout.sizes, reference)
    center = soup.theta
    if dtype == center.dtype:
        rows = load_rows(*args, dtype, center.device)
        if first:
            group_mean(rows, count, out=center)
        P, inv_norms = hyperplane.directions_(rows, center, layout.bounds)
        return center, P, inv_norms
    if first:
        streamed_mean(*args, count, out=center)
    P = load_rows(*args, dtype, center.device, center=center)
    return center, P, hyperplane.normalise_(P, layout.bounds)


def gradient(model, soup, batch, n_global, labelsmooth):
    """Fill `soup.grad` with the gradient of the mean loss over the global batch, summed over ranks
    (each rank's loss is a sum over its examples divided by the global batch size); returns the loss,
    summed over ranks, as a 1-element tensor on the device (read it once per logging interval, not per
    step: reading it waits for the device). `model` is the model, or a function of the batch's inputs
    giving its logits (MEHL passes the rest of the model when the inputs are a frozen prefix's outputs,
    utils/run/prefix.py)."""
    soup.grad.zero_()
    if batch is None:
        loss = torch.zeros(1, device=soup.theta.device)
    else:
        x, y = batch
        # from page-locked memory on CUDA (sampling.RankLoader), so neither copy waits for the device
        x, y = x.to(soup.theta.device, non_blocking=True), y.to(soup.theta.device, non_blocking=True)
        batch_loss = F.cross_entropy(model(x), y, label_smoothing=labelsmooth,
                                     reduction="sum") / n_global
        batch_loss.backward()
        loss = batch_loss.detach().reshape(1)
    distributed.all_reduce_sum(soup.grad)
    return distributed.all_reduce_sum(loss)


def check_fast_path(P, bounds, vector, scratch):
    """Which path the block products take in this process: "kernels" when the fast path
    (`utils.soup.segmented`) runs here and agrees with the per-block loop on the run's own rows P, else
    "loop". Compared: the projection of `vector` (the soup), and the combine of that projection, written
    into `scratch` (the gradient's buffer, free between steps) and checked slice by slice; each relative
    to the loop's largest value, within SELF_CHECK_TOLERANCE. On a mismatch or an error the fast path is
    turned off for the process, said once (`segmented.turn_off`). One read from the device; run once, on
    the first group (a miscompile or a fault on a user's card would otherwise go unnoticed)."""
    if not segmented.supports(P, vector, bounds):
        return "loop"
    try:
        fast = segmented.project(P, vector, bounds)
        if fast is None:  # the kernels failed to compile or run: said, and off
            return "loop"
        loop = hyperplane.project_blocks(P, vector, bounds)
        worst = ((fast - loop).abs().max() / loop.abs().max().clamp_min(1e-30)).reshape(1)
        if segmented.combine(loop, P, bounds, scratch) is None:
            return "loop"
        diff = torch.zeros(1, dtype=torch.float32, device=P.device)
        top = torch.zeros(1, dtype=torch.float32, device=P.device)
        X = loop.to(torch.float32)
        for b, (start, stop) in enumerate(bounds):
            for s in range(start, stop, hyperplane.SLICE):
                e = min(s + hyperplane.SLICE, stop)
                ref = torch.mv(P[:, s:e].to(torch.float32).T, X[:, b])
                diff = torch.maximum(diff, (scratch[s:e] - ref).abs().max())
                top = torch.maximum(top, ref.abs().max())
        worst = float(torch.maximum(worst, diff / top.clamp_min(1e-30)))
    except segmented.OUT_OF_MEMORY:
        raise
    except Exception as err:  # an asynchronous fault surfaces here, at the read
        segmented.turn_off(f"self-check: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}")
        return "loop"
    if not worst <= SELF_CHECK_TOLERANCE:  # NaN too
        segmented.turn_off(f"self-check on the run's own rows: the kernels' products differ from the "
                           f"per-block loop's by {worst:.1e} of the largest value (at most "
                           f"{SELF_CHECK_TOLERANCE:g} expected)")
        return "loop"
    return "kernels"


def products_record(checked):
    """(path, why) of a group's block products (docs/GUARANTEES.md): "kernels" when `check_fast_path`
    said so (`checked`) and the fast path was not turned off after it, else "loop" and why."""
    if checked == "kernels" and segmented.failure is None:
        return "kernels", None
    return "loop", segmented.failure or "the fast path does not run here (it runs on CUDA with Triton)"


def clip_factor(grad, max_norm=1.0):
    """min(1, max_norm / (||grad|| + 1e-6)), the factor of `clip_grad_norm_`, as a device scalar."""
    return (max_norm / (torch.linalg.vector_norm(grad) + 1e-6)).clamp_(max=1.0)


def step(model, soup, learner, bounds, batch, n_global, labelsmooth=0.0, clip=False):
    """One MEHL step: the gradient at the soup (the model's parameters), clipped to norm 1 for ViTs as
    released, projected onto the directions, an optimizer step on X at the schedule's lr, and the soup
    moved by sum_i (X_new - X_old)[i, b] P[i, b] in place (it starts at the center, X at 0, so it stays
    center + sum_i X[i, b] P[i, b] up to float rounding). No value is read back from the device: returns
    the batch loss as a device tensor, and records the first step after which the soup was not finite
    in `learner.first_bad` (read both with `StepLog`)."""
    if learner.step == 0 and learner.center is not soup.theta:
        with torch.no_grad():
            soup.theta.copy_(learner.center)
    loss = gradient(model, soup, batch, n_global, labelsmooth)
    dX = hyperplane.project(learner.P, soup.grad, bounds, scale=clip_factor(soup.grad) if clip else None)
    learner.X.grad = dX.to(learner.X.dtype)
    set_lr(learner.optimizer, learner.schedule(learner.step))
    before = learner.X.detach().clone()
    learner.optimizer.step()
    learner.step += 1
    with torch.no_grad():
        move = learner.X.detach() - before
        if distributed.is_distributed():
            # each rank holds its own rows: their sum goes through the gradient's buffer, free until
            # the next backward pass
            hyperplane.combine(move, learner.P, bounds, out=soup.grad)
            soup.theta.add_(distributed.all_reduce_sum(soup.grad))
        else:
            hyperplane.combine(move, learner.P, bounds, out=soup.theta, accumulate=True)
        # NaN propagates through min and max (documented), and an Inf is one of them: exact, one pass
        bad = ~torch.isfinite(torch.stack(torch.aminmax(soup.theta))).all()
        learner.first_bad = torch.where(bad & (learner.first_bad == 0), learner.step, learner.first_bad)
    return loss


class StepLog:
    """The losses of a group's steps, kept on the device and read every `every` steps and at the end of
    an epoch (`flush`), together with the group's non-finite flag: one host sync per read, none per
    step."""

    def __init__(self, learner, label, lr, every=None):
        self.learner, self.label, self.lr = learner, label, lr
        self.every = every or LOG_EVERY
        self.pending = []

    def add(self, loss, n_global, lr):
        self.pending.append((loss.reshape(1), n_global, lr))

    def due(self):
        return len(self.pending) >= self.every

    def flush(self, bar=None, wandb=None):
        """Log the pending steps (the bar's postfix, one wandb line per step) and return the sum of
        loss x global batch size over them. Raises a one-line UserError when the soup went non-finite
        (`mehl_state.check_finite`)."""
        if not self.pending:
            return 0.0
        values = torch.cat([torch.cat([loss for loss, _, _ in self.pending]).double(),
                            self.learner.first_bad.reshape(1).double()]).tolist()
        mehl_state.check_finite(int(values[-1]), self.label, self.lr)
        total = 0.0
        for value, (_, n, lr) in zip(values, self.pending):
            total += value * n
            if wandb is not None:
                wandb.log({"loss": value, "lr": lr})
        if bar is not None:
            bar.set_postfix(loss=f"{values[-2]:.4f}")
        self.pending = []
        return total


def products_agreed(checked, device):
    """`products_record` of a group, "kernels" only where every rank ran them."""
    products, why = products_record(checked)  # this group's path (turned off since?)
    if distributed.is_distributed():
        on_loop = distributed.all_reduce_sum(torch.tensor([float(products != "kernels")], device=device))
        if products == "kernels" and float(on_loop) > 0:
            products, why = "loop", "another rank ran the per-block loop"
    return products, why


def products_of(groups):
    """The results line's `block_products` ("kernels" when every group's steps ran the fast path, else
    "loop") and `block_products_why` (the first group's reason for the loop), from the groups' log, which
    the resume state keeps (docs/GUARANTEES.md)."""
    paths = [g.get("block_products") for g in groups]
    if paths and all(p == "kernels" for p in paths):
        return "kernels", None
    why = next((g.get("block_products_why") for g in groups if g.get("block_products_why")), None)
    return "loop", why or "not recorded (groups learned before the path was recorded)"


def start_model(model, layout, base):
    """Load the starting state dict, and make the learned parameters one flat soup vector; only they
    get gradients."""
    model.load_state_dict(base)
    learned = set(layout.names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in learned)
    return FlatSoup(model, layout.names)


class Ledger:
    """What happens at the edges of Algorithm 1's loops (MEHL_soup_layer.py `learn`, whose `Run` it
    reads) besides the algorithm: progress bars, the losses read from the device (`StepLog`), the
    per-epoch test accuracy (logged only, never used), the fast path's self-check and record, and after
    every group the resume state saved and --stop-after-groups."""

    def __init__(self, run, progress):
        self.run, self.done_here, self.started, self.seconds = run, 0, time.time(), progress.seconds
        self.primary, self.block_products = distributed.is_primary(), None
        self.groups_bar = tqdm(total=run.models_epochs * math.ceil(len(run.paths) / run.k),
                               initial=len(progress.groups), desc="groups", disable=not self.primary)
        self.label = len(progress.groups)

    def start_group(self, steps, P):
        if self.block_products is None:  # the first group of this process: the fast path against the loop
            soup = self.run.soup
            self.block_products = check_fast_path(P, self.run.layout.bounds, soup.theta, soup.grad)
        self.label, self.tests = self.label + 1, []
        self.bar = tqdm(total=steps, desc=f"group {self.label}", leave=False, disable=not self.primary)

    def start_epoch(self, learner):
        self.epoch_loss, self.steps = 0.0, StepLog(learner, self.label, self.run.lr)

    def after_step(self, learner, loss, n_global):
        self.steps.add(loss, n_global, learner.schedule(learner.step - 1))
        self.bar.update()
        if self.steps.due():  # losses and the non-finite flag are read every LOG_EVERY steps
            self.epoch_loss += self.steps.flush(self.bar, self.run.wandb)

    def after_epoch(self, learner, epoch):
        run, setup = self.run, self.run.setup
        self.epoch_loss += self.steps.flush(self.bar, run.wandb)
        learner.losses.append(self.epoch_loss / len(setup.bundle.heldout))
        if run.epoch_test:  # logged only, never used to choose anything
            test = inputs.evaluation(setup.model, setup.device, setup.batch_size, setup.workers, setup.precision)
            self.tests.append(evaluate_all(test, setup.bundle, setup.device, setup.batch_size, heldout=False,
                                           shifts=False)["test"])
            run.wandb.log({"epoch_test": self.tests[-1], "epoch_loss": learner.losses[-1]})
        if self.primary:
            log.info("group %d epoch %d: held-out loss %.4f%s", self.label, epoch + 1, learner.losses[-1],
                     f", test {self.tests[-1]:.2f} (logged only)" if self.tests else "")

    def after_group(self, progress, group, losses, last):
        """Log the group, save the resume state; True when --stop-after-groups stops the run here."""
        self.bar.close()
        self.steps = None  # it holds the group's learner, hence its K rows: not into the next group
        products, why = products_agreed(self.block_products, self.run.setup.device)
        progress.groups.append({"models_epoch": progress.models_epoch, "group": progress.next_group,
                                "ingredients": [index_of(self.run.paths[i]) for i in group],
                                "heldout_loss": losses, "test_logged_only": self.tests,
                                "block_products": products, "block_products_why": why})
        progress.next_group += 1
        progress.seconds = self.seconds + time.time() - self.started
        mehl_state.save(self.run.state_path, progress.state(self.run.config, self.run.soup.theta))
        self.groups_bar.update()
        self.done_here += 1
        stop = self.run.stop_after_groups and self.done_here >= self.run.stop_after_groups and not last
        if stop:
            self.close()
        return stop

    def close(self):
        self.groups_bar.close()


def log_start(method, setup, layout, n, k, directions_dtype):
    if distributed.is_primary():
        identical = sum(setup.reference[name].numel() for name in layout.identical)
        log.info("%s: %d ingredients, K=%d, %d block(s) over %d learned parameter tensors (%d numbers, "
                 "directions in %s); %d parameter tensor(s) identical in all ingredients kept as they are "
                 "(%d numbers); BatchNorm: %s", method, n, k, layout.num_blocks, len(layout.names),
                 layout.numel, directions_dtype, len(layout.identical), identical,
                 "statistics identical, eval mode" if layout.frozen_stats else "statistics differ, "
                 "train mode, re-estimated at the end")
