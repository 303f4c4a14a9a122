"""A stand-in of the paper's whole ImageNet job, with nothing downloaded, timed phase by phase.

Writes N stand-in ingredients of the chosen arch in its published checkpoint layout (the start plus
seeded perturbations, a different one per ingredient, so no MEHL direction is zero) and an
ImageNet-shaped tree of real JPEG files at ImageNet's size (500 x 375, quality 90: train with the
held-out split, a val subset, the five shift folders with ObjectNet's mapping files), then runs the
launcher's pipeline unchanged: the commands of `scripts/paper_imagenet.sh all`, one step at a time
(individual evaluations, uniform soup, greedy soup, Learned-Soup+ with its memory estimate or refusal,
MEHL-Soup+, report). For each step it records the seconds, the peak resident memory and the peak GPU
memory of the step's processes and the exit status, in `<out>/paper_scale.json`, and prints a table.

    python scripts/paper_scale.py --preset cpu-small --out /tmp/paper_scale     # tiny-clip, about a minute
    python scripts/paper_scale.py --preset gpu --out /scratch/paper_scale      # 72 ViT-B/32 (gpu_paper_scale.sh)

How it measures (scripts/paper_scale_hook/sitecustomize.py, first on the steps' PYTHONPATH): each
Python process of a step writes, at exit, its own peak resident memory (VmHWM; getrusage's ru_maxrss is
not used: a child inherits its parent's in it across fork and exec), CUDA's peak allocation
(torch.cuda.max_memory_allocated, since the script's last reset, as in its results lines) and the
timing of every pass over a DataLoader, batch by batch. A step's peak is the largest over its processes
(loader workers are separate processes and not counted).

How it extrapolates to the paper's image counts (held-out 26 000, val 50 000, V2 10 000, Sketch 50 889,
R 30 000, ObjectNet 18 574, A 7 500): a step's time outside its data passes is fixed (starting Python,
reading and checking ingredients, layouts, hashes, writing outputs, listing folders). A data pass costs
a start (the wait for its first batch beyond a steady batch's wait: worker start-up) plus, per full
batch, the mean wait for a batch and the mean time of the loop's body with it (the forward pass, or the
MEHL step), both measured on the full batches of the process's passes of the same kind (learning or
evaluation). At the paper's size a pass over a set has the set's full count in full batches. So the
extrapolated step = fixed + sum over passes of (start + full batches x (wait + body)).
"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.files import paths  # noqa: E402
from utils.run.cli import MEMORY_LIMIT_MAX, check_number  # noqa: E402
from utils.runtime.errors import UserError, run_main  # noqa: E402
from utils.runtime.memory import gib  # noqa: E402
from utils.files.state_dicts import atomic_write  # noqa: E402

HOOK = ROOT / "scripts" / "paper_scale_hook"
LAUNCHER = ROOT / "scripts" / "paper_imagenet.sh"
MARKER = ".paper_scale"
OURS = ("zoo", "data", "run", "logs", "paper_scale.json", MARKER)  # what --overwrite may remove
PAPER_COUNTS = {"heldout": 26000, "test": 50000, "ImageNetV2": 10000, "ImageNet-Sketch": 50889,
                "ImageNet-R": 30000, "ObjectNet": 18574, "ImageNet-A": 7500}
SHIFTS = ("ImageNetV2", "ImageNet-Sketch", "ImageNet-R", "ObjectNet", "ImageNet-A")
PAPER_SECONDS = {"mehl": 808, "greedy": 3501, "learned": 7701}   # as published, one GPU
STEPS = (("individual evaluations", "individual"), ("uniform soup", "uniform"), ("greedy soup", "greedy"),
         ("Learned-Soup+ (estimate or refusal)", "learned"), ("MEHL-Soup+", "mehl"), ("report", "report"))
PRESETS = {
    # tiny-clip on a CPU: 6 ingredients, 4 classes, a few images per set (decoded in the main process)
    "cpu-small": dict(arch="tiny-clip", n=6, classes=4, heldout_per_class=6, fraction=0.0004, workers=0,
                      memory_limit=None, k="18"),
    # the paper's zoo: 72 ViT-B/32 on 10 classes (26 held-out each: 1 % of the paper's held-out split) and
    # 1 % of val and of each shift; the launcher's 8 workers; Learned-Soup+ and MEHL's plan against the
    # launcher's 24 GB card
    "gpu": dict(arch="clip-vit-b32", n=72, classes=10, heldout_per_class=26, fraction=0.01, workers=8,
                memory_limit=24, k="18"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                   help="sizes to start from (the flags below override them)")
    p.add_argument("--out", required=True, help="an empty (or new) folder for everything this writes")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse an --out written by an earlier run of this script (only its own sub-folders "
                   "and files are removed; a folder it did not write is refused)")
    p.add_argument("--arch", default=None, help="architecture of the stand-ins (default: the preset's)")
    p.add_argument("--n", type=int, default=None, help="number of stand-in ingredients")
    p.add_argument("--classes", type=int, default=None, help="classes of the ImageNet-shaped tree")
    p.add_argument("--heldout-per-class", type=int, default=None,
                   help="train images per class, at most 26 (the launcher's held-out split draws 26 per "
                   "class; with 26, four more per class stay out of it)")
    p.add_argument("--fraction", type=float, default=None,
                   help="images of val and of each shift, as a fraction of the paper's counts")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (the launcher's WORKERS)")
    p.add_argument("--k", default=None, help="MEHL's --model_batch (the launcher's K; 'auto' to plan it)")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GiB that Learned-Soup+ and MEHL's plan may count on (the launcher's MEMORY_LIMIT)")
    p.add_argument("--steps", default=",".join(s for _, s in STEPS),
                   help="comma-separated steps of the launcher to run, in this order")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the start: a step still running then is stopped (exit 124) and the "
                   "later ones are skipped; the table covers what ran")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the steps")
    p.add_argument("--zoo-device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the stand-ins' perturbations are drawn")
    p.add_argument("--write-zoo", nargs=4, metavar=("FOLDER", "N", "ARCH", "CLASSES"), default=None,
                   help=argparse.SUPPRESS)  # the child process that writes the stand-ins
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args):
    """Every flag checked before anything is written (a UserError names the flag)."""
    from utils.archs import get_arch
    get_arch(args.arch)  # an unknown one is refused with the list of known ones
    if args.k is not None and args.k != "auto" and not (args.k.isdigit() and int(args.k) >= 1):
        raise UserError(f"--k must be a whole number >= 1 or 'auto', got {args.k!r}")
    if args.memory_limit is not None:
        check_number("--memory-limit", args.memory_limit, high=MEMORY_LIMIT_MAX, above=0)
    if args.deadline is not None:
        check_number("--deadline", args.deadline, above=0)
    if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
        raise UserError(f"--python {args.python}: not an executable file")
    if args.n < 1 or args.classes < 1:
        raise UserError(f"--n and --classes must be >= 1, got {args.n} and {args.classes}")
    if not 1 <= args.heldout_per_class <= 26:
        raise UserError(f"--heldout-per-class must be in [1, 26], got {args.heldout_per_class}")
    if not 0 < args.fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    steps = args.steps.split(",")
    unknown = [s for s in steps if s not in dict((s, n) for n, s in STEPS)]
    if unknown or not steps:
        raise UserError(f"--steps: unknown {', '.join(unknown) or '(none)'}; known: "
                        + ", ".join(s for _, s in STEPS))


# ----------------------------------------------------------------------------------- the output
def prepare_out(out, overwrite):
    """A fresh --out: new or empty; with --overwrite, one that this script wrote (its marker file),
    of which only this script's own entries are removed. Nothing else is ever deleted."""
    import shutil
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    for name in ("paper_scale.json", MARKER):  # its files can be written there (names, folder, type)
        paths.check_writable([paths.Role("--out", f"{name} of --out {out}", out / name)])
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty: choose a new folder (or --overwrite one that this "
                            "script wrote)")
        if not (out / MARKER).is_file():
            raise UserError(f"--out {out} holds files this script did not write (no {MARKER}): choose a "
                            "new folder")
        for name in OURS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by scripts/paper_scale.py; --overwrite removes only its entries\n")
    return out


def counts_of(args):
    """Images per set in the stand-in: the held-out split is the launcher's 26 per class (or all of a
    smaller train folder), val and each shift `fraction` of the paper's count (at least one)."""
    counts = {"heldout": args.classes * args.heldout_per_class}
    for name in ("test", *SHIFTS):
        counts[name] = max(1, round(PAPER_COUNTS[name] * args.fraction))
    return counts


def write_inputs(args, out):
    """The stand-in ingredients (in a child process: the GPU it may draw on is released at its exit)
    and the JPEG tree. Returns [(what, seconds)]."""
    from scripts.standins import write_imagenet_tree
    timings = []
    started = time.perf_counter()
    done = subprocess.run([args.python, str(Path(__file__).resolve()), "--out", str(out), "--zoo-device",
                           args.zoo_device, "--write-zoo", str(out / "zoo"), str(args.n), args.arch,
                           str(args.classes)], env=child_env(), cwd=ROOT)
    if done.returncode != 0:
        raise UserError(f"writing the {args.n} stand-in ingredients failed (exit {done.returncode})")
    timings.append((f"write {args.n} stand-in {args.arch} ingredients", time.perf_counter() - started))
    started = time.perf_counter()
    counts = counts_of(args)
    train = args.heldout_per_class + (4 if args.heldout_per_class == 26 else 0)
    written, size = write_imagenet_tree(out / "data", args.classes, train, counts["test"],
                                        {name: counts[name] for name in SHIFTS})
    timings.append((f"write {sum(written.values())} JPEG files ({size / 2**20:.0f} MiB)",
                    time.perf_counter() - started))
    return timings


def write_zoo(folder, n, arch, classes, device):
    import torch
    from scripts.standins import write_synthetic_zoo
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    write_synthetic_zoo(folder, int(n), arch, int(classes), device=device)


def child_env(**extra):
    """The environment of the steps: this repository and the measuring hook first on PYTHONPATH (the
    caller's PYTHONPATH, e.g. /tmp/site with open_clip on a GPU machine, is kept after them)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK), str(ROOT), env.get("PYTHONPATH")) if p)
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


# ---------------------------------------------------------------------------------- the steps
def run_step(step, env, log_path, timeout):
    """Run `paper_imagenet.sh <step>` (in its own process group, stopped at `timeout`). Returns
    (exit status, seconds); 124 when it was stopped."""
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(["bash", str(LAUNCHER), step], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = 124
    return code, time.perf_counter() - started


def read_stats(path):
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a process killed while writing
    return out


def notes_of(log_path):
    """The lines of a step's log a reader wants in the table: `error:` lines, the launcher's note that
    Learned-Soup+ did not run, and MEHL's memory plan."""
    keep = []
    for line in log_path.read_text(errors="replace").splitlines():
        line = re.sub(r"^\d\d:\d\d:\d\d \w+ ", "", line.split("\r")[-1].strip())  # logging's time, level
        if line.startswith(("error:", "plan:")) or "did not run" in line:
            keep.append(line)
    return keep


# ------------------------------------------------------------------------------- extrapolation
def pass_kind(p):
    return "learning" if any(b[3] for b in p["batches"]) else "evaluation"


def batch_of(p):
    """The pass's batch size (a loader built from a batch sampler has none: its largest batch)."""
    return p["batch_size"] or max(b[2] for b in p["batches"])


def steady_costs(passes):
    """(wait, body) of a full batch, per kind: means over the full batches of these passes (a pass's
    first wait excluded: it holds the workers' start-up). Without full batches, per image times the
    batch size."""
    costs = {}
    for kind in ("learning", "evaluation"):
        mine = [p for p in passes if pass_kind(p) == kind and p["batches"]]
        full = [(i, b) for p in mine for i, b in enumerate(p["batches"]) if b[2] == batch_of(p)]
        waits = [b[0] for i, b in full if i > 0]
        if full:
            body = sum(b[1] for _, b in full) / len(full)
            wait = sum(waits) / len(waits) if waits else 0.0
        elif mine:
            size = max(batch_of(p) for p in mine)
            items = sum(b[2] for p in mine for b in p["batches"])
            later = [b for p in mine for b in p["batches"][1:]]
            body = size * sum(b[1] for p in mine for b in p["batches"]) / max(1, items)
            wait = size * sum(b[0] for b in later) / max(1, sum(b[2] for b in later)) if later else 0.0
        else:
            continue
        costs[kind] = (wait, body)
    return costs


def set_of(dataset_len, counts):
    """(name, the paper's count over the stand-in's) of the set of this size; ("other", the overall
    ratio) when no set has this size."""
    for name, n in counts.items():
        if n == dataset_len:
            return name, PAPER_COUNTS[name] / n
    return "other", sum(PAPER_COUNTS.values()) / sum(counts.values())


def extrapolate(processes, seconds, counts):
    """(data seconds measured, fixed seconds, seconds at the paper's counts, {set: extrapolated
    seconds of its passes}) of one step."""
    data, by_set = 0.0, {}
    for proc in processes:
        passes = [p for p in proc.get("passes", []) if p["batches"]]
        costs = steady_costs(passes)
        for p in passes:
            wait, body = costs[pass_kind(p)]
            data += sum(b[0] + b[1] for b in p["batches"])
            start = max(0.0, p["batches"][0][0] - wait)
            name, ratio = set_of(p["dataset_len"], counts)
            items = round(sum(b[2] for b in p["batches"]) * ratio)
            by_set[name] = by_set.get(name, 0.0) + start + math.ceil(items / batch_of(p)) * (wait + body)
    fixed = max(0.0, seconds - data)
    return data, fixed, fixed + sum(by_set.values()), {k: round(v, 1) for k, v in by_set.items()}


# ------------------------------------------------------------------------------------- output
def table(entries, setup):
    lines = [f"{'step':38} {'exit':>4} {'seconds':>8} {'data':>8} {'fixed':>8} {'peak RSS':>9} {'peak GPU':>9}"
             f" {'at paper counts':>15}"]
    for e in entries:
        if e["exit_code"] is None:
            lines.append(f"{e['name']:38} {'-':>4} {'skipped: out of time'}")
            continue
        lines.append(f"{e['name']:38} {e['exit_code']:>4} {e['seconds']:8.1f} {e['data_seconds']:8.1f} "
                     f"{e['fixed_seconds']:8.1f} {gib(e['peak_rss_bytes']):>9} {gib(e['peak_gpu_bytes']):>9} "
                     f"{e['extrapolated_seconds']:15.0f}")
        for note in e["notes"][:4]:
            lines.append(f"    {note[:200]}")
    lines.append("(seconds: wall time of the step; data: its passes over data loaders; fixed: the rest; peak "
                 "RSS: largest VmHWM of its processes, GiB; peak GPU: torch.cuda.max_memory_allocated, GiB; "
                 "at paper counts: fixed + each pass at the paper's image counts in full batches)")
    lines += [f"setup: {what}: {s:.1f} s" for what, s in setup]
    return "\n".join(lines + paper_comparison(entries))


def paper_comparison(entries):
    """The paper's published times beside the extrapolated ones (same job, other hardware and code).
    Greedy soup's includes the ingredients' held-out evaluations, a step of their own here."""
    done = {e["step"]: e for e in entries if e.get("extrapolated_seconds") is not None}
    lines = []
    for step, label in (("mehl", "MEHL-Soup+"), ("greedy", "greedy soup"), ("learned", "Learned-Soup+")):
        if step not in done:
            continue
        ours = done[step]["extrapolated_seconds"]
        extra = ""
        if step == "greedy" and "individual" in done:
            held = done["individual"]["extrapolated_passes_by_set"].get("heldout", 0.0)
            extra = f"; with the ingredients' held-out evaluations of the individual step {ours + held:.0f} s"
        lines.append(f"{label}: {ours:.0f} s at the paper's image counts{extra} (paper: {PAPER_SECONDS[step]} s, "
                     f"{PAPER_SECONDS[step] / 2:.0f} s is the issue's target of half)")
    return lines


def write_json(path, doc):
    """Through a temporary file no one can predict, renamed into place (utils/files/state_dicts.py)."""
    text = json.dumps(doc, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)


def main(argv=None):
    args = parse_args(argv)
    if args.write_zoo:
        return write_zoo(*args.write_zoo, args.zoo_device)
    check_args(args)
    started = time.perf_counter()
    out = prepare_out(args.out, args.overwrite)
    setup = write_inputs(args, out)
    for what, s in setup:
        print(f"{what}: {s:.1f} s", flush=True)
    counts = counts_of(args)
    (out / "logs").mkdir()
    entries = []
    for step in args.steps.split(","):
        name = dict((s, n) for n, s in STEPS)[step]
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - started)
        if left is not None and left < 5:
            entries.append({"name": name, "step": step, "exit_code": None, "seconds": None,
                            "peak_rss_bytes": None, "peak_gpu_bytes": None, "notes": ["skipped: out of time"]})
            continue
        stats = out / "logs" / f"{step}.stats.jsonl"
        env = child_env(DATA=out / "data", MODELS=out / "zoo", OUT=out / "run", WORKERS=args.workers,
                        PYTHON=args.python, ARCH=args.arch, N=args.n, K=args.k, MEMORY_LIMIT=args.memory_limit,
                        REPORT=0, PAPER_SCALE_STATS=stats, PYTHONUNBUFFERED=1)
        print(f"== {name}: bash scripts/paper_imagenet.sh {step}", flush=True)
        code, seconds = run_step(step, env, out / "logs" / f"{step}.log", left)
        processes = read_stats(stats)
        data, fixed, extrapolated, by_set = extrapolate(processes, seconds, counts)
        rss = [p["vm_hwm_bytes"] for p in processes if p.get("vm_hwm_bytes")]
        gpu = [p["cuda_peak_bytes"] for p in processes if p.get("cuda_peak_bytes") is not None]
        entries.append({"name": name, "step": step, "exit_code": code, "seconds": round(seconds, 2),
                        "peak_rss_bytes": max(rss) if rss else None, "peak_gpu_bytes": max(gpu) if gpu else None,
                        "data_seconds": round(data, 2), "fixed_seconds": round(fixed, 2),
                        "extrapolated_seconds": round(extrapolated, 1), "extrapolated_passes_by_set": by_set,
                        "processes": len(processes), "passes": sum(len(p.get("passes", [])) for p in processes),
                        "notes": notes_of(out / "logs" / f"{step}.log")})
        print(f"   exit {code}, {seconds:.1f} s", flush=True)
    doc = {"preset": args.preset, "arch": args.arch, "ingredients": args.n, "classes": args.classes,
           "workers": args.workers, "model_batch": args.k, "memory_limit_gib": args.memory_limit,
           "images": counts, "paper_images": PAPER_COUNTS,
           "setup": [{"name": what, "seconds": round(s, 2)} for what, s in setup], "phases": entries,
           "measured": "peak_rss_bytes: the largest VmHWM of the step's Python processes (loader workers not "
                       "counted); peak_gpu_bytes: torch.cuda.max_memory_allocated at their exit",
           "extrapolation": __doc__.split("How it extrapolates")[1].strip()}
    write_json(out / "paper_scale.json", doc)
    print(table(entries, setup))
    print(f"written: {out / 'paper_scale.json'}")
    return doc


if __name__ == "__main__":
    run_main(main)
