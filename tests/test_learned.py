"""Learned-Soup(+): soup math, gradients, learning on a toy problem, BatchNorm rules, memory refusal,
and 1 vs 2 gloo processes."""
import json
from functools import partial

import pytest
import torch
from torch import nn

import learned_soup
import uniform_soup
from tests import helpers
from tests.conftest import make_zoo, torchrun
from tests.models import TINY_CNN
from utils.archs import get_arch
from utils.files import results
from utils.files.soup_io import rebuild
from utils.files.state_dicts import load_state_dict
from utils.runtime.errors import UserError
from utils.soup import learned
from utils.soup.blocks import make_blocks


argv = partial(helpers.argv, heldout=5, test_size=40, batch_size=None, name=None)


# ----------------------------------------------------------------------------------------- math
def tiny_problem(n=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    for p in model.parameters():
        p.requires_grad_(False)
    stacked = {k: torch.randn(n, *p.shape, dtype=torch.float64) for k, p in model.named_parameters()}
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    return model, stacked, x, y


def blocks_of(names, sizes, layer_size):
    """Blocks as lists of names (layer_size None: one block)."""
    return [[names[i] for i in block] for block in make_blocks(sizes, layer_size)]

def test_initial_soup_is_uniform_mean():
    model, stacked, _, _ = tiny_problem()
    names = list(stacked)
    for layer_size in (None, 0):
        blocks = blocks_of(names, [stacked[k][0].numel() for k in names], layer_size)
        raw = learned.init_raw(len(blocks), 3)
        mixed = learned.mix(stacked, torch.softmax(raw, 1), learned.owners(blocks))
        for k in names:
            torch.testing.assert_close(mixed[k], stacked[k].mean(0))
    assert len(blocks_of(names, [1] * 4, 0)) == 4


def test_gradient_matches_finite_differences():
    model, stacked, x, y = tiny_problem()
    names = list(stacked)
    blocks = blocks_of(names, [stacked[k][0].numel() for k in names], 0)
    owner = learned.owners(blocks)
    raw = torch.randn(len(blocks), 3, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    loss = learned.soup_loss(model, stacked, raw, beta, owner, x, y, len(y))
    g_raw, g_beta = torch.autograd.grad(loss, [raw, beta])

    def f(r, b):
        with torch.no_grad():
            return learned.soup_loss(model, stacked, r, b, owner, x, y, len(y)).item()
    eps = 1e-6
    fd = torch.zeros_like(raw)
    for idx in range(raw.numel()):
        d = torch.zeros(raw.numel(), dtype=torch.float64)
        d[idx] = eps
        d = d.view_as(raw)
        fd.view(-1)[idx] = (f(raw.detach() + d, beta.detach()) - f(raw.detach() - d, beta.detach())) / (2 * eps)
    torch.testing.assert_close(g_raw, fd, rtol=1e-6, atol=1e-8)
    fd_beta = (f(raw.detach(), beta.detach() + eps) - f(raw.detach(), beta.detach() - eps)) / (2 * eps)
    assert abs(g_beta.item() - fd_beta) < 1e-7
    assert g_raw.abs().sum() > 0


# ---------------------------------------------------------------------------------------- script
def test_epochs_zero_is_uniform_soup(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3)
    learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--epochs", "0", "--save-soup", tmp_path / "l.pt"))
    uniform_soup.main(argv(zoo, fmnist_root, tmp_path, "--save-soup", tmp_path / "u.pt"))
    a, b = load_state_dict(tmp_path / "l.pt"), load_state_dict(tmp_path / "u.pt")
    for k in b:
        torch.testing.assert_close(a[k], b[k])
    lines = results.read(tmp_path / "results.jsonl")
    assert lines[0]["method"] == "Learned-Soup" and lines[0]["alpha"] == pytest.approx([1 / 3] * 3)
    assert lines[0]["heldout"] == lines[1]["heldout"] and lines[0]["test"] == lines[1]["test"]


def train_good(data_root, steps=60):
    """A tiny_cnn trained briefly on the tiny Fashion-MNIST (learnable templates)."""
    from datasets import build_dataset
    spec = get_arch(TINY_CNN)
    bundle = build_dataset("FashionMNIST", data_root, spec.preprocess, heldout_per_class=5, test_size=40)
    model = spec.build(10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(bundle.finetune, batch_size=50, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model.state_dict()


def test_coefficients_move_to_good_ingredient(tmp_path, fmnist_root):
    good = train_good(fmnist_root)
    bad = {k: v.clone() for k, v in good.items()}
    bad["classifier.weight"] = good["classifier.weight"].roll(3, dims=0)  # confidently wrong classes
    bad["classifier.bias"] = good["classifier.bias"].roll(3, dims=0)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    torch.save(bad, zoo / "model_0.pt")
    torch.save(good, zoo / "model_1.pt")
    out = tmp_path / "soup.pt"
    record = learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--epochs", "8", "--batch-size", "10",
                                      "--save-soup", out))
    assert record["alpha"][1] > 0.8, record["alpha"]
    losses = record["heldout_loss_per_epoch"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert record["batchnorm"] != "re-estimated on held-out"
    coeff = json.loads((tmp_path / "soup.coefficients.json").read_text())
    assert coeff["alpha"][0][1] == pytest.approx(record["alpha"][1])
    assert [item["path"] for item in coeff["ingredients"]] == [str((zoo / f"model_{i}.pt").resolve()) for i in (0, 1)]
    assert coeff["temperature"] == record["temperature"]
    # the recipe rebuilds the soup without learning
    rebuilt, soup = rebuild(tmp_path / "soup.recipe.json"), load_state_dict(out)
    for k in soup:
        torch.testing.assert_close(rebuilt[k], soup[k])


def test_report_reads_the_coefficients_sidecar_learned_soup_writes(tmp_path):
    """report.py falls back to `<soup>.coefficients.json` when a line holds no alpha: it must read the
    file as learned soup writes it (`soup_io.coefficients_file`, its ingredients named by path and sha256)."""
    from report import coefficients_of
    from utils.files.soup_io import coefficients_file, sidecar, write_json
    named = [{"path": str(tmp_path / f"model_{i}.pt"), "sha256": "0" * 64} for i in (3, 5)]
    alpha = [[0.25, 0.75], [0.6, 0.4]]
    write_json(sidecar(tmp_path / "soup.pt", "coefficients"),
               {"ingredients": named, **coefficients_file([["a.weight"], ["b.weight"]], alpha, temperature=1.5)})
    assert coefficients_of({"method": "Learned-Soup+", "soup_file": str(tmp_path / "soup.pt")}) == alpha


def test_layerwise_one_row_per_tensor_and_identical_kept(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3)
    kept = torch.load(zoo / "model_0.pt")["features.0.bias"]
    for i in (1, 2):  # a parameter frozen during fine-tuning: identical in every ingredient
        sd = torch.load(zoo / f"model_{i}.pt")
        sd["features.0.bias"] = kept.clone()
        torch.save(sd, zoo / f"model_{i}.pt")
    out = tmp_path / "plus.pt"
    record = learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--layerwise", "--epochs", "1",
                                      "--save-soup", out))
    n_params = len(list(get_arch(TINY_CNN).build(10).parameters()))
    assert record["method"] == "Learned-Soup+" and record["blocks"] == n_params - 1
    assert record["identical_parameters"] == ["features.0.bias"]
    recipe = json.loads((tmp_path / "plus.recipe.json").read_text())
    alpha = torch.tensor(recipe["coefficients"]["alpha"])
    assert alpha.shape == (n_params - 1, 3)
    torch.testing.assert_close(alpha.sum(1), torch.ones(n_params - 1, dtype=alpha.dtype))
    assert all(len(b) == 1 for b in recipe["coefficients"]["blocks"])
    soup, first = load_state_dict(out), torch.load(zoo / "model_0.pt")
    assert torch.equal(soup["features.0.bias"], kept)
    # identical BatchNorm statistics: kept exactly, so those layers ran in eval mode while learning
    assert record["batchnorm"] != "re-estimated on held-out"
    for k in ("features.1.running_mean", "features.1.running_var", "features.4.running_var"):
        assert torch.equal(soup[k], first[k]), k
    # --layer-size larger than the model: one block again
    record = learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--layer-size", "100000000", "--epochs",
                                      "1", "--save-soup", "none"))
    assert record["method"] == "Learned-Soup+" and record["blocks"] == 1


def test_differing_batchnorm_statistics_are_reestimated(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 2, differ_buffers=True)
    out = tmp_path / "bn.pt"
    record = learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--epochs", "1", "--save-soup", out))
    assert record["batchnorm"] == "re-estimated on held-out"
    soup = load_state_dict(out)
    sds = [torch.load(zoo / f"model_{i}.pt") for i in range(2)]
    mean_var = (sds[0]["features.1.running_var"] + sds[1]["features.1.running_var"]) / 2
    assert not torch.allclose(soup["features.1.running_var"], mean_var)
    recipe = json.loads((tmp_path / "bn.recipe.json").read_text())
    assert recipe["batchnorm"] == "re-estimated on held-out"
    assert "features.1.running_var" in recipe["coefficients"]["reestimated_buffers"]


def test_memory_refusal(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3)
    with pytest.raises(UserError, match=r"3 resident ingredients need about .* GiB"):
        learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--memory-limit", "0.0001", "--save-soup", "none"))
    assert not (tmp_path / "results.jsonl").exists()
    record = learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--memory-limit", "0.0001",
                                      "--memory-check", "off", "--epochs", "0", "--save-soup", "none"))
    assert record["memory_estimate_bytes"] > record["memory_available_bytes"]


def test_bad_flags(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 2)
    with pytest.raises(UserError, match="--lr"):
        learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--lr", "0"))
    with pytest.raises(UserError, match="--layer-size"):
        learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--layer-size", "-1"))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3, noise=0.2)
    flags = ["--layerwise", "--epochs", "2", "--batch-size", "16", "--seed", "3"]
    r1 = torchrun("learned_soup.py", argv(zoo, fmnist_root, tmp_path / "one", *flags, "--save-soup",
                                            tmp_path / "one.pt"), nproc=1)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = torchrun("learned_soup.py", argv(zoo, fmnist_root, tmp_path / "two", *flags, "--save-soup",
                                            tmp_path / "two.pt"), nproc=2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a = results.read(tmp_path / "one" / "results.jsonl")[-1]
    b = results.read(tmp_path / "two" / "results.jsonl")[-1]
    assert b["world_size"] == 2
    assert a["heldout"] == b["heldout"] and a["test"] == b["test"] and a["shifts"] == b["shifts"]
    assert a["heldout_loss_per_epoch"] == pytest.approx(b["heldout_loss_per_epoch"], rel=1e-5)
    assert a["temperature"] == pytest.approx(b["temperature"], rel=1e-5)
    ca = json.loads((tmp_path / "one.recipe.json").read_text())["coefficients"]["alpha"]
    cb = json.loads((tmp_path / "two.recipe.json").read_text())["coefficients"]["alpha"]
    torch.testing.assert_close(torch.tensor(ca), torch.tensor(cb), rtol=1e-4, atol=1e-5)
    assert torch.tensor(ca).std(1).max() > 1e-4  # the coefficients did move
