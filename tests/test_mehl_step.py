"""The MEHL step on a small model (utils/run/mehl.py): no value read back from the device, the soup kept
on the hyperplane by in-place moves, no tensor of the model's size allocated, the non-finite flag; and the
fixed-launch block products (utils/soup/segmented.py) against the per-block loop, run by Triton's
interpreter on the CPU."""
import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from tests import reference
from tests.models import TINY_CNN
from utils.run import mehl
from utils.runtime.errors import UserError
from utils.soup import hyperplane, segmented
from utils.soup.blocks import block_bounds, make_blocks
from utils.soup.schedules import constant

LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


class Calls(TorchDispatchMode):
    """Every aten op run inside, with its arguments, and the numbers of each tensor it returned."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((func, args, [t for t in outs if isinstance(t, torch.Tensor)]))
        return out


def chain(layers, width=4):
    """A stack of `layers` Linear layers: 2 * layers parameter tensors."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def setup_step(model, K=3, layer_size=0, optimizer="adamw", batch=6, seed=1):
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    bounds = block_bounds(sizes, make_blocks(sizes, layer_size))
    soup = mehl.FlatSoup(model, names)
    gen = torch.Generator().manual_seed(seed)
    rows = soup.theta + 0.1 * torch.randn(K, soup.theta.numel(), generator=gen)
    center = soup.theta.clone()
    P, inv_norms = reference.directions(rows, center, bounds)
    X = torch.zeros(K, len(bounds), requires_grad=True)
    opt = (torch.optim.AdamW([X], lr=0.05) if optimizer == "adamw"
           else torch.optim.SGD([X], lr=0.05, momentum=0.9))
    group = mehl.Group(soup.theta, P, inv_norms, X, opt, constant(0.05))
    width = model[0].in_features
    data = (torch.randn(batch, width, generator=gen), torch.randint(0, width, (batch,), generator=gen))
    return soup, group, bounds, data, center


@pytest.fixture
def interpreted(monkeypatch):
    """The fast path on CPU tensors: Triton interprets its kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_step_reads_nothing_back_from_the_device(clip, optimizer):
    model = chain(3)
    soup, group, bounds, data, _ = setup_step(model, optimizer=optimizer)
    mehl.step(model, soup, group, bounds, data, len(data[1]), clip=clip)  # optimizer state made
    with Calls() as calls:
        loss = mehl.step(model, soup, group, bounds, data, len(data[1]), clip=clip)
    reads = [args[0] for func, args, _ in calls.ops if func is LOCAL_SCALAR]
    # torch's AdamW (not fused, not capturable) keeps its step counter on the host on purpose and reads
    # it there; nothing else of the step is read back
    counters = [s["step"] for s in group.optimizer.state.values() if "step" in s]
    assert all(any(t is c for c in counters) and t.device.type == "cpu" for t in reads), reads
    assert len(reads) == (1 if optimizer == "adamw" else 0)
    assert isinstance(loss, torch.Tensor) and loss.shape == (1,)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("path", ["loop", "fast"])
def test_steps_keep_the_soup_on_the_hyperplane_without_a_model_sized_allocation(request, clip, path):
    if path == "fast":
        request.getfixturevalue("interpreted")
    model = chain(6, width=16)
    soup, group, bounds, data, center = setup_step(model, K=2)
    D = soup.theta.numel()
    losses = []
    with Calls() as calls:
        for _ in range(4):
            losses.append(mehl.step(model, soup, group, bounds, data, len(data[1]), clip=clip))
    # in place: the soup is center + sum_i X[i, b] P[i, b], though the step only ever adds moves to it
    assert_close(soup.theta, reference.soup(center, group.X.detach(), group.P, bounds), atol=1e-6, rtol=1e-5)
    assert group.X.abs().max() > 0.01
    # nothing of the model's size is allocated by a step (only views of, and writes into, the soup, its
    # gradient and the rows); each parameter's own gradient is at most D / 6 here
    held = {t.untyped_storage().data_ptr() for t in (soup.theta, soup.grad, group.P)}
    big = [func for func, _, outs in calls.ops for t in outs
           if t.numel() >= D // 2 and t.untyped_storage().data_ptr() not in held]
    assert not big, big
    assert len({float(loss) for loss in losses}) == 4  # the loss is the batch's, step by step


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_first_non_finite_step_is_flagged_and_stops_at_the_next_flush(bad):
    model = chain(2)
    soup, group, bounds, data, _ = setup_step(model)
    log = mehl.StepLog(group, label=3, lr=0.05, every=10)
    for step in range(4):
        log.add(mehl.step(model, soup, group, bounds, data, len(data[1])), len(data[1]), 0.05)
        if step == 0:
            assert log.flush() > 0 and not log.pending
            with torch.no_grad():
                soup.theta[5] = bad  # the soup went bad between step 1 and step 2
    assert not log.due() and len(log.pending) == 3
    assert int(group.first_bad) == 2
    with pytest.raises(UserError, match=r"non-finite \(NaN or Inf\) in group 3, step 2: .*--lr \(now 0.05\)"):
        log.flush()


@pytest.mark.parametrize("n", [1, 3, 18])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_path_agrees_with_the_per_block_loop(interpreted, n, dtype):
    # blocks shorter and longer than a chunk, an empty block, a block ending on a chunk edge
    sizes = [5, 1019, 0, 3, 2048, 1, 1, 700, 17]
    bounds, offset = [], 0
    for size in sizes:
        bounds.append((offset, offset + size))
        offset += size
    gen = torch.Generator().manual_seed(n)
    P = torch.randn(n, offset, generator=gen).to(dtype)
    g, X = torch.randn(offset, generator=gen), torch.randn(n, len(bounds), generator=gen)
    assert segmented.supports(P, g, bounds)
    scale = torch.tensor(0.25)
    exact = (P.double() * g.double()).split(sizes, dim=1)
    exact = torch.stack([part.sum(1) for part in exact], dim=1) * 0.25
    fast, loop = segmented.project(P, g, bounds, scale), hyperplane.project_blocks(P, g, bounds, scale)
    assert_close(fast.double(), exact, atol=1e-4, rtol=1e-5)
    assert_close(fast, loop, atol=1e-4, rtol=1e-5)
    assert (fast[:, 2] == 0).all()
    start = torch.randn(offset, generator=gen)
    fast, loop = start.clone(), start.clone()
    segmented.combine(X, P, bounds, fast, accumulate=True)
    hyperplane.combine_blocks(X, P, bounds, loop, accumulate=True)
    assert_close(fast, loop, atol=1e-5, rtol=1e-5)
    fast = segmented.combine(X, P, bounds, torch.full((offset,), float("nan")))
    assert_close(fast, hyperplane.combine_blocks(X, P, bounds, torch.empty(offset)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_give_the_products_of_unpadded_ones(interpreted, dtype):
    """Rows `segmented.padded` apart (as a run loads them): the kernels load the padding, as 128-bit loads
    need (tests/test_segmented_kernels.py), but no product changes, also with NaN written into it."""
    sizes = [5, 1019, 0, 3, 2048, 1, 700, 17]  # 3793 numbers: 15 of padding per row
    bounds, offset = [], 0
    for size in sizes:
        bounds.append((offset, offset + size))
        offset += size
    gen = torch.Generator().manual_seed(0)
    plain = torch.randn(3, offset, generator=gen).to(dtype)
    padded = segmented.empty_rows(3, offset, dtype, "cpu")
    assert padded.stride(0) == segmented.padded(offset) == 3808
    assert (padded.as_strided((3, 3808), (3808, 1))[:, offset:] == 0).all()  # zeroed
    padded.copy_(plain)
    assert segmented._loadable(padded) == 3808 and segmented._loadable(plain) == offset
    g, X = torch.randn(offset, generator=gen), torch.randn(3, len(bounds), generator=gen)
    for fill in (0.0, float("nan")):
        padded.as_strided((3, 3808), (3808, 1))[:, offset:] = fill
        assert torch.equal(segmented.project(padded, g, bounds), segmented.project(plain, g, bounds))
        start = torch.randn(offset, generator=gen)
        got, want = start.clone(), start.clone()
        segmented.combine(X, padded, bounds, got, accumulate=True)
        segmented.combine(X, plain, bounds, want, accumulate=True)
        assert torch.equal(got, want)
        assert_close(segmented.project(padded, g, bounds), hyperplane.project_blocks(plain, g, bounds),
                     atol=1e-4, rtol=1e-5)


def test_a_runs_rows_are_padded(tmp_path):
    """mehl.load_rows loads a group's rows `segmented.padded` apart, the padding zeroed."""
    model = chain(2, width=5)  # 60 numbers: rows 64 apart
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "model_0.pt")
    rows = mehl.load_rows([tmp_path / "model_0.pt"] * 2, [0, 1], names, sizes, sd, torch.float32, "cpu")
    assert rows.shape == (2, 60) and rows.stride(0) == 64
    assert (rows.as_strided((2, 64), (64, 1))[:, 60:] == 0).all()
    assert torch.equal(rows[1], torch.cat([sd[n].reshape(-1) for n in names]))


def test_fast_path_is_used_only_where_it_runs(interpreted, monkeypatch):
    P, g = torch.randn(2, 10), torch.randn(10)
    assert segmented.supports(P, g, [(0, 4), (4, 10)])
    assert not segmented.supports(P, g, [(0, 4), (5, 10)])          # a gap: not a tiling
    assert not segmented.supports(P.double(), g.double(), [(0, 10)])  # float64: the loop
    assert not segmented.supports(P[:, ::2], g[:5], [(0, 5)])      # columns not contiguous
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not segmented.supports(P, g, [(0, 4), (4, 10)])          # CPU without the interpreter


def profiled_ops(model, layer_size):
    soup, group, bounds, data, _ = setup_step(model, layer_size=layer_size)
    mehl.step(model, soup, group, bounds, data, len(data[1]), clip=True)  # plans and state made
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mehl.step(model, soup, group, bounds, data, len(data[1]), clip=True)
    return len(bounds), len(prof.events())


def test_a_fast_step_records_as_many_ops_for_154_blocks_as_for_14(interpreted, monkeypatch):
    model_layers = 77  # 154 parameter tensors
    layer_size = next(s for s in range(20, 400) if len(make_blocks([16, 4] * model_layers, s)) == 14)
    blocks_few, few = profiled_ops(chain(model_layers), layer_size)
    blocks_many, many = profiled_ops(chain(model_layers), 0)
    assert (blocks_few, blocks_many) == (14, 154)
    assert few == many
    # the per-block loop's count grows with the blocks: the comparison above can tell
    monkeypatch.delenv("TRITON_INTERPRET")
    loop_few, loop_many = (profiled_ops(chain(model_layers), size)[1] for size in (layer_size, 0))
    assert loop_many > loop_few + 2 * 140


class Uncompilable:
    """A kernel whose launch fails as one does where Triton cannot compile it."""

    def __getitem__(self, grid):
        def launch(*args, **meta):
            raise RuntimeError("no compiler for this device\nmore")
        return launch


def test_kernels_that_cannot_run_hand_over_to_the_loop(interpreted, monkeypatch, caplog):
    monkeypatch.setattr(segmented, "_kernels", lambda interpret: dict.fromkeys(
        ("project_partials", "project_blocks", "combine"), Uncompilable()))
    monkeypatch.setattr(segmented, "failure", None)
    P, g, X, bounds = torch.randn(2, 10), torch.randn(10), torch.randn(2, 2), [(0, 4), (4, 10)]
    assert segmented.supports(P, g, bounds)
    assert_close(hyperplane.project(P, g, bounds), hyperplane.project_blocks(P, g, bounds))
    assert segmented.failure == "project_partials: RuntimeError: no compiler for this device"
    assert "per-block loop runs instead" in caplog.text
    assert not segmented.supports(P, g, bounds)
    assert_close(hyperplane.combine(X, P, bounds), hyperplane.combine_blocks(X, P, bounds, torch.empty(10)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_groups_center_is_the_soup_itself(tmp_path, dtype):
    """No center of the model's size is kept: the first group's mean is written into the soup, a later
    group's center is the soup as it is; the rows are unit directions from it."""
    from tests.conftest import make_zoo
    from utils.archs import get_arch
    from utils.run.layout import make_layout

    zoo = make_zoo(tmp_path / "zoo", 3)
    paths = [zoo / f"model_{i}.pt" for i in range(3)]
    model = get_arch(TINY_CNN).build(10)
    like = model.state_dict()
    layout, base = make_layout(paths, model, like, 0)
    model.load_state_dict(base)
    soup = mehl.FlatSoup(model, layout.names)
    rows = torch.stack([reference.flatten(torch.load(p, weights_only=True), layout.names) for p in paths])
    for first, members in ((True, [0, 1]), (False, [2])):
        before = soup.theta.clone()
        center, P, inv_norms = mehl.directions(paths, members, len(members), layout, like, soup,
                                               dtype, first)
        assert center is soup.theta
        expected = rows[members].double().mean(0).float() if first else before
        assert_close(soup.theta, expected, atol=1e-6, rtol=1e-6)
        assert P.dtype == dtype and P.shape == (len(members), soup.theta.numel())
        direction, _ = reference.directions(rows[members], expected, layout.bounds)
        assert_close(P.float(), direction, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)
