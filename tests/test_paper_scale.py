"""scripts/paper_scale.py: the launcher's pipeline on stand-ins, timed step by step (issue 22, item 1)."""
import json
import os
import subprocess
import sys

import pytest

from scripts import paper_scale
from tests.conftest import ROOT
from utils.runtime.errors import UserError

STEP_NAMES = ["individual evaluations", "uniform soup", "greedy soup", "Learned-Soup+ (estimate or refusal)",
              "MEHL-Soup+", "report"]


def test_out_must_be_fresh_and_overwrite_removes_only_its_own_entries(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="is not empty"):
        paper_scale.prepare_out(out, overwrite=False)
    with pytest.raises(UserError, match="did not write"):
        paper_scale.prepare_out(out, overwrite=True)
    (out / "mine.txt").unlink()
    paper_scale.prepare_out(out, overwrite=False)            # empty: taken, marked as ours
    (out / "zoo").mkdir()
    (out / "zoo" / "model_0.pt").write_text("x")
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="is not empty"):
        paper_scale.prepare_out(out, overwrite=False)
    paper_scale.prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [paper_scale.MARKER, "mine.txt"]


def test_extrapolation_scales_each_pass_to_its_set_in_full_batches():
    """A pass is its start (first wait beyond a steady one) plus, per full batch at the paper's count,
    the mean wait and the mean body of full batches; the rest of the step is fixed."""
    counts = {"heldout": 8, "test": 12}
    evaluation = {"batch_size": 4, "dataset_len": 12,
                  "batches": [[1.0, 0.2, 4, False], [0.1, 0.2, 4, False], [0.1, 0.2, 4, False]]}
    learning = {"batch_size": None, "dataset_len": 8, "batches": [[0.5, 1.0, 4, True], [0.0, 1.0, 4, True]]}
    data, fixed, total, by_set = paper_scale.extrapolate([{"passes": [evaluation, learning]}], 10.0, counts)
    assert data == pytest.approx(1.8 + 2.5) and fixed == pytest.approx(10.0 - 4.3)
    test = 0.9 + (50000 // 4) * 0.3                  # val: 50 000 images in batches of 4
    heldout = 0.5 + (26000 // 4) * 1.0                # held-out: 26 000 in batches of 4 (the largest seen)
    assert by_set == {"test": pytest.approx(test, abs=0.1), "heldout": pytest.approx(heldout, abs=0.1)}
    assert total == pytest.approx(fixed + test + heldout)


@pytest.mark.slow
def test_cpu_small_preset_runs_the_launchers_pipeline(tmp_path):
    out = tmp_path / "scale"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "paper_scale.py"), "--preset", "cpu-small",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "paper_scale.json").read_text())
    assert [p["name"] for p in doc["phases"]] == STEP_NAMES
    for phase in doc["phases"]:
        assert phase["exit_code"] == 0 and phase["seconds"] > 0, phase
        assert 100 * 2**20 < phase["peak_rss_bytes"] < 8 * 2**30 and phase["peak_gpu_bytes"] is None, phase
        assert phase["extrapolated_seconds"] >= phase["fixed_seconds"] - 0.05, phase
        if phase["name"] != "report":
            assert phase["passes"] > 0 and phase["data_seconds"] > 0, phase
    assert "MEHL-Soup+" in done.stdout and "at paper counts" in done.stdout
    lines = [json.loads(line) for line in (out / "run" / "results.jsonl").read_text().splitlines()]
    methods = [r["method"] for r in lines]
    assert methods.count("individual") == 6   # the individual step's; greedy soup reused them
    assert {"uniform", "greedy", "Learned-Soup+", "MEHL-Soup+"} <= set(methods)
    assert (out / "run" / "report" / "report.md").is_file()
    # each step's peak is its own process's (VmHWM at exit), what the script saw when it wrote its
    # results line or a little more (the kernel's resident counts lag by a few pages per thread)
    peaks = {p["step"]: p["peak_rss_bytes"] for p in doc["phases"]}
    for step, method in (("uniform", "uniform"), ("greedy", "greedy"), ("mehl", "MEHL-Soup+")):
        line = next(r for r in lines if r["method"] == method)
        assert 0.99 * line["peak_memory_bytes"] <= peaks[step] <= 1.1 * line["peak_memory_bytes"], step
