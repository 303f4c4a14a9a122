"""Distributed failures (docs/GUARANTEES.md): under torchrun with two gloo processes, one rank failing (a bad
ingredient only it loads, a crash, a hang) ends both processes with a non-zero exit and the error in a
bounded time; nothing waits forever in a collective. A rendezvous that cannot complete ends with one
clear line.

Faults are injected into rank 1 only, from the test side: a `sitecustomize.py` put first on PYTHONPATH
wraps `utils.files.ingredients.load_checked` when it is called from MEHL's `load_rows` (each rank loads only
its share of a group there, after the preflight check has passed)."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT, free_port, make_zoo, torchrun
from tests.helpers import argv

HOOK = textwrap.dedent('''
    import os, sys, time
    fault = os.environ.get("SOUP_TEST_FAULT")
    if fault and os.environ.get("RANK") == "1":
        from utils.files import ingredients
        from utils.runtime.errors import UserError
        real = ingredients.load_checked

        def load_checked(path, reference):
            if sys._getframe(1).f_code.co_name == "load_rows":
                if fault == "bad-file":
                    raise UserError(f"{path}: not a readable checkpoint (injected on rank 1)")
                if fault == "crash":
                    raise RuntimeError("injected crash on rank 1")
                if fault == "hang":
                    time.sleep(3600)
            return real(path, reference)

        ingredients.load_checked = load_checked
''')


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("distzoo"), 4)


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hook")
    (folder / "sitecustomize.py").write_text(HOOK)
    return folder


def mehl_args(zoo, data, out):
    return argv(zoo, data, out, "--epochs", 1, "--model_batch", 4, "--no-epoch-test", heldout=4,
                batch_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("fault, expected", [
    ("bad-file", "not a readable checkpoint (injected on rank 1)"),
    ("crash", "injected crash on rank 1"),
    ("hang", "Timed out"),  # rank 0 gives up waiting in the collective after SOUP_DIST_TIMEOUT
])
def test_one_rank_failing_ends_both_in_bounded_time(tmp_path, zoo, fmnist_root, hook, fault, expected):
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "SOUP_TEST_FAULT": fault, "SOUP_DIST_TIMEOUT": "15"}
    # subprocess.run's timeout raises (failing the test) if anything hangs
    done = torchrun("MEHL_soup_layer.py", mehl_args(zoo, fmnist_root, tmp_path), nproc=2, timeout=150,
                    env=env)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert expected.lower() in output.lower(), output[-4000:]
    assert not (tmp_path / "soup.pt").exists() and not (tmp_path / "results.jsonl").exists()


@pytest.mark.slow
def test_a_bad_ingredient_seen_by_one_rank_in_preflight_stops_both(tmp_path, zoo, fmnist_root):
    """The preflight check is sharded (rank 1 reads model_2 and model_3) and agreed on: both ranks stop
    with the file's name and exit status 2, before any work."""
    bad_zoo = tmp_path / "zoo"
    bad_zoo.mkdir()
    for i in range(4):
        (bad_zoo / f"model_{i}.pt").write_bytes((zoo / f"model_{i}.pt").read_bytes())
    (bad_zoo / "model_3.pt").write_bytes((zoo / "model_3.pt").read_bytes()[:1000])
    done = torchrun("MEHL_soup_layer.py", mehl_args(bad_zoo, fmnist_root, tmp_path), nproc=2, timeout=150)
    assert done.returncode != 0
    assert f"error: {bad_zoo / 'model_3.pt'}: not a readable checkpoint (truncated or another format)" \
        in done.stderr, done.stderr[-4000:]
    assert "error: another rank failed (see its message above)" in done.stderr
    # the only traceback is torchrun's own report that its workers failed; none comes from the workers
    frames = [line for line in done.stderr.splitlines() if line.startswith('  File "')]
    assert all("torch/distributed" in f or "<frozen runpy>" in f for f in frames), frames
    assert "ChildFailedError" in done.stderr
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("who", ["rank 0 alone", "rank 1, nobody listening"])
def test_rendezvous_that_cannot_complete(tmp_path, zoo, fmnist_root, who):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "RANK": "0" if who == "rank 0 alone" else "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "SOUP_DIST_TIMEOUT": "5"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "uniform_soup.py"),
                           "--model-location", str(zoo), "--arch", "tiny-cnn", "--data-location",
                           str(fmnist_root), "--device", "cpu", "--results-db", str(tmp_path / "r.jsonl"),
                           "--save-soup", "none"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not join the process group (gloo, MASTER_ADDR=127.0.0.1, "
                           f"MASTER_PORT={port}): "), last
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 110  # bounded by SOUP_DIST_TIMEOUT, not the 600 s default
