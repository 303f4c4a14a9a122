"""MEHL-Soup's hyperplane math: pure functions on tensors, no I/O and no devices chosen here.

Notation. The learned parameters of one model are a flat vector of D numbers cut into B blocks; a block
is a contiguous range of whole tensors, given by `bounds`, a list of (start, stop) offsets
(`utils.soup.blocks.block_bounds`). A group holds n ingredients as rows of an (n, D) tensor. For every row i
and block b:

    P[i, b] = (theta_i,b - center_b) / ||theta_i,b - center_b||       (a zero-norm block gives P = 0)
    soup_b  = center_b + sum_i X[i, b] P[i, b]
    dX[i, b] = <P[i, b], g_b>                                           (chain rule through the line above)

Because a block is a slice, each of these is a dense matrix-vector product over `P[:, start:stop]`:
the rows are read once per call and nothing is scattered over D (memory-bandwidth cost, on CPU and on
CUDA alike). `project` and `combine` run as a fixed number of kernels whatever the number of blocks
where `utils.soup.segmented` supports the tensors (CUDA with Triton); elsewhere, and as the reference
the fast path is tested against, they loop over the blocks (`project_blocks`, `combine_blocks`).
Directions may be stored in a lower precision than the gradient (bfloat16, float16): the fast path
loads them as they are and accumulates in float32; the loop reads the rows in slices of at most
`SLICE` numbers per row, cast to the gradient's dtype, so its sums accumulate in float32 too and its
temporaries stay small.

Coefficients over the N ingredients of the whole range (alpha, B x N, rows sum to 1) are tracked
exactly: in coefficient space P[i, b] = (e_i - alpha_center[b]) / norm[i, b], so

    alpha[b] = alpha_center[b] + sum_i X[i, b] (e_i - alpha_center[b]) / norm[i, b].
"""
import torch

from utils.soup import segmented

SLICE = 1 << 20  # numbers per row read at once when directions are stored in a lower precision


def _pieces(start, stop, stored, compute):
    """Sub-ranges of [start, stop): the whole block when no cast is needed, else slices of SLICE."""
    if stored == compute:
        yield start, stop
        return
    for s in range(start, stop, SLICE):
        yield s, min(s + SLICE, stop)


def _compute_dtype(stored, other):
    """Sums run in at least float32 (and in float64 when either side is float64)."""
    return torch.promote_types(torch.promote_types(stored, other), torch.float32)


def normalise_(rows, bounds):
    """Scale each block of each row (n, D) to unit norm in place; returns inv_norms (n, B) in float64:
    1 / norm, and 0 where the norm is 0 (that block does not move the soup: no NaN, no direction)."""
    n = rows.shape[0]
    inv_norms = torch.zeros(n, len(bounds), dtype=torch.float64, device=rows.device)
    if n == 0:
        return inv_norms
    acc = _compute_dtype(rows.dtype, torch.float32)
    for b, (start, stop) in enumerate(bounds):
        sq = torch.zeros(n, dtype=torch.float64, device=rows.device)
        for s, e in _pieces(start, stop, rows.dtype, acc):
            sq += torch.linalg.vector_norm(rows[:, s:e], dim=1, dtype=acc).to(torch.float64) ** 2
        norms = sq.sqrt()
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny),
                          torch.zeros_like(norms))
        inv_norms[:, b] = inv
        rows[:, start:stop].mul_(inv.to(rows.dtype)[:, None])
    return inv_norms


def directions_(rows, center, bounds):
    """Turn ingredient rows (n, D) into unit directions in place: P[i, b] = (rows[i, b] - center_b) /
    norm. Returns (P, inv_norms); see `normalise_`."""
    for start, stop in bounds:
        rows[:, start:stop].sub_(center[start:stop])
    return rows, normalise_(rows, bounds)


def combine(X, P, bounds, out=None, accumulate=False):
    """sum_i X[i, b] P[i, b] as a flat (D,) vector: the move of the soup away from its center, written
    into `out` when given (added to it with `accumulate`). Under torchrun each rank passes its own rows
    and the results are summed."""
    dtype = _compute_dtype(P.dtype, X.dtype)
    if out is None:
        if accumulate:
            raise ValueError("combine: accumulate needs out")
        out = torch.empty(P.shape[1], dtype=dtype, device=P.device)
    if segmented.supports(P, out, bounds) and segmented.combine(X, P, bounds, out, accumulate) is not None:
        return out
    return combine_blocks(X, P, bounds, out, accumulate)


def combine_blocks(X, P, bounds, out, accumulate=False):
    """`combine` one block at a time (the reference, and the path off CUDA)."""
    dtype = _compute_dtype(P.dtype, X.dtype)
    X = X.detach().to(dtype)
    for b, (start, stop) in enumerate(bounds):
        for s, e in _pieces(start, stop, P.dtype, dtype):
            if P.shape[0] == 0:
                if not accumulate:
                    out[s:e].zero_()
            elif accumulate:
                out[s:e].addmv_(P[:, s:e].to(dtype).T, X[:, b])
            else:
                torch.mv(P[:, s:e].to(dtype).T, X[:, b], out=out[s:e])
    return out


def project(P, g, bounds, scale=None):
    """The gradient with respect to X: dX[i, b] = <P[i, b], g_b>, shape (n, B); times `scale` (a
    0-dim tensor, e.g. a gradient clip factor, kept on the device) when given."""
    dX = segmented.project(P, g, bounds, scale) if segmented.supports(P, g, bounds) else None
    return project_blocks(P, g, bounds, scale) if dX is None else dX


def project_blocks(P, g, bounds, scale=None):
    """`project` one block at a time (the reference, and the path off CUDA)."""
    dtype = _compute_dtype(P.dtype, g.dtype)
    dX = torch.zeros(P.shape[0], len(bounds), dtype=dtype, device=P.device)
    if P.shape[0] == 0:
        return dX
    g = g.to(dtype)
    for b, (start, stop) in enumerate(bounds):
        for s, e in _pieces(start, stop, P.dtype, dtype):
            dX[:, b] += torch.mv(P[:, s:e].to(dtype), g[s:e])
    return dX if scale is None else dX.mul_(scale)


# ------------------------------------------------------------------------------ coefficients
def mean_alpha(members, num_ingredients, num_blocks, dtype=torch.float64):
    """alpha of the mean of the ingredients `members` (indices into the range): 1/|G| on each."""
    alpha = torch.zeros(num_blocks, num_ingredients, dtype=dtype)
    alpha[:, list(members)] = 1.0 / len(members)
    return alpha


def alpha_delta(alpha_center, X, inv_norms, members):
    """The change of alpha that the rows `members` (indices into the range, one per row of X) make:
    sum_i X[i, b] (e_{members[i]} - alpha_center[b]) / norm[i, b]. Ranks sum their deltas. Works on
    (n, B) and (B, N) tensors only: nothing of size D."""
    c = (X.detach().to(alpha_center.dtype) * inv_norms.to(alpha_center.dtype)).cpu()   # (n, B)
    delta = -alpha_center * c.sum(0)[:, None]
    if len(members):
        delta.index_add_(1, torch.as_tensor(list(members), dtype=torch.long), c.T)
    return delta


def summary(alpha):
    """Numbers a reader wants about alpha (B x N): negative coefficients, extremes, the effective
    number of ingredients 1 / sum_i alpha[b, i]^2 averaged over blocks, the mean per ingredient."""
    alpha = alpha.to(torch.float64)
    negative = int((alpha < 0).sum())
    return {
        "blocks": alpha.shape[0],
        "ingredients": alpha.shape[1],
        "negative": negative,
        "negative_fraction": negative / alpha.numel(),
        "max": float(alpha.max()),
        "min": float(alpha.min()),
        "effective_ingredients": float((1.0 / (alpha ** 2).sum(1)).mean()),
        "row_sum_max_error": float((alpha.sum(1) - 1).abs().max()),
        "mean_per_ingredient": [round(float(v), 6) for v in alpha.mean(0)],
    }
