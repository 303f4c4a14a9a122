"""utils/soup/stats.py against an independent computation: the exact McNemar p-value from exact
rational arithmetic (integer binomial coefficients, fractions), on random cases up to 50,000 examples
(ImageNet val) and the extreme splits; the bootstrap interval against the normal approximation."""
import math
from fractions import Fraction

import numpy as np
import pytest

from utils.soup import stats


def exact_tail(n, lo, hi):
    """sum_{k=lo}^{hi} C(n, k) / 2^n as a Fraction (integer recurrence, no floating point)."""
    total, c = 0, 1
    for k in range(0, hi + 1):
        if k >= lo:
            total += c
        c = c * (n - k) // (k + 1)
    return Fraction(total, 2 ** n)


def exact_two_sided(b, c):
    n = b + c
    if n == 0:
        return 1.0
    return float(min(Fraction(1), 2 * exact_tail(n, 0, min(b, c))))


def vectors(n, b, c, rng):
    """Correctness vectors of n examples with b (a right, b wrong) and c (a wrong, b right), the rest
    concordant (random both right or both wrong), in random order."""
    a = np.zeros(n, bool)
    bb = np.zeros(n, bool)
    a[:b] = True
    bb[b:b + c] = True
    both = rng.random(n - b - c) < 0.8
    a[b + c:] = both
    bb[b + c:] = both
    order = rng.permutation(n)
    return a[order], bb[order]


def close(got, want):
    assert got == pytest.approx(want, rel=1e-9, abs=1e-300), (got, want)


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 10000, 50000])
def test_mcnemar_is_the_exact_binomial_sign_test_on_random_cases(n):
    rng = np.random.default_rng(n)
    for _ in range(3 if n >= 10000 else 10):
        disc = int(rng.integers(0, min(n, 4000) + 1))
        b = int(rng.integers(0, disc + 1))
        a, bb = vectors(n, b, disc - b, rng)
        close(stats.mcnemar(a, bb), exact_two_sided(b, disc - b))
        close(stats.mcnemar(bb, a), exact_two_sided(b, disc - b))
        # one-sided: P(X >= b), the p-value of "a is more accurate than b"
        close(stats.mcnemar(a, bb, two_sided=False), float(exact_tail(disc, b, disc)) if disc else 1.0)


def test_mcnemar_at_50000_examples_with_a_small_difference():
    # ImageNet val: 50,000 examples, 3000 discordant, split 1450 / 1550 (p near 0.07)
    rng = np.random.default_rng(1)
    a, b = vectors(50000, 1450, 1550, rng)
    want = exact_two_sided(1450, 1550)
    assert 0.01 < want < 0.2
    close(stats.mcnemar(a, b), want)


@pytest.mark.parametrize("n", [1, 10, 1000, 50000])
def test_mcnemar_extreme_splits(n):
    rng = np.random.default_rng(2)
    same = rng.random(n) < 0.5
    assert stats.mcnemar(same, same) == 1.0                      # 0 discordant
    a, b = vectors(n, n, 0, rng)                                  # all discordant, all one way
    close(stats.mcnemar(a, b), exact_two_sided(n, 0))
    close(stats.mcnemar(a, b, two_sided=False), float(exact_tail(n, n, n)))
    assert stats.mcnemar(b, a, two_sided=False) == 1.0
    if n % 2 == 0:                                                # all discordant, split evenly
        a, b = vectors(n, n // 2, n // 2, rng)
        assert stats.mcnemar(a, b) == 1.0
    assert stats.mcnemar(np.ones(10, bool), np.zeros(10, bool)) == pytest.approx(2 / 1024)


def test_mcnemar_refuses_vectors_of_different_lengths():
    with pytest.raises(ValueError):
        stats.mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_bootstrap_interval_is_seeded_and_matches_the_normal_approximation():
    rng = np.random.default_rng(3)
    n, b, c = 10000, 400, 300
    a, bb = vectors(n, b, c, rng)
    low, high = stats.bootstrap_interval((a, bb))
    assert (low, high) == stats.bootstrap_interval((a, bb))          # fixed seed
    diff = 100.0 * (b - c) / n
    sd = 100.0 * math.sqrt(((b + c) / n - ((b - c) / n) ** 2) / n)
    assert low < diff < high
    assert (high - low) == pytest.approx(2 * 1.96 * sd, rel=0.05)
    assert (low + high) / 2 == pytest.approx(diff, abs=0.1 * sd)
    assert stats.bootstrap_interval((a, a)) == (0.0, 0.0)
    assert stats.bootstrap_p((a, bb)) < 0.05 < stats.bootstrap_p(vectors(n, 310, 300, rng))


def test_bootstrap_over_several_sets_averages_their_differences():
    rng = np.random.default_rng(4)
    sets = [vectors(5000, 200 + 20 * k, 200, rng) for k in range(6)]
    mean = np.mean([100.0 * (a.mean() - b.mean()) for a, b in sets])
    d = stats.bootstrap_differences(sets, replicates=4000)
    assert d.mean() == pytest.approx(mean, abs=0.03)
    # the sets are resampled independently: the variance of the mean is the mean variance / 6
    var = np.mean([100.0 ** 2 * ((b.sum() + c.sum()) / 5000 - ((b.sum() - c.sum()) / 5000) ** 2) / 5000
                   for b, c in (((a & ~x), (~a & x)) for a, x in sets)]) / 6
    assert d.var() == pytest.approx(var, rel=0.1)
    low, high = stats.bootstrap_interval(sets)
    assert low < mean < high
