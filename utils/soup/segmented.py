"""The block products of `utils.soup.hyperplane` in a fixed number of kernel launches, whatever the
number of blocks: a segmented matrix-vector product in Triton (`utils/soup/segmented_kernels.py`).

Why: on a GPU, the per-block loop launches one `mv` per block and per product (2 x 154 for ViT-B/32
with one block per tensor, plus a `dX[:, b] +=` each): a fixed cost per step that does not shrink with
the rows. Here `project` is two launches (per-chunk partial sums, then per-block sums of the partials:
no atomics, so the result is the same from run to run) and `combine` one; rows stored in bfloat16 or
float16 are loaded as they are and converted in registers, so every sum accumulates in float32 and no
cast copy is made. The launch grid is over column chunks, each with a small table of the blocks that
cut it (`_plan`, built once per layout and device).

Where it runs: CUDA tensors when Triton is importable, and CPU tensors when Triton interprets its
kernels (TRITON_INTERPRET=1: tests compare it with the per-block loop there). On a CPU the per-block
loop stays in use: a BLAS `mv` per block reads the rows at the memory's bandwidth, and an op costs
microseconds, not a launch. Rows in float32, bfloat16 or float16; the vector and output in float32.
"""
import functools
import logging
import os

import torch

log = logging.getLogger(__name__)

COLS = 1024       # columns per program
MAX_ROWS = 16     # rows per tile of a program (sm_90 and later)
WARPS = 16        # warps per program (sm_90 and later)
# Before sm_90 (A100 sm_80, consumer Ampere/Ada sm_86/sm_89): 16-row tiles take about 112 registers a
# thread in `combine` (ptxas of Triton 3.8), so one 512-thread program fills an SM's 64K registers and it
# runs 16 warps (of 48 on sm_86); 8-row tiles take 64, two programs fit: 32 warps. The rows are read
# once either way; `project_partials` reads the gradient once per tile of rows. tests/test_segmented_kernels.py
# compiles both for sm_80, sm_86 and sm_90 and checks it.
TILES_BEFORE_SM90 = (1024, 8, 16)  # (columns, rows, warps)
SEGS = 256        # partial sums read at once by a block's program
ALIGN = 16        # row strides are padded to a multiple of this many numbers (`padded`)
ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
failure = None    # why the kernels could not run in this process (then the per-block loop runs)
# torch.OutOfMemoryError exists from torch 2.5 on, as this same class; 2.4 (which requirements.txt
# allows) has only this name
OUT_OF_MEMORY = torch.cuda.OutOfMemoryError


def interpreting():
    """Whether Triton interprets its kernels on the CPU (its own switch, TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _kernels(interpret):
    """The compiled (or, with `interpret`, interpreted) kernels; None without Triton, or when importing
    it or the kernels' source fails otherwise (said once: `turn_off`; segmented_kernels.py reads a
    private name of Triton, which a later version may not have). `triton.jit` decides between compiled
    and interpreted when it is called, from TRITON_INTERPRET, hence the cache key."""
    try:
        import triton
    except ImportError:
        return None
    except Exception as err:  # a broken install: anything but "not installed" is said
        turn_off(f"import triton: {_why(err)}")
        return None
    try:
        from utils.soup import segmented_kernels as src
        return {name: triton.jit(getattr(src, name))
                for name in ("project_partials", "project_blocks", "combine")}
    except Exception as err:
        turn_off(f"the kernels' source: {_why(err)}")
        return None


def _why(err):
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def turn_off(reason):
    """Use the per-block loop for the rest of this process, and say why once."""
    global failure
    if failure is None:
        failure = reason
        log.warning("the fixed-launch block products are off in this process (%s); the per-block loop "
                    "runs instead", reason)


def padded(width):
    """The row stride of rows `width` wide: the next multiple of ALIGN. With it (and 16-byte aligned rows)
    the kernels load 128 bits at a time (segmented_kernels.py)."""
    return -(-width // ALIGN) * ALIGN


def empty_rows(n, width, dtype, device):
    """An (n, width) tensor whose rows are `padded(width)` apart, the padding zeroed: what a run's
    directions are loaded into. Every op sees only its `width` columns; the kernels may load the padding
    but never sum it (segmented_kernels.py)."""
    whole = torch.empty(n, padded(width), dtype=dtype, device=device)
    whole[:, width:].zero_()
    return whole[:, :width]


def _loadable(P):
    """Columns of each row of P that the kernels may load: its stride when P is a padded view whose
    storage holds the padding of every row (`empty_rows`), else its width."""
    n, width = P.shape
    stride = P.stride(0)
    if stride % ALIGN == 0 and stride >= width and P.data_ptr() % 16 == 0 and \
            (P.storage_offset() + n * stride) * P.element_size() <= P.untyped_storage().nbytes():
        return stride
    return width


def tiles_for(capability):
    """(columns, rows, warps) of a program on a GPU of compute `capability` (major, minor); None: not a
    GPU (Triton's interpreter). See TILES_BEFORE_SM90."""
    if capability is not None and capability[0] < 9:
        return TILES_BEFORE_SM90
    return COLS, MAX_ROWS, WARPS


def tiles(device):
    return tiles_for(torch.cuda.get_device_capability(device) if device.type == "cuda" else None)


def _on_device(t):
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpreting())


def supports(P, vector, bounds):
    """Whether the fast path can take rows P (n, D) with `vector` (the gradient, or the combine's output)
    and `bounds`: the device (above), dtypes, unit column strides, and blocks that tile [0, D) in order."""
    if not (_on_device(P) and vector.device == P.device and P.dim() == 2 and P.shape[0] > 0
            and P.dtype in ROW_DTYPES and vector.dtype == torch.float32 and P.stride(1) == 1
            and vector.dim() == 1 and vector.is_contiguous() and vector.numel() == P.shape[1] > 0):
        return False
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != P.shape[1]:
        return False
    if any(stop < start for start, stop in bounds) or \
            any(bounds[b][1] != bounds[b + 1][0] for b in range(len(bounds) - 1)):
        return False
    return failure is None and _kernels(interpreting()) is not None


def _launch(name, grid, *args, **meta):
    """Launch one kernel; when Triton cannot compile or run it here, say so once (`turn_off`) and return
    False (the caller falls back to the per-block loop). A compile error comes before the kernel writes
    anything. Running out of device memory is not the kernels' fault: it is raised."""
    try:
        _kernels(interpreting())[name][grid](*args, **meta)
        return True
    except OUT_OF_MEMORY:
        raise
    except Exception as err:  # a Triton version or device these kernels do not compile for
        turn_off(f"{name}: {_why(err)}")
        return False


@functools.lru_cache(maxsize=16)
def _plan(bounds, n_cols, device, cols):
    """Segment tables (see segmented_kernels.py) of a layout: a segment starts at every chunk start and
    at every block start, and belongs to the last block starting at or before it (empty blocks own
    none)."""
    starts = torch.tensor([s for s, _ in bounds], dtype=torch.int64)
    chunk_starts = torch.arange(0, n_cols, cols, dtype=torch.int64)
    seg_start = torch.unique(torch.cat([starts[starts < n_cols], chunk_starts]))  # sorted
    seg_stop = torch.cat([seg_start[1:], torch.tensor([n_cols])])
    seg_block = (torch.searchsorted(starts, seg_start, right=True) - 1).to(torch.int32)
    ends = torch.tensor([n_cols])
    chunk_first = torch.searchsorted(seg_start, torch.cat([chunk_starts, ends]))
    block_first = torch.searchsorted(seg_start, torch.cat([starts, ends]))
    return {"n_segs": len(seg_start), "n_chunks": len(chunk_starts),
            **{k: v.to(device) for k, v in (("seg_stop", seg_stop), ("seg_block", seg_block),
                                            ("chunk_first", chunk_first), ("block_first", block_first))}}


def _rows_per_tile(n, max_rows):
    return min(max_rows, max(2, 1 << (n - 1).bit_length()))


def project(P, g, bounds, scale=None):
    """dX[i, b] = <P[i, b], g_b> as an (n, B) float32 tensor, times the device scalar `scale` when given
    (the ViT clip factor: the projection is linear, so clipping g and scaling dX agree). Two launches.
    None when the kernels cannot run here (see `_launch`)."""
    n, D = P.shape
    cols, max_rows, warps = tiles(P.device)
    plan = _plan(tuple(map(tuple, bounds)), D, P.device, cols)
    rows = _rows_per_tile(n, max_rows)
    partials = torch.empty(n, plan["n_segs"], dtype=torch.float32, device=P.device)
    dX = torch.empty(n, len(bounds), dtype=torch.float32, device=P.device)
    if scale is None:
        scale = torch.ones(1, dtype=torch.float32, device=P.device)
    with torch.profiler.record_function("segmented.project"):
        done = _launch("project_partials", (plan["n_chunks"], -(-n // rows)), P, g, partials,
                       plan["chunk_first"], plan["seg_stop"], n, D, P.stride(0), _loadable(P), plan["n_segs"],
                       ROWS=rows, COLS=cols, num_warps=warps) and \
            _launch("project_blocks", (len(bounds), -(-n // rows)), partials, dX, plan["block_first"],
                    scale.reshape(1), n, plan["n_segs"], len(bounds), ROWS=rows, SEGS=SEGS, num_warps=4)
    return dX if done else None


def combine(X, P, bounds, out, accumulate=False):
    """out[j] = sum_i X[i, b] P[i, j] for j in block b, added to out when `accumulate`. One launch.
    None when the kernels cannot run here (see `_launch`)."""
    n, D = P.shape
    cols, max_rows, warps = tiles(P.device)
    plan = _plan(tuple(map(tuple, bounds)), D, P.device, cols)
    X = X.detach().to(device=P.device, dtype=torch.float32).contiguous()
    with torch.profiler.record_function("segmented.combine"):
        done = _launch("combine", (plan["n_chunks"],), P, X, out, plan["chunk_first"], plan["seg_stop"],
                       plan["seg_block"], n, D, P.stride(0), _loadable(P), len(bounds), ACCUMULATE=accumulate,
                       ROWS=_rows_per_tile(n, max_rows), COLS=cols, num_warps=warps)
    return out if done else None
