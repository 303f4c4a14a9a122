"""scripts/gpu_check.sh, which runs unattended in one call on a lent GPU, smoke-tested on the CPU with
tiny-clip: every stage runs, the outputs land in $OUT and nothing is left that would refuse a second run."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_script_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "out"
    default_state = ROOT / "runs" / "MEHL-Soup+.state.pt"
    before = default_state.stat().st_mtime if default_state.exists() else None
    started = time.time()
    env = {**os.environ, "ARCH": "tiny-clip", "DEVICE": "cpu", "BATCH": "4", "KS": "2", "K": "2", "NZOO": "2",
           "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "== failed" not in done.stdout
    # the side-by-side table, the profiler tables, the block-product check, the torchrun run
    assert "project / released: x plain" in done.stdout
    for name in ("project_k2", "released_k2"):
        assert (out / "profiles" / f"profile_{name}.txt").read_text().split()[1] == "ops"
    assert "MEHL check passed" in (out / "mehl_check.txt").read_text()
    assert [r["step"] for r in json.loads((out / "bench_mehl_float32.json").read_text())["runs"]] == \
        ["project", "released"]
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "MEHL-Soup+" and record["world_size"] == 1
    # the MEHL run kept its state in the scratch folder, removed at the end, not in runs/
    after = default_state.stat().st_mtime if default_state.exists() else None
    assert after == before or after < started
