"""scripts/gpu_check.sh, which runs unattended in one call on a lent GPU, smoke-tested on the CPU with
tiny-clip: every stage runs, the outputs land in $OUT, nothing is left that would refuse a second run,
and a fresh Python holding only torch, torchvision and numpy (what `pip install torch torchvision numpy`
gives) runs it with pip's index turned off, from the bundle of scripts/gpu_wheels.sh alone; and
scripts/gpu_check.py's throughput check on the CPU."""
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

SMOKE = {"ARCH": "tiny-clip", "DEVICE": "cpu", "BATCH": "4", "KS": "2", "K": "2", "NZOO": "2",
         "OMP_NUM_THREADS": "1"}
STAGES = ["1a", "1b", "2", "3", "3a", "3b", "3c", "4", "5", "5b"]


def run_check(tmp_path, python, *args, env=None):
    env = {**(env or os.environ), **SMOKE, "OUT": str(tmp_path / "out"), "PYTHON": python,
           "SCRATCH": str(tmp_path), "MODEL_SOUPS_CACHE": str(tmp_path / "cache")}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path)


def assert_every_stage_ran(done, out, stages):
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "== failed" not in done.stdout and "Traceback" not in done.stdout + done.stderr
    summary = json.loads((out / "gpu_check.json").read_text())
    ran = [s["stage"].split(".")[0] for s in summary["stages"]]
    assert ran == ["prepare: python, bundle, imports"] + stages, ran
    assert summary["ok"] and all(s["status"] == "ok" for s in summary["stages"])
    # the budgets are printed and are the ones the table adds up
    budgets = dict(re.findall(r" (\w+) (\d+)", done.stdout.split("\n")[0].split(":", 1)[1]))
    assert [budgets[s] for s in ["prepare"] + stages] == [str(s["budget_s"]) for s in summary["stages"]]
    assert f"total {sum(s['budget_s'] for s in summary['stages'])} s" in done.stdout.split("\n")[0]
    # the side-by-side table, the profiler tables, the block-product check, the process group, the MEHL run
    assert "project / released: x plain" in done.stdout
    for name in ("project_k2", "released_k2"):
        assert (out / "profiles" / f"profile_{name}.txt").read_text().split()[1] == "ops"
    assert "MEHL check passed" in (out / "mehl_check.txt").read_text()
    for name in ("float32", "tf32"):
        steps = [r["step"] for r in json.loads((out / f"bench_mehl_{name}.json").read_text())["runs"]]
        assert steps == ["project", "released"], (name, steps)
    assert "process group: gloo on cpu, rank 0 of 1" in (out / "group.txt").read_text()
    assert "expected 1): ok" in (out / "group.txt").read_text()
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "MEHL-Soup+" and record["world_size"] == 1
    assert summary["numbers"]["forward_backward_ms_fp32"] > 0 and summary["numbers"]["forward_backward_ms_tf32"] > 0
    return summary


@pytest.mark.slow
def test_gpu_check_script_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "out"
    default_state = ROOT / "runs" / "MEHL-Soup+.state.pt"
    before = default_state.stat().st_mtime if default_state.exists() else None
    started = time.time()
    done = run_check(tmp_path, sys.executable)
    assert_every_stage_ran(done, out, STAGES)
    # the MEHL run kept its state in the scratch folder, removed at the end, not in runs/; nothing is left
    after = default_state.stat().st_mtime if default_state.exists() else None
    assert after == before or after < started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]


def test_an_unknown_argument_is_one_line():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--al"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr == "error: unknown argument '--al' (the only one is --all)\n"


def test_the_budgets_with_all_add_up_to_at_most_nine_minutes():
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    budgets = dict(re.findall(r"\[(\w+)\]=(\d+)", text[text.index("declare -A BUDGET"):]))
    assert sorted(budgets) == sorted(["prepare", *STAGES, "6", "7"])
    assert sum(map(int, budgets.values())) <= 540


def test_not_enough_disk_is_said_before_anything_is_written(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_stages.py"), "disk", str(tmp_path),
                           str(2**60), "the stand-ins"], capture_output=True, text=True)
    assert done.returncode == 1 and "NOT ENOUGH, not written" in done.stdout
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ a fresh Python, offline
def closure(names):
    """The installed distributions that `pip install <names>` would have brought: names and their
    requirements, recursively (those installed here)."""
    seen, todo = {}, list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def fresh_python(tmp_path):
    """A new venv whose only packages are torch, torchvision and numpy with their requirements, taken
    from this Python's site-packages through a .pth file naming a folder of symlinks (the same as pip
    installing the wheels from disk, without copying 5 GB)."""
    venv, linked = tmp_path / "venv", tmp_path / "linked"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    linked.mkdir()
    for dist in closure(["torch", "torchvision", "numpy"]).values():
        base = dist.locate_file("")
        tops = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] not in ("..", "bin")}
        for top in tops:
            target = linked / top
            if not target.exists() and (base / top).exists():
                target.symlink_to(base / top)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "linked.pth").write_text(str(linked) + "\n")
    return venv / "bin" / "python"


@pytest.mark.slow
def test_a_fresh_python_with_only_torch_runs_every_stage_offline_from_the_bundle(tmp_path):
    if not (ROOT / ".whl" / "MANIFEST").is_file():  # prepared as a user would, where PyPI is reachable
        subprocess.run(["bash", str(ROOT / "scripts" / "gpu_wheels.sh")], check=True, capture_output=True)
    python = str(fresh_python(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_NO_INDEX"] = "1"
    have = subprocess.run([python, "-c", "import torch, torchvision, numpy; import open_clip"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "No module named 'open_clip'" in have.stderr, have.stderr[-2000:]  # torch is there, open_clip not
    done = run_check(tmp_path, python, "--all", env=env)
    assert "installed offline from .whl/" in done.stdout and "regex" in done.stdout
    summary = assert_every_stage_ran(done, tmp_path / "out", STAGES + ["6", "7"])
    assert {p["exit_code"] for p in summary["numbers"]["paper_scale"].values()} == {0}
    vit = summary["numbers"]["vit_l14"]
    assert vit[0]["card_k_bfloat16"] > vit[0]["card_k_float32"] > 0
    # what the stages wrote (the stand-ins, the bundle's install folder) is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "linked", "out", "venv"]


def test_gpu_check_script_runs_on_cpu(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.main(["--arch", "tiny-clip", "--device", "cpu", "--batch-size", "4", "--image-size", "32",
                    "--num-classes", "5", "--warmup", "1", "--iters", "2"])
    out = capsys.readouterr().out
    assert "images/s" in out and "peak memory" in out and "batch 4, 32 px" in out
