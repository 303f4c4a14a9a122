"""What the test files share: the four soup scripts (`SCRIPTS`, `FILES`), the one builder of their
command lines (`argv`), and running a command line as a user would (`refused`, `cli`, `last_line`,
`nothing_written`), and MEHL as a process whose plan is read (`planned_mehl`). Fixtures and the tiny data and zoos are in tests/conftest.py."""
import json
import os
import re
import subprocess
import sys

import pytest

import greedy_soup
import learned_soup
import MEHL_soup_layer
import uniform_soup
from tests.conftest import ROOT
from tests.models import TINY_CNN
from utils.runtime.errors import run_main

SCRIPTS = {"uniform": uniform_soup, "greedy": greedy_soup, "learned": learned_soup,
           "mehl": MEHL_soup_layer}
FILES = {name: os.path.basename(module.__file__) for name, module in SCRIPTS.items()}
# Flags that make each script quick on a tiny zoo (tests of refusals and outputs, not of learning).
QUICK = {"uniform": [], "greedy": [], "learned": ["--epochs", "1"],
         "mehl": ["--epochs", "1", "--model_batch", "2", "--no-epoch-test"]}


def argv(zoo, data, out, *extra, first=(), arch=TINY_CNN, datasets=None, heldout=3, test_size=20,
         batch_size=32, device="cpu", name="soup"):
    """A soup script's command line on a tiny zoo, every item a string: the zoo, data and arch, the
    split and batch sizes, the device, the results file `<out>/results.jsonl` and the soup
    `<out>/<name>.pt`, then `first` (a script's own flags) and `extra` (later flags win). An option
    set to None is left out (the script's default)."""
    items = ["--model-location", zoo, "--arch", arch, "--data-location", data]
    for flag, value in (("--datasets", datasets), ("--heldout-per-class", heldout),
                        ("--test-size", test_size), ("--batch-size", batch_size), ("--device", device)):
        if value is not None:
            items += [flag, value]
    items += ["--results-db", out / "results.jsonl"]
    if name is not None:
        items += ["--save-soup", out / f"{name}.pt"]
    return [str(a) for a in (*items, *first, *extra)]


def refused(capsys, script, args):
    """Run the script's command line in-process as a user would (run_main); return the one error line.
    Asserts exit status 2, exactly one `error:` line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(SCRIPTS[script].main, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def nothing_written(tmp_path):
    assert not (tmp_path / "results.jsonl").exists(), "a results line was written"
    assert not list(tmp_path.glob("soup*")), "a soup (or its recipe/state) was written"
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left"


def cli(script, args, cwd=ROOT):
    """The script as a separate process (exit status and stderr as the user sees them)."""
    return subprocess.run([sys.executable, str(ROOT / FILES[script]), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def last_line(done):
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def copy_for_a_user(shared, packages=("utils", "datasets"), scripts=("*.py",)):
    """The scripts (`scripts`: globs at the top level), the `packages` they import and the tests' models
    (tests/models.py), copied into `shared` where every user may read them: the checkout may sit in a
    private folder, as a clone inside `mktemp -d` does, which another user cannot enter."""
    import shutil
    code = shared / "code"
    for name in packages:
        shutil.copytree(ROOT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
    for pattern in scripts:
        for script in ROOT.glob(pattern):
            shutil.copy(script, code / script.name)
    (code / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "models.py", code / "tests" / "models.py")  # the tests' --arch
    for folder, _, files in os.walk(code):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return code


def planned_mehl(args, results_db, timeout):
    """MEHL_soup_layer.py with `args` as a fresh process, glibc's mmap threshold fixed (freed memory leaves
    the resident set: tests/test_memory_bounds.py says why); it must succeed. Returns (its stderr, K and
    the predicted peak in bytes from the plan it printed, its results line in `results_db`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "1048576"}
    done = subprocess.run([sys.executable, str(ROOT / "MEHL_soup_layer.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"plan: K = (\d+) \(.*\); predicted peak .* \((\d+) bytes\)", done.stderr)
    record = json.loads(results_db.read_text().splitlines()[-1])
    return done.stderr, int(found.group(1)), int(found.group(2)), record
