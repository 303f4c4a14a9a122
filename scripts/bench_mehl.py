"""MEHL-Soup's memory and step time as K (--model_batch) grows, against one plain forward/backward.

Each K runs in a fresh subprocess (peak resident memory only grows within a process; on CUDA the peak
is `torch.cuda.max_memory_allocated`). A subprocess builds the model and the held-out data as
MEHL_soup_layer.py does, loads the first K ingredients as the rows of one group (`utils.run.mehl.
directions`) and times --steps real MEHL steps (`utils.run.mehl.step`: gradient, ViT clipping, projection,
AdamW step, soup update) on one fixed batch, alternating with a plain forward/backward of the same
model on the same batch: "x plain" is the ratio of their medians in the same process, so a busy
machine slows both alike. The "plain" run does forward/backward alone; its peak is the memory every run
shares (model, data, the ingredient checks), from which the peak above plain is counted.

    python scripts/bench_mehl.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 \\
        --ks 2,4,8,all --batch-size 128 --steps 5
    # the paper's architecture at its real size, nothing downloaded: 8 stand-in ingredients in the
    # published layout and a synthetic ImageNet tree of 224 px images, both removed afterwards
    python scripts/bench_mehl.py --arch clip-vit-b32 --datasets ImageNet --synthetic-zoo 8 \\
        --ks 1,8 --batch-size 8 --steps 3 --threads 2

Prints one line per K: peak memory, peak above the plain run (GiB and in ingredients, one ingredient
being the learned parameters in float32), the median seconds of a MEHL step and of a plain step, their
ratio, and the same ratio in CPU seconds of the process (steadier on a shared machine); writes the
numbers as JSON to --out.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.archs.standins import input_size, write_synthetic_imagenet, write_synthetic_zoo  # noqa: E402
from utils.files.ingredients import available  # noqa: E402
from utils.runtime.errors import UserError, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-location", default="zoo/fashion_mnist", help="folder of model_{i}.pt")
    p.add_argument("--arch", default="efficientnet-lite0", help="architecture of the ingredients")
    p.add_argument("--datasets", default="FashionMNIST", help="dataset name, as for the soup scripts")
    p.add_argument("--data-location", default=None, help="data root (default: the dataset's place)")
    p.add_argument("--synthetic-zoo", type=int, default=0,
                   help="benchmark N stand-in ingredients instead of --model-location: the arch's start "
                   "plus seeded perturbations of 1%% of each tensor's spread, in the arch's checkpoint "
                   "layout, written to a temporary folder removed at the end. With --datasets ImageNet "
                   "and no --data-location, synthetic images of the arch's input size go there too")
    p.add_argument("--num-classes", type=int, default=10,
                   help="classes of the synthetic ImageNet tree (the head's size)")
    p.add_argument("--ks", default="2,4,8,all", help="comma-separated K values; 'all' = every ingredient")
    p.add_argument("--batch-size", type=int, default=128, help="data batch of each step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per K (after one warm-up step)")
    p.add_argument("--layer-size", type=int, default=0, help="block size (0: MEHL-Soup+)")
    p.add_argument("--directions-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage of the directions, as MEHL_soup_layer.py's flag")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/bench_mehl.json", help="JSON file for the numbers")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # K of a subprocess
    return p.parse_args(argv)


def ks_of(spec, total):
    out = []
    for item in spec.split(","):
        try:
            k = total if item.strip() == "all" else int(item)
        except ValueError:
            raise UserError(f"--ks {item!r}: give whole numbers or 'all'") from None
        if not 1 <= k <= total:
            raise UserError(f"--ks {item}: the zoo holds {total} ingredients")
        if k not in out:
            out.append(k)
    return out


# ------------------------------------------------------------------------------ one subprocess
def worker(args):
    import torch
    import datasets
    import MEHL_soup_layer as recipe
    from utils.run import cli, mehl
    from utils.runtime import memory
    from utils.run.batchnorm import set_mode
    from utils.run.layout import make_layout
    from utils.soup.schedules import constant

    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.worker
    flags = ["--model-location", args.model_location, "--arch", args.arch, "--datasets", args.datasets,
             "--batch-size", str(args.batch_size), "--device", args.device, "--save-soup", "none",
             "--test-size", "10", "--params_end", str(max(k, 2)), "--heldout-per-class",
             str(max(1, -(-args.batch_size // args.num_classes)))]
    if args.data_location:
        flags += ["--data-location", args.data_location]
    margs = recipe.parse_args(flags)
    setup = cli.prepare(margs, check_ingredients=False, data=datasets.build_dataset)
    layout, base = make_layout(setup.paths, setup.model, setup.reference, args.layer_size)
    model, device = setup.model, setup.device
    batch = next(iter(torch.utils.data.DataLoader(setup.bundle.heldout, batch_size=args.batch_size)))
    n = len(batch[1])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(*fns):
        """Median wall-clock and CPU seconds (this process, all its threads) of each function over
        --steps rounds, the functions alternating within a round (after one warm-up round), so that a
        busy machine slows them alike; CPU seconds do not count time spent waiting for a core."""
        for fn in fns:
            fn()
        wall, cpu = [[] for _ in fns], [[] for _ in fns]
        for _ in range(args.steps):
            for j, fn in enumerate(fns):
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync()
                wall[j].append(time.perf_counter() - start)
                cpu[j].append(time.process_time() - start_cpu)
        return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]

    if k == 0:
        model.load_state_dict(base)
        del base
        learned = set(layout.names)
        for name, p in model.named_parameters():
            p.requires_grad_(name in learned)
        set_mode(model, layout.frozen_stats)

        def plain():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(batch[0].to(device)), batch[1].to(device)).backward()
        (seconds, cpu), = timed(plain)
        plain_here, plain_cpu = seconds, cpu
    else:
        soup = recipe.start_model(model, layout, base)
        del base
        set_mode(model, layout.frozen_stats)
        memory.reset_peak(device)
        center, P, inv_norms = mehl.directions(setup.paths, list(range(k)), k, layout, setup.reference, soup,
                                               mehl.DTYPES[args.directions_dtype], first=True)
        X = torch.zeros(k, layout.num_blocks, device=device, requires_grad=True)
        group = mehl.Group(center, P, inv_norms, X, torch.optim.AdamW([X], lr=0.01, weight_decay=0.0),
                           constant(0.01))
        (plain_here, plain_cpu), (seconds, cpu) = timed(lambda: mehl.gradient(model, soup, batch, n, 0.0),
                                                        lambda: mehl.step(model, soup, group, layout.bounds,
                                                                          batch, n, clip=setup.spec.is_vit))
    print(json.dumps({"k": k, "seconds_per_step": seconds, "plain_seconds_same_process": plain_here,
                      "cpu_seconds_per_step": cpu, "plain_cpu_seconds_same_process": plain_cpu,
                      "peak_bytes": memory.peak_bytes(device),
                      "learned_numbers": layout.numel, "blocks": layout.num_blocks,
                      "device": str(device), "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------- driver
def run_one(args, k):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(k),
           "--model-location", str(args.model_location), "--arch", args.arch, "--datasets", args.datasets,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--layer-size",
           str(args.layer_size), "--device", args.device, "--directions-dtype", args.directions_dtype,
           "--num-classes", str(args.num_classes)]
    if args.data_location:
        cmd += ["--data-location", str(args.data_location)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise UserError(f"the K={k} run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args, plain, rows):
    gib = 2 ** 30
    ingredient = plain["learned_numbers"] * 4
    print(f"{args.arch}, {plain['learned_numbers']} learned numbers in {plain['blocks']} blocks "
          f"(one ingredient = {ingredient / gib:.3f} GiB), batch {args.batch_size}, {plain['device']}, "
          f"{plain['threads']} thread(s), {args.steps} steps, directions in {args.directions_dtype}")
    print(f"plain forward/backward: {plain['seconds_per_step']:.4f} s/step, peak "
          f"{plain['peak_bytes'] / gib:.3f} GiB")
    print(f"{'K':>4} {'peak GiB':>9} {'above plain':>11} {'ingredients':>11} {'s/step':>8} {'plain s':>8} "
          f"{'x plain':>8} {'x plain (CPU s)':>15}")
    for r in rows:
        above = r["peak_bytes"] - plain["peak_bytes"]
        print(f"{r['k']:>4} {r['peak_bytes'] / gib:>9.3f} {above / gib:>11.3f} {above / ingredient:>11.2f} "
              f"{r['seconds_per_step']:>8.4f} {r['plain_seconds_same_process']:>8.4f} "
              f"{r['seconds_per_step'] / r['plain_seconds_same_process']:>8.2f} "
              f"{r['cpu_seconds_per_step'] / r['plain_cpu_seconds_same_process']:>15.2f}", flush=True)
        r["above_plain_ingredients"] = above / ingredient
        r["x_plain"] = r["seconds_per_step"] / r["plain_seconds_same_process"]
        r["x_plain_cpu"] = r["cpu_seconds_per_step"] / r["plain_cpu_seconds_same_process"]


def bench(args):
    total = len(available(args.model_location))
    if total < 2:
        raise UserError(f"--model-location {args.model_location}: needs at least 2 ingredients, found "
                        f"{total}")
    ks = ks_of(args.ks, total)
    plain = run_one(args, 0)
    rows = [run_one(args, k) for k in ks]
    report(args, plain, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "plain": plain,
                               "runs": rows}, indent=1))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    if args.synthetic_zoo < 0 or args.synthetic_zoo == 1:
        raise UserError(f"--synthetic-zoo must be 0 (off) or at least 2, got {args.synthetic_zoo}")
    if args.batch_size < 1 or args.steps < 1:
        raise UserError("--batch-size and --steps must be >= 1")
    if not args.synthetic_zoo:
        return bench(args)
    from utils.archs import get_arch
    spec = get_arch(args.arch)
    scratch = Path(tempfile.mkdtemp(prefix="bench_mehl_"))
    try:
        args.model_location = scratch / "zoo"
        write_synthetic_zoo(args.model_location, args.synthetic_zoo, args.arch, args.num_classes)
        if args.datasets.lower() == "imagenet" and args.data_location is None:
            args.data_location = scratch / "data"
            write_synthetic_imagenet(args.data_location, args.num_classes,
                                     max(1, -(-args.batch_size // args.num_classes)) + 1, input_size(spec))
        return bench(args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
