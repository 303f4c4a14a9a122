"""Reference computations the tests check the library against: plain, unoptimised, written for reading
(the library's versions are in utils/; these are not used there)."""
import torch

from utils.soup.hyperplane import combine, directions_


def directions(rows, center, bounds):
    """hyperplane.directions_ leaving `rows` unchanged: (P, inv_norms)."""
    return directions_(rows.clone(), center, bounds)


def soup(center, X, P, bounds):
    """center_b + sum_i X[i, b] P[i, b] (one process)."""
    return combine(X, P, bounds).add_(center)


def rebuild(alpha, rows, bounds):
    """theta_b = sum_i alpha[b, i] theta_i,b from all N ingredient rows (N, D)."""
    out = torch.empty(rows.shape[1], dtype=rows.dtype, device=rows.device)
    a = alpha.to(rows.dtype).to(rows.device)
    for b, (start, stop) in enumerate(bounds):
        torch.mv(rows[:, start:stop].T, a[b], out=out[start:stop])
    return out


def block_ids(sizes, blocks):
    """For each number of the flat vector, the index of its block (a LongTensor of length sum(sizes))."""
    ids = torch.empty(sum(sizes), dtype=torch.long)
    offset = 0
    tensor_block = {t: b for b, ts in enumerate(blocks) for t in ts}
    for t, size in enumerate(sizes):
        ids[offset:offset + size] = tensor_block[t]
        offset += size
    return ids


def flatten(sd, names, dtype=None):
    """The tensors `names` of `sd` concatenated into one flat vector."""
    return torch.cat([sd[n].reshape(-1).to(dtype or sd[n].dtype) for n in names])
