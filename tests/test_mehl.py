"""MEHL-Soup / MEHL-Soup+ end to end on tiny zoos (MEHL_soup_layer.py, in-process and under torchrun)."""
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tests import reference
import MEHL_soup_layer as mehl
from tests import helpers
from tests.conftest import make_zoo, torchrun
from tests.models import TINY_CNN
from datasets import build_dataset
from utils.archs import get_arch
from utils.files import soup_io
from utils.files.identity import sha256
from utils.files.state_dicts import param_names
from utils.run import mehl as mehl_step
from utils.run.batchnorm import reestimate, set_mode
from utils.runtime.errors import UserError
from utils.soup import hyperplane, sampling
from utils.soup.blocks import block_bounds, make_blocks

N_TENSORS = 10   # tiny_cnn: 2 conv + 2 BatchNorm + 1 linear, weight and bias each


argv = partial(helpers.argv, heldout=4, batch_size=15, device=None,
               first=("--epochs", 2, "--no-epoch-test"))


def soup_of(tmp_path, name="soup"):
    return torch.load(tmp_path / f"{name}.pt", weights_only=True)


def load_zoo(zoo, n):
    return [torch.load(zoo / f"model_{i}.pt", weights_only=True) for i in range(n)]


@pytest.fixture
def zoo4(tmp_path):
    return make_zoo(tmp_path / "zoo", 4)


def test_soup_stays_on_the_hyperplane_and_rebuilds_from_alpha(tmp_path, zoo4, fmnist_root):
    record = mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 3, "--cosine-lr"))
    assert record["method"] == "MEHL-Soup+" and record["blocks"] == N_TENSORS
    assert [len(g["ingredients"]) for g in record["groups"]] == [3, 1]
    coefficients = json.loads((tmp_path / "soup.coefficients.json").read_text())
    assert [(item["path"], item["sha256"]) for item in coefficients["ingredients"]] == \
        [(str((zoo4 / f"model_{i}.pt").resolve()), sha256(zoo4 / f"model_{i}.pt")) for i in range(4)]
    alpha = torch.tensor(coefficients["alpha"], dtype=torch.float64)
    assert alpha.shape == (N_TENSORS, 4)
    assert_close(alpha.sum(1), torch.ones(N_TENSORS, dtype=torch.float64))
    assert record["alpha_summary"]["negative"] == int((alpha < 0).sum())
    soup = soup_of(tmp_path)
    rebuilt = soup_io.rebuild(tmp_path / "soup.recipe.json")
    for k in soup:
        assert_close(rebuilt[k], soup[k], atol=1e-6, rtol=1e-5)
    ingredients = load_zoo(zoo4, 4)
    # learning moved the soup away from the uniform soup
    uniform = torch.stack([sd["classifier.weight"] for sd in ingredients]).mean(0)
    assert (soup["classifier.weight"] - uniform).abs().max() > 1e-4


def test_layer_size_picks_the_blocks(tmp_path, zoo4, fmnist_root):
    huge = mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 2, "--layer-size", 10**9,
                         name="model_wise"))
    assert huge["method"] == "MEHL-Soup" and huge["blocks"] == 1
    alpha = json.loads((tmp_path / "model_wise.coefficients.json").read_text())["alpha"]
    assert len(alpha) == 1 and len(alpha[0]) == 4


def test_projection_equals_autograd_through_functional_call(zoo4, fmnist_root):
    spec = get_arch(TINY_CNN)
    model = spec.build(10)
    sds = load_zoo(zoo4, 4)
    model.load_state_dict(sds[0])
    set_mode(model, frozen_stats=True)
    names = param_names(model)
    sizes = [sds[0][n].numel() for n in names]
    ids = reference.block_ids(sizes, make_blocks(sizes, 0))
    bounds = block_bounds(sizes, make_blocks(sizes, 0))
    B = int(ids.max()) + 1
    rows = torch.stack([reference.flatten(sd, names) for sd in sds])
    P, _ = reference.directions(rows, rows.mean(0), bounds)
    X0 = 0.1 * torch.randn(4, B, generator=torch.Generator().manual_seed(0))
    data = build_dataset("FashionMNIST", str(fmnist_root), spec.preprocess, heldout_per_class=2)
    x, y = next(iter(torch.utils.data.DataLoader(data.heldout, batch_size=12)))

    flat = mehl_step.FlatSoup(model, names)
    flat.theta.copy_(reference.soup(rows.mean(0), X0, P, bounds))
    mehl_step.gradient(model, flat, (x, y), len(y), 0.1)
    projected = hyperplane.project(P, flat.grad, bounds)

    X = X0.clone().requires_grad_()
    theta = rows.mean(0) + (X[:, ids] * P).sum(0)
    params, offset = {}, 0
    for n, size in zip(names, sizes):
        params[n] = theta[offset:offset + size].view(sds[0][n].shape)
        offset += size
    buffers = dict(model.named_buffers())
    logits = torch.func.functional_call(model, {**params, **buffers}, (x,))
    F.cross_entropy(logits, y, label_smoothing=0.1).backward()
    assert_close(projected, X.grad, atol=1e-6, rtol=1e-4)


def test_one_group_equals_optimising_X_with_autograd(tmp_path, zoo4, fmnist_root):
    """K >= N: one group; the script's projected updates equal plain autograd on X (same AdamW, same
    constant lr, same data order)."""
    record = mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 10, "--lr", 0.05,
                           "--randomseed", 3))
    assert len(record["groups"]) == 1
    spec = get_arch(TINY_CNN)
    model = spec.build(10)
    sds = load_zoo(zoo4, 4)
    model.load_state_dict(sds[0])
    names = param_names(model)
    sizes = [sds[0][n].numel() for n in names]
    ids = reference.block_ids(sizes, make_blocks(sizes, 0))
    B = int(ids.max()) + 1
    order = sampling.shuffled(list(range(4)), sampling.models_generator(3))
    rows = torch.stack([reference.flatten(sds[i], names) for i in order])
    center = rows.mean(0)
    P, _ = reference.directions(rows, center, block_bounds(sizes, make_blocks(sizes, 0)))
    X = torch.zeros(4, B, requires_grad=True)
    opt = torch.optim.AdamW([X], lr=0.05, weight_decay=0.0)
    data = build_dataset("FashionMNIST", str(fmnist_root), spec.preprocess, heldout_per_class=4,
                         test_size=20)
    buffers = dict(model.named_buffers())
    set_mode(model, frozen_stats=True)
    data_rng = sampling.data_generator(3)

    def soup():
        theta = center + (X[:, ids] * P).sum(0)
        return dict(zip(names, (t.view(sds[0][n].shape) for n, t in zip(names, theta.split(sizes)))))

    for _ in range(2):
        for _, (x, y) in sampling.rank_batches(data.heldout, 15, data_rng, 1, 0):
            opt.zero_grad()
            logits = torch.func.functional_call(model, {**soup(), **buffers}, (x,))
            F.cross_entropy(logits, y).backward()
            opt.step()
    got = soup_of(tmp_path)
    with torch.no_grad():
        for n, t in soup().items():
            assert_close(got[n], t, atol=2e-6, rtol=1e-4)


@pytest.mark.slow
def test_two_processes_give_the_same_soup_as_one(tmp_path, zoo4, fmnist_root):
    """K = 3 over 2 ranks (2 + 1 rows, then 1 + 0 rows); batch 15 split 8 + 7. Float32 tolerance 1e-5:
    only the order of sums differs."""
    single = mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 3, "--cosine-lr",
                           name="one"))
    args = argv(zoo4, fmnist_root, tmp_path, "--model_batch", 3, "--cosine-lr", name="two")
    done = torchrun("MEHL_soup_layer.py", args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = soup_of(tmp_path, "one"), soup_of(tmp_path, "two")
    for k in one:
        assert_close(two[k], one[k], atol=1e-5, rtol=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines[-1]["world_size"] == 2
    assert_close(torch.tensor(lines[-1]["alpha_summary"]["mean_per_ingredient"]),
                 torch.tensor(single["alpha_summary"]["mean_per_ingredient"]), atol=1e-5, rtol=0)


def test_resume_after_the_first_group_ends_with_the_same_soup(tmp_path, zoo4, fmnist_root):
    mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 1, "--models_epochs", 2,
                  name="straight"))
    assert mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 1, "--models_epochs", 2,
                         "--stop-after-groups", 5, name="cut")) is None
    assert (tmp_path / "cut.state.pt").exists() and not (tmp_path / "cut.pt").exists()
    # a state made with another configuration is refused, naming the argument
    with pytest.raises(UserError, match="--lr"):
        mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 1, "--models_epochs", 2,
                      "--resume", "--lr", 0.02, name="cut"))
    # a state file is not silently overwritten by a new run
    with pytest.raises(UserError, match="--resume"):
        mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 1, "--models_epochs", 2,
                      name="cut"))
    record = mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 1, "--models_epochs", 2,
                           "--resume", name="cut"))
    assert len(record["groups"]) == 8
    straight, cut = soup_of(tmp_path, "straight"), soup_of(tmp_path, "cut")
    for k in straight:
        assert torch.equal(straight[k], cut[k]), k


def test_parameter_identical_in_all_ingredients_is_kept(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3)
    fixed = torch.linspace(-1, 1, 10)
    for i in range(3):
        sd = torch.load(zoo / f"model_{i}.pt", weights_only=True)
        sd["classifier.bias"] = fixed.clone()
        torch.save(sd, zoo / f"model_{i}.pt")
    record = mehl.main(argv(zoo, fmnist_root, tmp_path, "--model_batch", 2, "--layer-size", 10**9))
    assert record["identical_parameters"] == ["classifier.bias"] and record["identical_numbers"] == 10
    soup = soup_of(tmp_path)
    assert torch.isfinite(soup["classifier.weight"]).all()
    assert torch.equal(soup["classifier.bias"], fixed)


def test_differing_batchnorm_statistics_are_reestimated(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3, differ_buffers=True)
    record = mehl.main(argv(zoo, fmnist_root, tmp_path, "--model_batch", 2))
    assert record["batchnorm"] == "re-estimated on held-out"
    soup = soup_of(tmp_path)
    spec = get_arch(TINY_CNN)
    model = spec.build(10)
    model.load_state_dict(soup)
    data = build_dataset("FashionMNIST", str(fmnist_root), spec.preprocess, heldout_per_class=4,
                         test_size=20)
    reestimate(model, data.heldout, torch.device("cpu"), batch_size=15)
    assert_close(model.state_dict()["features.1.running_var"], soup["features.1.running_var"])
    first = torch.load(zoo / "model_0.pt", weights_only=True)
    assert not torch.allclose(first["features.1.running_var"], soup["features.1.running_var"])


def test_identical_statistics_are_kept(tmp_path, zoo4, fmnist_root):
    record = mehl.main(argv(zoo4, fmnist_root, tmp_path, "--model_batch", 4))
    assert record["batchnorm"] == "identical statistics, eval mode"
    first = torch.load(zoo4 / "model_0.pt", weights_only=True)
    assert torch.equal(soup_of(tmp_path)["features.1.running_mean"], first["features.1.running_mean"])


@pytest.mark.parametrize("extra, message", [
    (("--model_batch", 0), "--model_batch"),
    (("--epochs", 0), "--epochs"),
    (("--params_start", 4), "--params_start"),
    (("--labelsmooth", 1.5), "--labelsmooth"),
])
def test_bad_input_is_a_user_error(tmp_path, zoo4, fmnist_root, extra, message):
    with pytest.raises(UserError, match=message):
        mehl.main(argv(zoo4, fmnist_root, tmp_path, *extra))


@pytest.mark.slow
def test_command_line_error_is_one_line(tmp_path, zoo4, fmnist_root):
    import subprocess
    import sys
    from tests.conftest import ROOT
    args = argv(zoo4, fmnist_root, tmp_path, "--model_batch", 0)
    done = subprocess.run([sys.executable, str(ROOT / "MEHL_soup_layer.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --model_batch must be >= 1, got 0"
    assert "Traceback" not in done.stderr
