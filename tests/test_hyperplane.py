"""Soup math of MEHL-Soup (utils/soup/hyperplane.py) and model sampling (utils/soup/sampling.py), in float64."""
import pytest
import torch
from torch.testing import assert_close

from tests import reference
from utils.soup import hyperplane, sampling
from utils.soup.blocks import block_bounds, make_blocks



@pytest.fixture(autouse=True)
def float64():
    """Exactness is claimed: compute in float64 here (and restore the default for other modules)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def setup_problem(n=5, sizes=(6, 3, 4, 2), layer_size=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, sum(sizes), generator=gen, dtype=torch.float64)
    blocks = make_blocks(list(sizes), layer_size)
    ids = reference.block_ids(list(sizes), blocks)          # for masks in the assertions
    return rows, ids, block_bounds(list(sizes), blocks), gen


def test_directions_have_unit_norm_per_block_and_zero_blocks_give_zero():
    rows, ids, bounds, _ = setup_problem()
    B = len(bounds)
    center = rows.mean(0)
    rows[2, ids == 1] = center[ids == 1]          # ingredient 2 equals the center in block 1
    P, inv = reference.directions(rows, center, bounds)
    norms = torch.zeros(rows.shape[0], B).index_add_(1, ids, P ** 2).sqrt()
    expected = torch.ones_like(norms)
    expected[2, 1] = 0
    assert torch.isfinite(P).all()
    assert_close(norms, expected)
    assert inv[2, 1] == 0
    # direction = (theta - center) / norm
    assert_close(P[0, ids == 0], (rows[0, ids == 0] - center[ids == 0]) /
                 (rows[0, ids == 0] - center[ids == 0]).norm())


def test_projection_equals_autograd_gradient_wrt_X():
    rows, ids, bounds, gen = setup_problem()
    B = len(bounds)
    center = rows.mean(0)
    P, _ = reference.directions(rows, center, bounds)
    target = torch.randn(rows.shape[1], generator=gen)
    X = torch.randn(rows.shape[0], B, generator=gen).requires_grad_()
    soup = center + (X[:, ids] * P).sum(0)
    loss = ((soup - target) ** 3).sum()           # any non-linear loss of the soup
    loss.backward()
    theta = reference.soup(center, X.detach(), P, bounds).requires_grad_()
    ((theta - target) ** 3).sum().backward()
    assert_close(hyperplane.project(P, theta.grad, bounds), X.grad)


def test_alpha_tracks_the_soup_and_rows_sum_to_one_over_groups():
    rows, ids, bounds, gen = setup_problem(n=7, sizes=(5, 4, 3, 6, 2), layer_size=4)
    B = len(bounds)
    N = rows.shape[0]
    groups = sampling.groups(sampling.shuffled(list(range(N)), gen), 3)
    soup, alpha = None, None
    for group in groups:
        if soup is None:
            center, alpha_center = rows[group].mean(0), hyperplane.mean_alpha(group, N, B)
        else:
            center, alpha_center = soup, alpha
        P, inv = reference.directions(rows[group], center, bounds)
        X = torch.randn(len(group), B, generator=gen)
        soup = reference.soup(center, X, P, bounds)
        alpha = alpha_center + hyperplane.alpha_delta(alpha_center, X, inv, group)
        assert_close(alpha.sum(1), torch.ones(B))
        assert_close(reference.rebuild(alpha, rows, bounds), soup)
    assert (alpha < 0).any()                         # random X extrapolates: negative coefficients


def test_alpha_delta_of_split_rows_sums_to_the_whole():
    rows, ids, bounds, gen = setup_problem(n=5)
    B = len(bounds)
    group = [4, 0, 2, 1, 3]
    alpha_center = hyperplane.mean_alpha(group, 5, B)
    P, inv = reference.directions(rows[group], rows[group].mean(0), bounds)
    X = torch.randn(5, B, generator=gen)
    whole = hyperplane.alpha_delta(alpha_center, X, inv, group)
    parts = sum(hyperplane.alpha_delta(alpha_center, X[a:b], inv[a:b], group[a:b])
                for a, b in (sampling.shard_range(5, 2, r) for r in range(2)))
    assert_close(parts, whole)
    combined = sum(hyperplane.combine(X[a:b], P[a:b], bounds)
                   for a, b in (sampling.shard_range(5, 2, r) for r in range(2)))
    assert_close(combined, hyperplane.combine(X, P, bounds))


def test_identical_block_in_all_ingredients_stays_put():
    rows, ids, bounds, gen = setup_problem(n=4)
    B = len(bounds)
    rows[:, ids == 2] = rows[0, ids == 2]
    center = rows.mean(0)
    P, inv = reference.directions(rows, center, bounds)
    X = torch.randn(4, B, generator=gen)
    soup = reference.soup(center, X, P, bounds)
    assert torch.isfinite(soup).all()
    assert_close(soup[ids == 2], center[ids == 2])
    assert (hyperplane.project(P, torch.randn(rows.shape[1], generator=gen), bounds)[:, 2] == 0).all()


def test_summary_numbers():
    alpha = torch.tensor([[0.5, 0.5, 0.0], [1.5, -0.25, -0.25]])
    s = hyperplane.summary(alpha)
    assert s["negative"] == 2 and s["negative_fraction"] == 2 / 6
    assert s["max"] == 1.5
    assert abs(s["effective_ingredients"] - (2.0 + 1 / 2.375) / 2) < 1e-12


def test_sampling_groups_shares_and_resumable_shuffle():
    order = list(range(7))
    assert sampling.groups(order, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert sampling.groups(order, 10) == [order]
    assert [sampling.my_share([5, 6, 7], 2, r) for r in range(2)] == [[5, 6], [7]]
    assert [sampling.my_share([5], 2, r) for r in range(2)] == [[5], []]
    gen = sampling.models_generator(1)
    first = sampling.shuffled(order, gen)
    state = gen.get_state()
    second = sampling.shuffled(first, gen)
    gen2 = sampling.models_generator(1)
    gen2.set_state(state)
    assert sampling.shuffled(first, gen2) == second
    assert sorted(first) == order and first != order


def test_rank_batches_split_the_same_global_batches():
    data = torch.utils.data.TensorDataset(torch.arange(11.0), torch.arange(11))
    single = list(sampling.rank_batches(data, 4, sampling.data_generator(0), 1, 0))
    parts = [list(sampling.rank_batches(data, 4, sampling.data_generator(0), 3, r))
             for r in range(3)]
    assert [n for n, _ in single] == [4, 4, 3]
    for step, (n, (x, _)) in enumerate(single):
        pieces = [p[step][1][0] for p in parts if p[step][1] is not None]
        assert all(p[step][0] == n for p in parts)
        assert_close(torch.cat(pieces), x)
    assert parts[2][2][1] is not None and len(parts[2][2][1][0]) == 1
