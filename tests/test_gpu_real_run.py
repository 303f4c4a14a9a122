"""scripts/gpu_check.py --real-run on the CPU: the real MEHL run it watches goes through, --model_batch
auto picks the K the limit was set for, and the temporary zoo is removed (the pinned-memory, host-sync
and peak checks need CUDA: on a GPU the same command checks them)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_real_run_check_runs_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--real-run", "--device", "cpu",
                           "--arch", "tiny-clip", "--batch-size", "16", "--workers", "1", "--zoo-size", "4"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "K = 2 of 4 (as planned: 2)" in done.stdout
    assert "steps: 18, batches read through the run's DataLoader: 18 " in done.stdout and "REAL RUN check passed" in done.stdout
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("gpu_check_real_run.*"))  # removed
