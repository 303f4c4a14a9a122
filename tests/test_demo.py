"""The demo script end to end in its reduced size mode (3 tiny ingredients, tiny data), and a rerun
that skips every finished step."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.models import TINY_CNN


def run_demo(out, zoo, data):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DEMO_SKIP_SETUP": "1",
           "DEMO_OUT": str(out), "DEMO_ZOO": str(zoo), "DEMO_DATA": str(data), "DEMO_N": "3",
           "DEMO_ARCH": TINY_CNN, "DEMO_TEST_SIZE": "100", "DEMO_K": "2", "DEMO_FIRST_N": "2",
           "DEMO_EXCLUDE": "1", "DEMO_SEEDS": "1 2",
           "DEMO_ZOO_FLAGS": "--heldout-per-class 10 --finetune-size 200 --test-size 100 "
                             "--epochs-min 1 --epochs-max 1",
           "DEMO_SOUP_FLAGS": "--heldout-per-class 10 --batch-size 50"}
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_demo_reduced_size_end_to_end(tmp_path, fmnist_root):
    out, zoo = tmp_path / "demo", tmp_path / "zoo"
    proc = run_demo(out, zoo, fmnist_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in zoo.glob("model_*.pt")) == ["model_0.pt", "model_1.pt", "model_2.pt"]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    methods = [r["method"] for r in lines]
    assert methods.count("individual") == 3  # every ingredient evaluated once, then cached
    for m in ("greedy", "uniform", "Learned-Soup", "Learned-Soup+", "MEHL-Soup", "MEHL-Soup+"):
        assert m in methods, m
    report = (out / "report" / "report.md").read_text()
    for row in ("best individual", "uniform soup", "greedy soup", "Learned-Soup+", "MEHL-Soup+",
                "Removing the top-k"):
        assert row in report, row
    for png in ("ingredients.png", "scatter.png", "coefficients.png"):
        assert (out / "report" / png).stat().st_size > 1000
    # the table is printed last
    assert proc.stdout.rstrip().splitlines()[-1].startswith("demo done")
    # MEHL-Soup+ over the seeds: one row with their mean and spread
    assert sorted(r["args"]["randomseed"] for r in lines if r["method"] == "MEHL-Soup+"
                  and r["ingredients"] == [0, 1, 2]) == [1, 2]
    assert "| MEHL-Soup+ (mean ± sd of 2 seeds) |" in proc.stdout
    assert "How far each soup went" in report and (out / "report" / "distances.csv").is_file()
    # every line names its predictions file (issue 28): test and each shift it was scored on, 100 examples
    from utils.files import predictions
    for r in lines:
        sets = dict(predictions.check_field(r["predictions"]))
        assert sets["test"] == 100 and all(sets[f"shift/{s}"] == 100 for s in r.get("shifts") or {})
        assert predictions.load(out / "results.jsonl", r["predictions"])["test"].shape == (100, 6)
    assert "Paired comparisons" in report and ("p=" in report or "p<" in report)
    assert "The paper's claims, tested" in report

    again = run_demo(out, zoo, fmnist_root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "exists, skipped" in again.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)
