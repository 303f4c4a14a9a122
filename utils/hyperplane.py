"""MEHL-Soup's hyperplane math (SPEC 7): pure functions on tensors, no I/O and no devices chosen here.

Notation. The learned parameters of one model are a flat vector of D numbers; `ids` (D,) gives the
block of every number (`utils.state_dicts.block_ids`), B blocks in all. A group holds n ingredients as
rows of an (n, D) tensor. For every row i and block b:

    P[i, b] = (theta_i,b - center_b) / ||theta_i,b - center_b||       (a zero-norm block gives P = 0)
    soup_b  = center_b + sum_i X[i, b] P[i, b]
    dX[i, b] = <P[i, b], g_b>                                           (chain rule through the line above)

Coefficients over the N ingredients of the whole range (alpha, B x N, rows sum to 1) are tracked
exactly: in coefficient space P[i, b] = (e_i - alpha_center[b]) / norm[i, b], so

    alpha[b] = alpha_center[b] + sum_i X[i, b] (e_i - alpha_center[b]) / norm[i, b].

Rows are processed one at a time where an (n, D) temporary would otherwise appear, so the memory of a
group is the n rows plus O(D).
"""
import torch


def directions_(rows, center, ids, num_blocks):
    """Turn ingredient rows (n, D) into unit directions in place; returns (P, inv_norms).

    P[i, b] = (rows[i, b] - center_b) / ||rows[i, b] - center_b|| per block. `inv_norms` (n, B) holds
    1 / norm, and 0 where the norm is 0 (the block does not move the soup: no NaN, no direction)."""
    inv_norms = torch.zeros(rows.shape[0], num_blocks, dtype=rows.dtype, device=rows.device)
    for i in range(rows.shape[0]):
        rows[i].sub_(center)
        sq = torch.zeros(num_blocks, dtype=rows.dtype, device=rows.device).index_add_(0, ids, rows[i] ** 2)
        norms = sq.sqrt()
        inv_norms[i] = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(rows.dtype).tiny),
                                   torch.zeros_like(norms))
        rows[i].mul_(inv_norms[i][ids])
    return rows, inv_norms


def directions(rows, center, ids, num_blocks):
    """As `directions_`, leaving `rows` unchanged."""
    return directions_(rows.clone(), center, ids, num_blocks)


def combine(X, P, ids):
    """sum_i X[i, b] P[i, b] as a flat (D,) vector: the move of the soup away from its center.
    Under torchrun each rank passes its own rows and the results are summed over ranks."""
    out = torch.zeros(P.shape[1], dtype=P.dtype, device=P.device)
    for i in range(P.shape[0]):
        out.addcmul_(X[i].to(P.dtype)[ids], P[i])
    return out


def soup(center, X, P, ids):
    """center_b + sum_i X[i, b] P[i, b] (single process)."""
    return center + combine(X, P, ids)


def project(P, g, ids, num_blocks):
    """The gradient with respect to X: dX[i, b] = <P[i, b], g_b>, shape (n, B)."""
    dX = torch.zeros(P.shape[0], num_blocks, dtype=P.dtype, device=P.device)
    for i in range(P.shape[0]):
        dX[i].index_add_(0, ids, P[i] * g)
    return dX


# ------------------------------------------------------------------------------ coefficients
def mean_alpha(members, num_ingredients, num_blocks, dtype=torch.float64):
    """alpha of the mean of the ingredients `members` (indices into the range): 1/|G| on each."""
    alpha = torch.zeros(num_blocks, num_ingredients, dtype=dtype)
    alpha[:, list(members)] = 1.0 / len(members)
    return alpha


def alpha_delta(alpha_center, X, inv_norms, members):
    """The change of alpha that the rows `members` (indices into the range, one per row of X) make:
    sum_i X[i, b] (e_{members[i]} - alpha_center[b]) / norm[i, b]. Ranks sum their deltas."""
    c = (X.detach().to(alpha_center.dtype) * inv_norms.to(alpha_center.dtype)).cpu()   # (n, B)
    delta = -alpha_center * c.sum(0)[:, None]
    if len(members):
        delta.index_add_(1, torch.as_tensor(list(members), dtype=torch.long), c.T)
    return delta


def rebuild(alpha, rows, ids):
    """theta_b = sum_i alpha[b, i] theta_i,b from all N ingredient rows (N, D) (checks and recipes)."""
    out = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    for i in range(rows.shape[0]):
        out.addcmul_(alpha[:, i].to(rows.dtype).to(rows.device)[ids], rows[i])
    return out


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
