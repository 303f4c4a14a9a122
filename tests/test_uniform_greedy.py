"""Uniform and greedy soups, individual accuracies and --exclude-top, on tiny CPU zoos."""
import json
from functools import partial

import pytest
import numpy as np
import torch

import greedy_soup
import uniform_soup
from tests import helpers
from tests.conftest import make_zoo, torchrun
from tests.models import TINY_CNN
from utils.archs import get_arch
from utils.files import results
from utils.files.state_dicts import load_state_dict
from utils.run import evaluation
from utils.runtime.errors import UserError


argv = partial(helpers.argv, heldout=5, test_size=40, batch_size=64, device=None, name=None)


# ------------------------------------------------------------------------------------------ uniform
def test_uniform_soup_equals_in_memory_mean(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3, differ_buffers=True)
    for i in range(3):  # an integer buffer that differs: the soup must take the first's
        sd = torch.load(zoo / f"model_{i}.pt")
        sd["features.1.num_batches_tracked"] = torch.tensor(10 + i)
        torch.save(sd, zoo / f"model_{i}.pt")
    out = tmp_path / "uniform.pt"
    record = uniform_soup.main(argv(zoo, fmnist_root, tmp_path, "--save-soup", out))

    sds = [torch.load(zoo / f"model_{i}.pt") for i in range(3)]
    soup = load_state_dict(out)
    for k, v in sds[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(soup[k], torch.stack([sd[k] for sd in sds]).mean(0))
        else:
            assert torch.equal(soup[k], v), k
    assert soup["features.1.num_batches_tracked"].item() == 10
    assert not torch.equal(soup["features.1.running_mean"], sds[0]["features.1.running_mean"])
    line = results.read(tmp_path / "results.jsonl")[-1]
    assert line["method"] == "uniform" and line["ingredients"] == [0, 1, 2]
    assert 0 <= line["test"] <= 100 and set(line["shifts"]) and line["heldout"] == record["heldout"]
    recipe = json.loads((tmp_path / "uniform.recipe.json").read_text())
    assert len(recipe["ingredients"]) == 3


def test_bad_input_fails_before_work(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3)
    (zoo / "model_1.pt").unlink()
    with pytest.raises(UserError, match="missing"):
        uniform_soup.main(argv(zoo, fmnist_root, tmp_path, "--save-soup", "none"))
    zoo2 = make_zoo(tmp_path / "zoo2", 2)
    with pytest.raises(UserError, match="leaves no ingredient"):
        greedy_soup.main(argv(zoo2, fmnist_root, tmp_path, "--save-soup", "none", "--exclude-top", "2"))
    with pytest.raises(UserError, match="empty range|must be <"):
        uniform_soup.main(argv(zoo2, fmnist_root, tmp_path, "--params_start", "1", "--params_end", "1"))
    # a checkpoint of another architecture (10 classes -> 3)
    torch.save(get_arch(TINY_CNN).build(3).state_dict(), zoo2 / "model_1.pt")
    with pytest.raises(UserError, match="does not match"):
        greedy_soup.main(argv(zoo2, fmnist_root, tmp_path, "--save-soup", "none"))
    assert not (tmp_path / "results.jsonl").exists()  # nothing was evaluated


# ------------------------------------------------------------------------------- greedy, by hand
def coded_zoo(folder, n):
    """Ingredient i = the tiny_cnn start with classifier.bias + e_i: the bias of any mean of
    ingredients tells which were averaged."""
    folder.mkdir(parents=True, exist_ok=True)
    base = get_arch(TINY_CNN).build(10).state_dict()
    for i in range(n):
        sd = {k: v.clone() for k, v in base.items()}
        sd["classifier.bias"] = base["classifier.bias"] + torch.eye(10)[i]
        torch.save(sd, folder / f"model_{i}.pt")
    return folder, base["classifier.bias"]


def fake_accuracy(base_bias, table, calls):
    """Replacement for utils.run.evaluation.accuracy: the held-out accuracy of a soup is looked up by the
    set of ingredients in it; test / shifts get 50. With `keep`, every example's rows say label 0, top 0."""
    def accuracy(model, dataset, device, batch_size=256, workers=0, project=None, desc="eval", keep=False):
        members = frozenset(torch.nonzero((model.classifier.bias.detach() - base_bias) > 1e-3)
                            .flatten().tolist())
        calls.append((desc, members))
        score = table.get(members, 0.0) if desc == "held-out" else 50.0
        return (score, np.zeros((len(dataset), 6), np.int16)) if keep else score
    return accuracy


TABLE = {  # singletons: 1 and 2 tie at 80 (1 first), then 4, 0, 3
    frozenset({0}): 70.0, frozenset({1}): 80.0, frozenset({2}): 80.0, frozenset({3}): 60.0,
    frozenset({4}): 75.0,
    frozenset({1, 2}): 80.0,      # equal, not above: dropped (strict rule)
    frozenset({1, 4}): 82.0,      # kept
    frozenset({0, 1, 4}): 81.0,   # below: dropped
    frozenset({1, 3, 4}): 83.0,   # kept
}


def test_greedy_known_answer_and_cache(tmp_path, fmnist_root, monkeypatch):
    zoo, base_bias = coded_zoo(tmp_path / "zoo", 5)
    calls = []
    monkeypatch.setattr(evaluation, "accuracy", fake_accuracy(base_bias, TABLE, calls))
    monkeypatch.setattr(greedy_soup, "accuracy", evaluation.accuracy)
    out = tmp_path / "greedy.pt"
    record = greedy_soup.main(argv(zoo, fmnist_root, tmp_path, "--save-soup", out))

    assert record["order"] == [1, 2, 4, 0, 3]
    assert record["ingredients"] == [1, 4, 3]
    assert [s["kept"] for s in record["steps"]] == [True, False, True, False, True]
    assert record["heldout_steps"] == [80.0, 80.0, 82.0, 81.0, 83.0]
    assert record["heldout"] == 83.0
    sds = [torch.load(zoo / f"model_{i}.pt") for i in (1, 4, 3)]
    soup = load_state_dict(out)
    torch.testing.assert_close(soup["classifier.bias"], torch.stack([sd["classifier.bias"] for sd in sds]).mean(0))
    lines = results.read(tmp_path / "results.jsonl")
    assert sorted(r["index"] for r in lines if r["method"] == "individual") == [0, 1, 2, 3, 4]

    # second run: the five individual accuracies come from the results file
    calls.clear()
    greedy_soup.main(argv(zoo, fmnist_root, tmp_path, "--save-soup", out, "--overwrite"))
    singles = [m for d, m in calls if len(m) == 1 and d == "held-out"]
    assert singles == []
    lines = results.read(tmp_path / "results.jsonl")
    assert sum(r["method"] == "individual" for r in lines) == 5
    assert lines[-1]["ingredients"] == [1, 4, 3]

    # --exclude-top 2 drops 1 and 2 (the two best): order 4, 0, 3
    greedy_soup.main(argv(zoo, fmnist_root, tmp_path, "--save-soup", "none", "--exclude-top", "2"))
    last = results.read(tmp_path / "results.jsonl")[-1]
    assert last["order"] == [4, 0, 3] and last["excluded"] == [1, 2]
    assert last["ingredients"] == [4]  # {0,4}, {3,4} are not in the table: 0 < 75


def test_uniform_exclude_top(tmp_path, fmnist_root, monkeypatch):
    zoo, base_bias = coded_zoo(tmp_path / "zoo", 5)
    calls = []
    monkeypatch.setattr(evaluation, "accuracy", fake_accuracy(base_bias, TABLE, calls))
    out = tmp_path / "u.pt"
    record = uniform_soup.main(argv(zoo, fmnist_root, tmp_path, "--save-soup", out, "--exclude-top", "3"))
    assert record["ingredients"] == [0, 3]
    soup = load_state_dict(out)
    expect = base_bias + (torch.eye(10)[0] + torch.eye(10)[3]) / 2
    torch.testing.assert_close(soup["classifier.bias"], expect)


def test_individual_cache_key_tracks_configuration(tmp_path, fmnist_root, monkeypatch):
    zoo, base_bias = coded_zoo(tmp_path / "zoo", 2)
    calls = []
    monkeypatch.setattr(evaluation, "accuracy", fake_accuracy(base_bias, TABLE, calls))
    base = argv(zoo, fmnist_root, tmp_path, "--save-soup", "none")
    greedy_soup.main(base)
    greedy_soup.main([*base, "--test-size", "30"])  # another test size: evaluated again
    lines = [r for r in results.read(tmp_path / "results.jsonl") if r["method"] == "individual"]
    assert [r["test_size"] for r in lines] == [40, 40, 30, 30]


# ---------------------------------------------------------------------------------- distributed
@pytest.mark.slow
@pytest.mark.parametrize("script", ["greedy_soup.py", "uniform_soup.py"])
def test_two_processes_match_one(tmp_path, fmnist_root, script):
    zoo = make_zoo(tmp_path / "zoo", 3, noise=0.2)
    one = argv(zoo, fmnist_root, tmp_path / "one", "--save-soup", tmp_path / "one.pt", "--device", "cpu")
    two = argv(zoo, fmnist_root, tmp_path / "two", "--save-soup", tmp_path / "two.pt", "--device", "cpu")
    r1 = torchrun(script, one, nproc=1)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = torchrun(script, two, nproc=2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a = results.read(tmp_path / "one" / "results.jsonl")
    b = results.read(tmp_path / "two" / "results.jsonl")
    assert b[-1]["world_size"] == 2 and len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("heldout", "test", "shifts", "ingredients", "index"):
            assert x.get(key) == y.get(key), key
    sa, sb = load_state_dict(tmp_path / "one.pt"), load_state_dict(tmp_path / "two.pt")
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
