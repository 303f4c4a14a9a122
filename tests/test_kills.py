"""Kills (docs/GUARANTEES.md): a soup run killed at any point, then run again with the same command
(MEHL: with --resume), ends with the same soup and results as an uninterrupted run; the results file
holds whole lines only, one per individual ingredient and one per soup, none lost, none twice; no
temporary file is left and no --overwrite or manual cleanup is needed.

Two levels: (1) in-process, the run dies right after each of its durable writes in turn (every
os.replace of an atomic write and every results line), so every gap between two writes is tried;
(2) the script as a process, SIGKILLed at seeded random moments, rerun, compared."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
import torch

from tests import helpers
from tests.conftest import ROOT, make_zoo
from tests.helpers import FILES, SCRIPTS
from utils.files import results

EXTRA = {"uniform": [], "greedy": [], "learned": ["--epochs", "6", "--layerwise"],
         "mehl": ["--epochs", "2", "--model_batch", "1", "--no-epoch-test"]}
RERUN = {"mehl": ["--resume"]}
# Fields of a results line that differ between two runs of the same work.
VOLATILE = {"time", "seconds", "peak_memory_bytes", "args", "soup_file", "learning_seconds_all_sessions",
            "memory_available_bytes", "state_file"}
argv = partial(helpers.argv, heldout=4, batch_size=16)


class Killed(BaseException):
    """Stands for SIGKILL in-process: not an Exception, so no handler in the code turns it into an error."""


def outcome(out):
    """(soup tensors, results lines without their volatile fields, sorted) of a finished run."""
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]  # whole lines only: each parses
    kept = sorted(json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True)
                  for r in lines)
    soup = torch.load(out / "soup.pt", weights_only=True)
    return soup, kept


def assert_same(out, reference):
    soup, lines = outcome(out)
    ref_soup, ref_lines = reference
    assert lines == ref_lines  # same lines, none lost, none twice
    assert soup.keys() == ref_soup.keys()
    for k in soup:
        assert torch.equal(soup[k], ref_soup[k]), k
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")], os.listdir(out)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("killzoo"), 4)


@pytest.fixture(scope="module")
def references(tmp_path_factory, zoo, fmnist_root):
    """Uninterrupted runs of every script, and the number of durable writes each makes."""
    refs = {}
    for script, module in SCRIPTS.items():
        out = tmp_path_factory.mktemp(f"ref-{script}")
        with counting() as events:
            module.main(argv(zoo, fmnist_root, out, first=EXTRA[script]))
        refs[script] = (outcome(out), len(events))
    return refs


class counting:
    """Count the durable writes (os.replace, results.append); raise Killed right after the `kill_at`-th."""

    def __init__(self, kill_at=None):
        self.kill_at, self.events = kill_at, []

    def _after(self, what):
        self.events.append(what)
        if self.kill_at is not None and len(self.events) == self.kill_at:
            raise Killed(what)

    def __enter__(self):
        self.real_replace, self.real_append = os.replace, results.append

        def replace(src, dst, *a, **k):
            self.real_replace(src, dst, *a, **k)
            self._after(f"replace {os.path.basename(str(dst))}")

        def append(path, record):
            out = self.real_append(path, record)
            self._after(f"line {record.get('method')}")
            return out

        os.replace, results.append = replace, append
        return self.events

    def __exit__(self, *exc):
        os.replace, results.append = self.real_replace, self.real_append
        return False


@pytest.mark.parametrize("script", SCRIPTS)
def test_dying_after_each_write_then_rerunning(tmp_path, zoo, fmnist_root, references, script):
    reference, n_events = references[script]
    assert n_events >= 3
    for k in range(1, n_events + 1):  # k = n_events: killed after the last write (the run was done)
        out = tmp_path / f"kill{k}"
        out.mkdir()
        with pytest.raises(Killed), counting(kill_at=k):
            SCRIPTS[script].main(argv(zoo, fmnist_root, out, first=EXTRA[script]))
        SCRIPTS[script].main(argv(zoo, fmnist_root, out, *RERUN.get(script, []), first=EXTRA[script]))
        assert_same(out, reference)
        # and a third run of the same command changes nothing (the results line marks it finished)
        SCRIPTS[script].main(argv(zoo, fmnist_root, out, *RERUN.get(script, []), first=EXTRA[script]))
        assert_same(out, reference)


def sigkill_run(args, log_file, delay):
    """Start the script as a process; SIGKILL it `delay` seconds after it first writes to stderr (its
    imports done). Returns whether it was still running when killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=log, cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and os.path.getsize(log_file) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
            alive = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_at_random_points_then_rerunning(tmp_path, zoo, fmnist_root, references, script):
    reference, _ = references[script]
    rng = random.Random(f"kills-{script}")
    killed = 0
    for k in range(3):
        out = tmp_path / f"kill{k}"
        out.mkdir()
        alive = sigkill_run([str(ROOT / FILES[script]), *argv(zoo, fmnist_root, out, first=EXTRA[script])],
                            tmp_path / f"log{k}", rng.uniform(0.0, 0.8))
        killed += alive
        if (out / "results.jsonl").exists():
            for line in (out / "results.jsonl").read_text().splitlines():
                json.loads(line)  # what the killed process left is whole lines only
        SCRIPTS[script].main(argv(zoo, fmnist_root, out, *RERUN.get(script, []), first=EXTRA[script]))
        assert_same(out, reference)
    assert killed >= 1, "no kill landed while the script was working: the delays are too long"
