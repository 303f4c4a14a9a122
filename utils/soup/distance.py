"""How far a soup went from its ingredients, per block of its coefficients (read-only, for the report).

For a block b (a list of parameter tensors) with ingredients theta_1..theta_N and their mean m:

    ratio_b = ||soup_b - m_b|| / mean_i ||theta_i,b - m_b||

0 is the uniform soup; about 1 is as far out as a typical ingredient; far above 1 means the soup left
the ingredients' neighbourhood (large or negative coefficients extrapolating along their differences).

Streamed, so that memory does not grow with N: `mean_of` takes the ingredients one at a time (a first
pass), `squared_distances` gives one state dict's squared distance from the mean per tensor (a second
pass over the ingredients, then the soup), and `block_ratios` combines those scalars per block, since
||x_b||^2 is the sum of its tensors' ||x_n||^2. Everything is in float64.
"""
import math

import torch


def mean_of(ingredients, names):
    """The float64 mean of the tensors `names` over `ingredients`, an iterable of state dicts that is
    consumed one at a time (a generator that reads each from disk holds only one)."""
    total, n = {}, 0
    for sd in ingredients:
        for name in names:
            if name in total:
                _same_shape(sd[name], total[name], name)
                total[name].add_(sd[name])
            else:
                total[name] = sd[name].to(torch.float64, copy=True)
        n += 1
        del sd  # else it is still held while the iterable reads the next one
    if n == 0:
        raise ValueError("the mean of no ingredients")
    return {name: t.div_(n) for name, t in total.items()}


def squared_distances(sd, mean):
    """||sd[name] - mean[name]||^2 for every tensor of `mean`, as Python floats (float64)."""
    out = {}
    for name, m in mean.items():
        _same_shape(sd[name], m, name)
        diff = sd[name].to(torch.float64, copy=True).sub_(m).view(-1)
        out[name] = float(torch.dot(diff, diff))
    return out


def _same_shape(t, like, name):
    if t.shape != like.shape:  # add_ and sub_ would broadcast a smaller tensor silently
        raise ValueError(f"tensor {name} has shape {tuple(t.shape)}, the others {tuple(like.shape)}")


def block_ratios(soup_sq, ingredients_sq, blocks):
    """ratio_b for every block (list of lists of tensor names), from the soup's `squared_distances`
    and the list of every ingredient's. A block where the ingredients do not differ gives nan (0/0)
    unless the soup is also at their mean (0)."""
    out = []
    for names in blocks:
        far = math.sqrt(sum(soup_sq[n] for n in names))
        spread = sum(math.sqrt(sum(sq[n] for n in names)) for sq in ingredients_sq) / len(ingredients_sq)
        out.append(far / spread if spread > 0 else (0.0 if far == 0 else math.nan))
    return out


def summarise(ratios, alpha=None):
    """Median / 90th percentile / max of the ratios, and the coefficients' range when alpha is given."""
    vals = sorted(r for r in ratios if not math.isnan(r))
    if not vals:
        return None

    def q(f):
        return vals[min(len(vals) - 1, int(round(f * (len(vals) - 1))))]

    out = {"blocks": len(ratios), "ratio_median": q(0.5), "ratio_p90": q(0.9), "ratio_max": vals[-1]}
    if alpha is not None:
        flat = [v for row in alpha for v in (row if isinstance(row, list) else [row])]
        out.update(alpha_min=min(flat), alpha_max=max(flat))
    return out
