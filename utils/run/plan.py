"""MEHL-Soup's memory plan: the peak a run will reach for a given K (--model_batch), and the largest K
that fits the device (`--model_batch auto`).

What a step holds (utils/run/mehl.py lists every tensor): above a plain forward/backward of the same
model whose gradient is one flat vector from the start (MEHL's `FlatSoup`, as measured here), the K rows
of directions of this rank (ceil(K / world size) under torchrun) in the directions' dtype: K ingredients'
learned parameters (K / 2 with bfloat16 directions). No center is held (the soup is the center). While a
row loads, the checkpoint being read sits beside the rows; it is read into host memory, so it counts on
a CPU and not on a GPU. With half-precision rows the first group's mean is summed one ingredient at a
time, each loaded as a row of the soup's dtype: that row is held while they load too.

What is kept free: MARGIN of the capacity, and on CUDA CUDA_HEADROOM more, for what the plan does not
count: the fast path's partial sums (K x D / 1024 numbers), the per-block loop's float32 slices of
half-precision rows (K x 2**20 numbers), the first group's self-check, the caching allocator's rounding.
On CUDA the run's allocator also uses expandable segments (`prepare_allocator`: a segment grows in place,
so K rows and the step's activations do not fragment the memory into pieces none of them fits), unless
PYTORCH_CUDA_ALLOC_CONF sets them itself, and the blocks the plain step's measurement left cached are
released before the first group's rows are allocated (`release_cached`).

The plain step's own peak is measured, not estimated: its activations depend on the architecture, the
batch, the kernels and the allocator, which no formula here knows. One forward/backward on one held-out
batch of the run's size (this rank's share) is run before learning: on CUDA its peak is
`torch.cuda.max_memory_allocated` after a reset; on a CPU it is the process's resident memory, its
VmHWM when the step raised it, otherwise the largest VmRSS sampled while the step ran (the process's
high-water mark may come from reading the ingredients earlier, which says nothing about the step).
"""
import argparse
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import default_collate

from utils.run import inputs, mehl
from utils.run.batchnorm import set_mode
from utils.runtime import distributed
from utils.runtime.errors import UserError
from utils.runtime.memory import gib, mem_available, resident_peak_bytes, status_bytes
from utils.soup import segmented

log = logging.getLogger("MEHL_soup")

MARGIN = 0.05                 # of the capacity kept free: allocator fragmentation, other processes
CUDA_HEADROOM = 2**28         # bytes kept free on CUDA besides (see the module's docstring)
CARD_BYTES = 24 * 2**30       # the launchers' 24 GB card ...
CARD_CONTEXT_BYTES = 2**29    # ... less what the CUDA context and the kernels take before any tensor
SAMPLE_SECONDS = 0.0005


@dataclass(frozen=True)
class Footprint:
    """Bytes a MEHL run holds, from which its peak follows for any K."""
    plain_peak: int           # one plain forward/backward, measured
    resident: int             # what the process holds between steps (after the plain step)
    row: int                  # one row of directions (D numbers in the directions' dtype)
    soup_row: int             # one row in the soup's dtype (D numbers), summed into the first group's mean
    checkpoint: int           # one checkpoint being read into this device's memory (0 on a GPU)
    halved: bool              # rows in half precision: the first group's mean is summed row by row
    so_far: int = 0           # the process's peak before learning (a run never peaks lower)


def rows_per_rank(k, world):
    """The most rows one rank holds: the first K mod world ranks take one more."""
    return -(-k // world)


def step_peak(fp, k, world=1):
    """The peak of learning with groups of K: the larger of a step (plain + rows) and of loading a row
    (what stays resident + rows + the checkpoint being read, and with half-precision rows the row of
    the soup's dtype being summed)."""
    rows = rows_per_rank(k, world) * fp.row
    beside = fp.checkpoint + (fp.soup_row if fp.halved else 0)
    return max(fp.plain_peak + rows, fp.resident + rows + beside)


def predicted_peak(fp, k, world=1):
    """The process's predicted peak for the run: the step's, or an earlier one if that was higher."""
    return max(fp.so_far, step_peak(fp, k, world))


def budget(capacity, device_type):
    """The bytes a run's step may peak at: `capacity` less MARGIN, and on CUDA less CUDA_HEADROOM."""
    return capacity * (1 - MARGIN) - (CUDA_HEADROOM if device_type == "cuda" else 0)


def largest_k(fp, capacity, n, world=1, device_type="cpu"):
    """The largest K in [1, n] whose step peak fits `capacity` bytes less what is kept free (`budget`);
    0 when even K = 1 does not fit (a larger K than n is one group of all n: no more memory, no other
    result)."""
    budget_bytes = budget(capacity, device_type)
    best = 0
    for k in range(1, n + 1):
        if step_peak(fp, k, world) > budget_bytes:
            break
        best = k
    return best


def card_k(fp, n, world=1):
    """The K that the launchers' 24 GB card would take, with this run's plain step."""
    return largest_k(fp, CARD_BYTES - CARD_CONTEXT_BYTES, n, world, device_type="cuda")


# ------------------------------------------------------------------------------------- devices
def capacity_bytes(device, limit_gib=None, local_world=1):
    """What this process may peak at: on CUDA the device's free memory plus what this process's
    allocator already holds; on a CPU its share of MemAvailable (processes of one host share it) plus
    what it holds; at most `limit_gib` (--memory-limit). None when nothing is known."""
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    else:
        available, rss = mem_available(), status_bytes("VmRSS")
        have = None if available is None else available // max(1, local_world) + (rss or 0)
    if limit_gib is not None:
        limit = int(limit_gib * 2**30)
        have = limit if have is None else min(have, limit)
    return have


def prepare_allocator(device):
    """On CUDA, make the caching allocator's new segments expandable for the rest of the run (see the
    module's docstring), unless PYTORCH_CUDA_ALLOC_CONF names expandable_segments itself. Returns
    whether they are on."""
    if device.type != "cuda":
        return False
    if "expandable_segments" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return "expandable_segments:true" in os.environ["PYTORCH_CUDA_ALLOC_CONF"].replace(" ", "").lower()
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        return True
    except (AttributeError, RuntimeError):  # a torch or platform without them: the margins still hold
        return False


def release_cached(device):
    """Hand the blocks cached by the plain step's measurement back (CUDA), so that the first group's rows
    are allocated before the step's activations are cached again."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Sampler(threading.Thread):
    """The largest VmRSS seen while it runs (torch releases the GIL inside its kernels)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = status_bytes("VmRSS") or 0, threading.Event()

    def run(self):
        while not self.done.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, status_bytes("VmRSS") or 0)


def measure(step, device):
    """(peak, resident) bytes of running `step()` once: the peak while it ran and what is held
    after it (see the module's docstring for how each device measures)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    before = resident_peak_bytes()
    sampler = _Sampler()
    sampler.start()
    try:
        step()
    finally:
        sampler.done.set()
        sampler.join()
    resident = status_bytes("VmRSS") or 0
    after = resident_peak_bytes()
    return (after if after > before else max(sampler.peak, resident)), resident


def so_far(device):
    """The process's peak until now, before `measure` resets CUDA's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_peak_bytes()


def local_world_size():
    return distributed.local_world_size()


# --------------------------------------------------------------------------------------- report
def describe(fp, k, how, n, world, device, capacity, fits, numel, dtype, batch):
    """The plan's lines, as printed before learning."""
    rows = rows_per_rank(min(k, n), world)
    where = "host memory: counted" if fp.checkpoint else "read into host memory: not on this device"
    lines = [
        f"K = {k} ({how}); predicted peak {gib(predicted_peak(fp, min(k, n), world))} "
        f"({predicted_peak(fp, min(k, n), world)} bytes) on {device}",
        f"a plain forward/backward on one held-out batch of {batch}, measured before learning: "
        f"{gib(fp.plain_peak)}; a step holds {rows} row(s) of directions above it ({numel / 1e6:.2f} M "
        f"learned numbers in {dtype}: {gib(fp.row)} each{'' if world == 1 else f', this rank of {world}'}) "
        f"; while a row loads, the checkpoint being read ({where}{', ' + gib(fp.checkpoint) if fp.checkpoint else ''})"
        + (f" and a row of the soup's dtype ({gib(fp.soup_row)})" if fp.halved else ""),
    ]
    if capacity is None:
        lines.append("available memory unknown: no K is ruled out")
    else:
        kept = f"{int(MARGIN * 100)} %" + (f" and {gib(CUDA_HEADROOM)}" if device.type == "cuda" else "")
        lines.append(f"available {gib(capacity)} ({kept} kept free): "
                     + (f"K up to {fits} of {n} fits" if fits else "not even K = 1 fits"))
    card = card_k(fp, n, world)
    lines.append(f"a 24 GB card ({gib(CARD_BYTES - CARD_CONTEXT_BYTES)} usable, {int(MARGIN * 100)} % and "
                 f"{gib(CUDA_HEADROOM)} kept free) "
                 f"would take K = {card or 'none: not even K = 1'}"
                 + ("" if device.type == "cuda" else " (with this device's plain step: a GPU's differs)"))
    return lines


# ------------------------------------------------------------------------- --model_batch and K
def footprint(setup, layout, soup, paths, batch, *, batch_size, workers, precision, labelsmooth,
              directions_dtype):
    """The run's `Footprint` and the batch it measured: one plain forward/backward on the first `batch`
    held-out items (the rank's share of a batch), measured; the model's buffers (BatchNorm statistics
    that a train-mode forward updates) and the gradient are put back as they were, so the run is
    unchanged."""
    saved = [b.detach().clone() for b in setup.model.buffers()]
    set_mode(setup.model, layout.frozen_stats)  # as learning: a frozen prefix stands in only in eval mode
    held = inputs.learning(setup.model, setup.bundle.heldout, setup.device, batch_size, workers, layout.names,
                           precision)
    items = default_collate([held.dataset[i] for i in range(min(batch, len(held.dataset)))])
    batch = len(items[1])
    before = so_far(setup.device)
    peak, resident = measure(lambda: mehl.gradient(held.forward, soup, items, batch_size, labelsmooth),
                             setup.device)
    with torch.no_grad():
        for b, value in zip(setup.model.buffers(), saved):
            b.copy_(value)
        soup.grad.zero_()
    checkpoint = 0
    if setup.device.type == "cpu":  # read into host memory: on a GPU it is not on the device
        checkpoint = max(sum(v.numel() * v.element_size() for v in setup.reference.values()),
                         max(Path(p).stat().st_size for p in paths))
    dtype = mehl.DTYPES[directions_dtype]
    width = segmented.padded(layout.numel)  # the rows' stride (mehl.load_rows)
    return Footprint(plain_peak=peak, resident=resident, row=width * dtype.itemsize,
                     soup_row=width * soup.theta.element_size(), checkpoint=checkpoint,
                     halved=dtype.itemsize < soup.theta.element_size(), so_far=before), batch


def agreed_minimum(k, n, device):
    """The smallest of every rank's `k` (in [0, n])."""
    if not distributed.is_distributed():
        return k
    votes = torch.zeros(n + 1, dtype=torch.float64, device=device)
    votes[k] = 1
    distributed.all_reduce_sum(votes)
    return int(torch.nonzero(votes)[0])


def choose_k(setup, layout, soup, paths, model_batch, resumed, *, memory_limit, batch_size, workers,
             precision, labelsmooth, directions_dtype):
    """Measure the plain step, fix K and print the plan; returns K. K is `model_batch` (--model_batch)
    as given; with 'auto', `resumed` (the K the resumed run started with) or the largest that fits."""
    n, world = len(paths), distributed.world_size()
    prepare_allocator(setup.device)  # expandable segments on CUDA, for the measurement and the run
    fp, batch = footprint(setup, layout, soup, paths, -(-batch_size // world), batch_size=batch_size,
                          workers=workers, precision=precision, labelsmooth=labelsmooth,
                          directions_dtype=directions_dtype)
    release_cached(setup.device)  # the first group's rows come before the step's activations
    capacity = capacity_bytes(setup.device, memory_limit, local_world_size())
    fits = agreed_minimum(n if capacity is None else largest_k(fp, capacity, n, world, setup.device.type),
                          n, setup.device)
    if model_batch != "auto":
        k, how = model_batch, "--model_batch as given"
    elif resumed is not None:
        k, how = resumed, "chosen by --model_batch auto when this run started, from its state"
    elif fits:
        k, how = fits, "--model_batch auto: the largest that fits"
    else:
        limited = " (--memory-limit)" if memory_limit is not None else ""
        raise UserError(f"--model_batch auto: not even K = 1 fits: its predicted peak is "
                        f"{gib(predicted_peak(fp, 1, world))}, {gib(capacity)} is available{limited}; free "
                        "memory, use bfloat16 directions (--directions-dtype), a smaller --batch-size or more "
                        "processes (torchrun)")
    if distributed.is_primary():
        for line in describe(fp, k, how, n, world, setup.device, capacity, fits, layout.numel, directions_dtype,
                             batch):
            log.info("plan: %s", line)
        if capacity is not None and step_peak(fp, min(k, n), world) > budget(capacity, setup.device.type):
            log.warning("plan: K = %d is predicted to need more than the %s available (%s)", k, gib(capacity),
                        f"K = {fits} would fit" if fits else "not even K = 1 fits")
    return k


def model_batch_value(text):
    """--model_batch: a whole number, or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a whole number or 'auto', got {text!r}") from None
