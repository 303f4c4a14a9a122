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

from utils.archs.standins import write_synthetic_zoo  # noqa: E402
from utils.files import results  # noqa: E402
from utils.files.ingredients import available  # noqa: E402
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
    p.add_argument("--device", default="auto", help="passed to the soup scripts")
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


def counts(spec, total):
    out = []
    for c in spec.split(","):
        n = total if c.strip() == "all" else int(c)
        if n < 1 or n > total:
            raise UserError(f"--counts {c}: the zoo holds {total} ingredients")
        if n not in out:
            out.append(n)
    return out


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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
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
    if args.synthetic_zoo:
        write_synthetic_zoo(args.model_location, args.synthetic_zoo, args.arch, args.num_classes)
    total = len(available(args.model_location))
    if total == 0:
        raise UserError(f"--model-location {args.model_location}: no model_{{i}}.pt found")
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
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
