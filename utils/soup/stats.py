"""Paired statistics of two models scored on the same examples (docs/RESULTS.md, "Paired statistics"): pure
functions on boolean vectors of per-example correctness, vectorised, no Python loop over examples.

- `mcnemar`: the exact McNemar test, a binomial sign test on the discordant examples (those exactly
  one of the two models gets right), as google-research/modeljoust reports it. The binomial tail is
  summed in log space from lgamma in float64: relative error below 1e-9 at 50,000 examples (ImageNet
  val), checked against exact rational arithmetic in tests/test_stats.py.
- `bootstrap_interval`: the paired bootstrap of the accuracy difference (percentage points), over
  one set or averaged over several (the shift mean: examples resampled within each set). A resample
  of a set only changes how many examples fall in each of the three kinds (a right b wrong, a wrong
  b right, the rest), so each replicate is one multinomial draw of those counts: the same
  distribution as resampling indices, at a cost that does not grow with the number of examples.
"""
import math

import numpy as np
import torch

REPLICATES = 10000
SEED = 0


def discordant(a_correct, b_correct):
    """(a right and b wrong, a wrong and b right, examples) of two boolean vectors of one length."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two boolean vectors of one length, got shapes {a.shape} and {b.shape}")
    return int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b)), len(a)


def binom_cdf_half(k, n):
    """P(X <= k) for X ~ Binomial(n, 1/2), from log terms (exact to float64 rounding)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    j = torch.arange(k + 1, dtype=torch.float64)
    log_terms = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(j + 1) \
        - torch.lgamma(n - j + 1) - n * math.log(2.0)
    return min(1.0, float(torch.logsumexp(log_terms, 0).exp()))


def mcnemar(a_correct, b_correct, two_sided=True):
    """Exact McNemar p-value of models a and b on the same examples. Two-sided: how likely a split of
    the discordant examples at least this uneven is when neither model is better. One-sided
    (`two_sided=False`): the p-value of "a is more accurate than b". 1.0 when no example is discordant."""
    b, c, _ = discordant(a_correct, b_correct)
    n = b + c
    if n == 0:
        return 1.0
    if two_sided:
        return min(1.0, 2.0 * binom_cdf_half(min(b, c), n))
    return binom_cdf_half(n - b, n)   # P(X >= b) = P(X <= n - b) by symmetry (no cancellation)


def _counts(a_correct, b_correct):
    b, c, n = discordant(a_correct, b_correct)
    if n == 0:
        raise ValueError("no examples to compare")
    return b, c, n


def bootstrap_differences(pairs, replicates=REPLICATES, seed=SEED):
    """`replicates` bootstrap draws of the accuracy difference a - b in percentage points, averaged
    over the sets `pairs` ([(a_correct, b_correct)] per set), examples resampled within each set."""
    rng = np.random.default_rng(seed)
    total = np.zeros(replicates)
    for a_correct, b_correct in pairs:
        b, c, n = _counts(a_correct, b_correct)
        draws = rng.multinomial(n, [b / n, c / n, (n - b - c) / n], size=replicates)
        total += 100.0 * (draws[:, 0] - draws[:, 1]) / n
    return total / len(pairs)


def bootstrap(pairs, level=0.95, replicates=REPLICATES, seed=SEED):
    """(low, high, p) of the paired bootstrap of the accuracy difference a - b in percentage points
    (fixed seed: the same inputs give the same numbers). `pairs`: one (a_correct, b_correct), or a
    list of them whose differences are averaged (the shift mean). (low, high): the percentile interval
    at `level`; p: the two-sided bootstrap p-value of a - b = 0, twice the share of replicates on the
    far side of 0 from the observed difference (at most 1; resolution 1 / replicates), below 0.05
    when the 95 % interval excludes 0."""
    if isinstance(pairs, tuple):
        pairs = [pairs]
    d = bootstrap_differences(pairs, replicates, seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(d, [tail, 1.0 - tail])
    observed = float(np.mean([100.0 * (np.count_nonzero(a) - np.count_nonzero(b)) / len(a)
                              for a, b in ((np.asarray(a, bool), np.asarray(b, bool)) for a, b in pairs)]))
    if observed > 0:
        far = np.count_nonzero(d <= 0)
    elif observed < 0:
        far = np.count_nonzero(d >= 0)
    else:
        far = replicates
    return float(low), float(high), min(1.0, 2.0 * far / replicates)


def bootstrap_interval(pairs, level=0.95, replicates=REPLICATES, seed=SEED):
    """(low, high) of `bootstrap`."""
    return bootstrap(pairs, level, replicates, seed)[:2]


def bootstrap_p(pairs, replicates=REPLICATES, seed=SEED):
    """p of `bootstrap`."""
    return bootstrap(pairs, 0.95, replicates, seed)[2]


def accuracy_interval(correct, level=0.95, replicates=REPLICATES, seed=SEED):
    """(low, high) percentile bootstrap interval of one model's accuracy in percent (a binomial draw
    per replicate: the same distribution as resampling the examples)."""
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 1 or not len(c):
        raise ValueError("need a non-empty boolean vector")
    draws = np.random.default_rng(seed).binomial(len(c), np.count_nonzero(c) / len(c), size=replicates)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(100.0 * draws / len(c), [tail, 1.0 - tail])
    return float(low), float(high)
