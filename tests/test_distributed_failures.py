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
from tests.models import TINY_CNN

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
                           "--model-location", str(zoo), "--arch", TINY_CNN, "--data-location",
                           str(fmnist_root), "--device", "cpu", "--results-db", str(tmp_path / "r.jsonl"),
                           "--save-soup", "none"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not join the process group (gloo, MASTER_ADDR=127.0.0.1, "
                           f"MASTER_PORT={port}): "), last
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 110  # bounded by SOUP_DIST_TIMEOUT, not the 600 s default


# ----------------------------------------------------------- the environment, read and checked in one place
@pytest.mark.parametrize("variables, said", [
    ({"LOCAL_RANK": "abc"}, "environment variable LOCAL_RANK='abc': must be a whole number >= 0"),
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE='abc': must be a whole number >= 1"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0': must be a whole number >= 1"),
    ({"LOCAL_WORLD_SIZE": "0"}, "environment variable LOCAL_WORLD_SIZE='0': must be a whole number >= 1"),
    ({"RANK": "-1"}, "environment variable RANK='-1': must be a whole number >= 0"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "environment variables RANK=2 and WORLD_SIZE=2: RANK must be below"),
    ({"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, "environment variables LOCAL_RANK=3 and LOCAL_WORLD_SIZE=2"),
    ({"MASTER_PORT": "70000"}, "environment variable MASTER_PORT='70000': must be a whole number in [1, 65535]"),
    ({"MASTER_PORT": "http"}, "environment variable MASTER_PORT='http': must be a whole number in [1, 65535]"),
    ({"SOUP_DIST_TIMEOUT": "0"}, "environment variable SOUP_DIST_TIMEOUT='0': must be a number of seconds > 0"),
    ({"SOUP_DIST_TIMEOUT": "nan"}, "environment variable SOUP_DIST_TIMEOUT='nan': must be a number of seconds"),
    ({"SOUP_DIST_TIMEOUT": "inf"}, "environment variable SOUP_DIST_TIMEOUT='inf': must be a number of seconds"),
    ({"SOUP_DIST_TIMEOUT": "-5"}, "environment variable SOUP_DIST_TIMEOUT='-5': must be a number of seconds"),
    ({"SOUP_DIST_TIMEOUT": "soon"}, "environment variable SOUP_DIST_TIMEOUT='soon': must be a number of seconds"),
], ids=lambda v: " ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_a_bad_distributed_variable_is_one_line_before_anything(capsys, monkeypatch, tmp_path, zoo, fmnist_root,
                                                                variables, said):
    from tests.helpers import nothing_written, refused
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", "SOUP_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    for script in ("uniform", "mehl"):
        line = refused(capsys, script, argv(zoo, fmnist_root, out, "--epochs", 1, "--model_batch", "auto")
                       if script == "mehl" else argv(zoo, fmnist_root, out))
        assert line.startswith(f"error: {said}"), line
        nothing_written(out)


def test_the_distributed_variables_are_read_nowhere_else():
    """One place reads them (utils/runtime/distributed.py `environment`): no other module of the toolkit
    reads LOCAL_RANK, RANK, WORLD_SIZE, LOCAL_WORLD_SIZE or SOUP_DIST_TIMEOUT from os.environ."""
    import re
    reads = re.compile(r"environ(\.get\(|\[)\s*[\"'](LOCAL_RANK|RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|SOUP_DIST_TIMEOUT)")
    found = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in (".venv", "tests") or path.name == "distributed.py":
            continue
        found += [f"{path}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if reads.search(line)]
    assert found == [], found


def serve(mode):
    """A local TCP server on 127.0.0.1 that accepts and says nothing ("silent") or sends bytes that are
    not the store's protocol ("garbage"); returns (port, stop)."""
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stopping, held = threading.Event(), []

    def talk(conn):
        while mode == "garbage" and not stopping.is_set():
            try:
                conn.sendall(b"\xff\x00garbage" * 512)
            except OSError:
                return
            time.sleep(0.05)

    def accept():
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    def stop():
        stopping.set()
        server.close()
        for conn in held:
            conn.close()
    return server.getsockname()[1], stop


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["silent", "garbage"])
def test_rendezvous_with_another_program_at_master_port_is_bounded_by_the_timeout(tmp_path, zoo, fmnist_root, mode):
    """RANK=1 WORLD_SIZE=2 with MASTER_PORT served by a program that is not torch's store (issue 31.8:
    it waited > 120 s with SOUP_DIST_TIMEOUT=5): one line, exit 2, within the timeout plus the start."""
    port, stop = serve(mode)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": "1",
               "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SOUP_DIST_TIMEOUT": "5"}
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(ROOT / "uniform_soup.py"), "--model-location", str(zoo),
                               "--arch", TINY_CNN, "--data-location", str(fmnist_root), "--device", "cpu",
                               "--results-db", str(tmp_path / "r.jsonl"), "--save-soup", "none"],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=100)
        elapsed = time.monotonic() - started
    finally:
        stop()
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: could not join the process group (gloo, MASTER_ADDR=127.0.0.1, MASTER_PORT={port}): "), lines[-40:]
    assert elapsed < 90, elapsed  # not the 600 s default, nor forever (generous: a loaded machine)
    assert not (tmp_path / "r.jsonl").exists()
