"""scripts/bench_mehl.py: the released step beside this project's, and the environment its workers get."""
import importlib.util
import json

import pytest

from tests import reference
from tests.conftest import ROOT
from utils.runtime.errors import UserError


def bench():
    spec = importlib.util.spec_from_file_location("bench_mehl", ROOT / "scripts" / "bench_mehl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_released_step_beside_ours_and_the_callers_pythonpath_reaches_the_workers(tmp_path, monkeypatch,
                                                                                   capsys):
    # a folder on the caller's PYTHONPATH (gpu_check.sh installs open_clip into one) whose
    # sitecustomize, imported at every interpreter start, notes the command line of each process
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "with open(os.environ['BENCH_MARKER'], 'a') as f:\n"
        "    f.write(' '.join(sys.argv) + '\\n')\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("BENCH_MARKER", str(tmp_path / "started.txt"))
    rows = bench().main(["--arch", "tiny-clip", "--datasets", "ImageNet", "--synthetic-zoo", "2",
                         "--num-classes", "2", "--ks", "2", "--batch-size", "4", "--steps", "1",
                         "--threads", "1", "--baseline", "released", "--profile", str(tmp_path / "prof"),
                         "--out", str(tmp_path / "bench.json")])
    started = (tmp_path / "started.txt").read_text().splitlines()
    workers = [line for line in started if "--worker" in line]
    assert len(workers) == 3, started       # the plain run, ours and the released step at K = 2
    assert {w.split("--step ")[1].split()[0] for w in workers} == {"project", "released"}

    assert [(r["k"], r["step"]) for r in rows] == [(2, "project"), (2, "released")]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["step"] for r in saved["runs"]] == ["project", "released"] and saved["plain"]["step"] == "plain"
    assert all(r["seconds_per_step"] > 0 and r["x_plain"] > 0 and r["kernels_per_step"] > 0
               for r in saved["runs"])
    out = capsys.readouterr().out
    assert "project / released: x plain" in out
    for name in ("plain_k0", "project_k2", "released_k2"):
        text = (tmp_path / "prof" / f"profile_{name}.txt").read_text()
        assert text.split()[1:3] == ["ops", "in"] and "Self CPU" in text


def test_released_baseline_is_float32_only():
    with pytest.raises(UserError, match="--baseline released .* float32"):
        bench().main(["--synthetic-zoo", "2", "--baseline", "released", "--directions-dtype", "bfloat16"])


@pytest.mark.parametrize("clip", [False, True])
def test_released_step_and_ours_move_the_soup_alike(clip):
    import copy

    import torch
    from torch.testing import assert_close

    from utils.run import mehl
    from utils.soup.schedules import constant

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    theirs = copy.deepcopy(ours)
    names, sizes = [n for n, _ in ours.named_parameters()], [p.numel() for p in ours.parameters()]
    bounds = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
    soup = mehl.FlatSoup(ours, names)
    center = soup.theta.clone()
    P, inv = reference.directions(center + torch.randn(3, center.numel()), center, bounds)
    groups = []
    for _ in range(2):
        X = torch.zeros(3, len(bounds), requires_grad=True)
        groups.append(mehl.Group(center, P, inv, X, torch.optim.AdamW([X], lr=0.05), constant(0.05)))
    batch = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    for _ in range(3):
        mehl.step(ours, soup, groups[0], bounds, batch, 5, clip=clip)
        bench().released_step(theirs, list(theirs.parameters()), groups[1], bounds, batch, clip)
    assert_close(groups[1].X, groups[0].X, atol=1e-6, rtol=1e-5)
    assert_close(torch.cat([p.detach().reshape(-1) for p in theirs.parameters()]), soup.theta,
                 atol=1e-6, rtol=1e-5)
