"""Triton sources of the block products of `utils.soup.segmented`, kept as plain functions: that module
compiles them with `triton.jit` when first used, so the same source runs compiled on CUDA and
interpreted on CPU tensors (TRITON_INTERPRET=1, in tests).

The flat vector of D numbers is cut into chunks of COLS columns, and each chunk into segments where a
block boundary falls inside it; `chunk_first[c]` is the first segment of chunk c, `seg_stop[s]` the end
of segment s, `seg_block[s]` its block, `block_first[b]` the first segment of block b (a block's
segments are consecutive). One program reads a tile of rows x COLS columns of P once, in P's own dtype,
and accumulates in float32.

Loads of P are 128 bits wide only when Triton can prove that every group of 16 columns is wholly in or
out of the mask: the row stride and the bound of the column mask divisible by 16 (Triton specialises an
integer argument that is), and P 16-byte aligned. The rows of a run are padded to such a stride
(`segmented.padded`), so the mask's bound `p_cols` is the stride, not D: the padding may be loaded, but
a column j >= n_cols is outside every segment, so it is never summed (`inside`) nor stored (`col_ok`).
"""
import triton.language as tl

# Only Triton's builtins here (tl.full, tl.reduce with tl.sum's own combine function, which the
# interpreter runs with numpy), not its library functions (tl.sum, tl.zeros): those are made when Triton
# is imported, compiled or interpreted as TRITON_INTERPRET said then, while these kernels are made when
# first used, so they also interpret in a process that imported Triton before (torch.optim does).
SUM = tl.standard._sum_combine


def project_partials(P, g, partials, chunk_first, seg_stop, n_rows, n_cols, row_stride, p_cols, n_segs,
                     ROWS: tl.constexpr, COLS: tl.constexpr):
    """partials[i, s] = sum over the columns j of segment s of P[i, j] * g[j]; one program per column
    chunk and tile of ROWS rows. P's columns up to `p_cols` may be loaded (its padding, see the module's
    docstring); only those below `n_cols` are summed."""
    chunk = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = chunk * COLS + tl.arange(0, COLS)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    tile = tl.load(P + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                   mask=row_ok[:, None] & (cols < p_cols)[None, :], other=0.0).to(tl.float32)
    prod = tile * tl.load(g + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    start = chunk * COLS
    for s in range(tl.load(chunk_first + chunk), tl.load(chunk_first + chunk + 1)):
        stop = tl.load(seg_stop + s)
        inside = (cols >= start) & (cols < stop)
        part = tl.reduce(tl.where(inside[None, :], prod, 0.0), 1, SUM)
        tl.store(partials + rows.to(tl.int64) * n_segs + s, part, mask=row_ok)
        start = stop


def project_blocks(partials, dX, block_first, scale, n_rows, n_segs, n_blocks,
                   ROWS: tl.constexpr, SEGS: tl.constexpr):
    """dX[i, b] = scale * (sum of partials[i, s] over the segments s of block b); one program per block
    and tile of ROWS rows. Deterministic: no atomics."""
    block = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    last = tl.load(block_first + block + 1)
    acc = tl.full((ROWS,), 0.0, tl.float32)
    for s0 in range(tl.load(block_first + block), last, SEGS):
        segs = s0 + tl.arange(0, SEGS)
        acc += tl.reduce(tl.load(partials + rows.to(tl.int64)[:, None] * n_segs + segs[None, :],
                                 mask=row_ok[:, None] & (segs < last)[None, :], other=0.0), 1, SUM)
    tl.store(dX + rows * n_blocks + block, acc * tl.load(scale).to(tl.float32), mask=row_ok)


def combine(P, X, out, chunk_first, seg_stop, seg_block, n_rows, n_cols, row_stride, p_cols, n_blocks,
            ACCUMULATE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """out[j] (+)= sum_i X[i, block(j)] * P[i, j]; one program per column chunk, looping over tiles of
    ROWS rows, and over the chunk's segments, each with its own coefficients (no gather per column).
    P's columns up to `p_cols` may be loaded; only those below `n_cols` are summed and stored."""
    chunk = tl.program_id(0).to(tl.int64)
    cols = chunk * COLS + tl.arange(0, COLS)
    col_ok = cols < n_cols
    first = tl.load(chunk_first + chunk)
    last = tl.load(chunk_first + chunk + 1)
    acc = tl.full((COLS,), 0.0, tl.float32)
    for r0 in range(0, n_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        tile = tl.load(P + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
                       mask=row_ok[:, None] & (cols < p_cols)[None, :], other=0.0).to(tl.float32)
        start = chunk * COLS
        for s in range(first, last):
            stop = tl.load(seg_stop + s)
            coef = tl.load(X + rows * n_blocks + tl.load(seg_block + s), mask=row_ok, other=0.0)
            inside = (cols >= start) & (cols < stop)
            acc += tl.reduce(tl.where(inside[None, :], tile * coef.to(tl.float32)[:, None], 0.0), 0, SUM)
            start = stop
    if ACCUMULATE:
        acc += tl.load(out + cols, mask=col_ok, other=0.0)
    tl.store(out + cols, acc, mask=col_ok)
