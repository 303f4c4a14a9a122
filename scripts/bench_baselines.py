"""Seconds and peak memory of the baseline soups as the number of ingredients N grows.

Each (method, N) runs in a fresh subprocess (peak memory is the process's own), on the first N
ingredients of the zoo, with its own results file (so greedy soup includes evaluating its ingredients).
Uniform and greedy soups should stay flat in memory as N grows; learned soups grow by about N times the
model's parameter bytes.

    python scripts/bench_baselines.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 \
        --counts 4,8,all --test-size 1000

Writes runs/bench_baselines/bench.json and prints a table (method, N, seconds, peak GiB, held-out, test).
Extra flags after `--` go to every soup script (e.g. `-- --heldout-per-class 20`).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.standins import write_synthetic_zoo  # noqa: E402
from utils.files import paths, results  # noqa: E402
from utils.files.ingredients import available  # noqa: E402
from utils.run.cli import check_number  # noqa: E402
from utils.runtime.distributed import parse_device  # noqa: E402
from utils.runtime.errors import UserError, run_main  # noqa: E402

METHODS = {
    "uniform": ("uniform_soup.py", []),
    "greedy": ("greedy_soup.py", []),
    "learned": ("learned_soup.py", []),
    "learned+": ("learned_soup.py", ["--layerwise"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-location", default="zoo/fashion_mnist", help="folder of model_{i}.pt")
    p.add_argument("--arch", default="efficientnet-lite0", help="architecture of the ingredients")
    p.add_argument("--data-location", default=None, help="data root (default: the dataset's place)")
    p.add_argument("--counts", default="4,8,all", help="comma-separated N values; 'all' = every ingredient")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--test-size", type=int, default=1000, help="test / shift images evaluated per run")
    p.add_argument("--device", default="auto", type=parse_device, help="passed to the soup scripts")
    p.add_argument("--out", default="runs/bench_baselines", help="folder for the results files and bench.json")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    p.add_argument("--synthetic-zoo", type=int, default=0,
                   help="first write this many stand-in ingredients to --model-location (the arch's "
                   "start plus seeded perturbations of the parameters that fine-tuning moves, BatchNorm "
                   "statistics kept), for timing before a real zoo exists; refuses a folder that already "
                   "holds ingredients")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic zoo's head")
    p.add_argument("rest", nargs="*", help="extra flags for every soup script (after --)")
    return p.parse_args(argv)


def counts(spec, total=None):
    """The N values of --counts ('all': `total`); without `total`, only their form is checked."""
    out = []
    for c in spec.split(","):
        c = c.strip()
        if c != "all" and not (c.isdigit() and int(c) >= 1):
            raise UserError(f"--counts {spec!r}: give comma-separated whole numbers >= 1 or 'all', got {c!r}")
        n = total if c == "all" else int(c)
        if total is not None and n > total:
            raise UserError(f"--counts {c}: the zoo holds {total} ingredients")
        if n not in out:
            out.append(n)
    return out


def check_args(args):
    """Every flag checked before anything is written (a UserError names it)."""
    counts(args.counts)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    check_number("--test-size", args.test_size, 1)
    check_number("--timeout", args.timeout, above=0)
    check_number("--synthetic-zoo", args.synthetic_zoo, 0)
    check_number("--num-classes", args.num_classes, 1)
    return methods


def check_out(args, methods, ns):
    """--out's files (a results file per run, bench.json) land on no input, can be written, and are this
    script's own where they exist: a results file that is not one, or a bench.json it did not write, is
    refused (the results files are removed before each run)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    files = [out / f"{m}_{n}.jsonl" for m in methods for n in ns]
    outputs = [paths.Role("--out", f"a results file of --out {out}", f, "append") for f in files]
    outputs.append(paths.Role("--out", f"the numbers of --out ({out / 'bench.json'})", out / "bench.json"))
    paths.check_outputs(outputs, args.model_location, args.data_location)
    for f in files:
        results.check_appendable(f, "--out")
    paths.check_own_json(out / "bench.json", "--out", ("args", "rows"))


def run_one(args, method, n, out):
    script, flags = METHODS[method]
    db = out / f"{method}_{n}.jsonl"
    if db.exists():
        db.unlink()  # our own scratch file from an earlier benchmark: this run must start cold
    cmd = [sys.executable, str(ROOT / script), "--model-location", args.model_location, "--arch", args.arch,
           "--params_start", "0", "--params_end", str(n), "--test-size", str(args.test_size),
           "--device", args.device, "--results-db", str(db), "--save-soup", "none", *flags, *args.rest]
    if args.data_location:
        cmd += ["--data-location", args.data_location]
    started = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "error": [f"stopped after --timeout {args.timeout:g} s"],
                "wall_s": round(time.time() - started, 1)}
    wall = time.time() - started
    if proc.returncode != 0:
        return {"method": method, "n": n, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall}
    line = [r for r in results.read(db) if r["method"] != "individual"][-1]
    return {"method": method, "n": n, "seconds": line["seconds"], "wall_s": round(wall, 1),
            "peak_gib": round(line["peak_memory_bytes"] / 2**30, 3), "heldout": line["heldout"],
            "test": line["test"], "shift_mean": line.get("shift_mean"), "kept": line["ingredients"],
            "device": line["device"]}


def main(argv=None):
    args = parse_args(argv)
    methods = check_args(args)
    total = args.synthetic_zoo or len(available(args.model_location))
    if total == 0:
        raise UserError(f"--model-location {args.model_location}: no model_{{i}}.pt found")
    check_out(args, methods, counts(args.counts, total))
    if args.synthetic_zoo:
        write_synthetic_zoo(args.model_location, args.synthetic_zoo, args.arch, args.num_classes)
        total = len(available(args.model_location))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'method':<10}{'N':>4}{'seconds':>10}{'peak GiB':>10}{'held-out':>10}{'test':>8}", flush=True)
    for method in methods:
        for n in counts(args.counts, total):
            row = run_one(args, method, n, out)
            rows.append(row)
            if "error" in row:
                print(f"{method:<10}{n:>4}  failed: {row['error']}", flush=True)
            else:
                print(f"{method:<10}{n:>4}{row['seconds']:>10.1f}{row['peak_gib']:>10.3f}"
                      f"{row['heldout']:>10.2f}{row['test']:>8.2f}", flush=True)
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    run_main(main)
