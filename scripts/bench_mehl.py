"""MEHL-Soup's memory and step time as K (--model_batch) grows, against one plain forward/backward.

Each K runs in a fresh subprocess (peak resident memory only grows within a process; on CUDA the peak
allocated memory is reset per run anyway). A subprocess builds the model and the held-out data as
MEHL_soup_layer.py does, loads the first K ingredients as the rows of one group, computes their
directions and times --steps MEHL steps on one fixed batch (soup into the model, forward/backward,
gradient projection, AdamW step, soup update). The "plain" run times a forward/backward of the same
model on the same batch, and its peak is the memory every run shares (model, data, the streamed
ingredient checks).

    python scripts/bench_mehl.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 \\
        --ks 2,4,8,all --batch-size 128 --steps 5

Prints one line per K: peak memory (GiB and above the plain run), seconds per MEHL step, seconds per
plain step, and their ratio (the projection's overhead); writes the numbers as JSON to --out.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.errors import UserError, run_main  # noqa: E402
from utils.ingredients import available  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-location", default="zoo/fashion_mnist", help="folder of model_{i}.pt")
    p.add_argument("--arch", default="efficientnet-lite0", help="architecture of the ingredients")
    p.add_argument("--data-location", default=None, help="data root (default: the dataset's place)")
    p.add_argument("--ks", default="2,4,8,all", help="comma-separated K values; 'all' = every ingredient")
    p.add_argument("--batch-size", type=int, default=128, help="data batch of each step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per K (after one warm-up step)")
    p.add_argument("--layer-size", type=int, default=0, help="block size (0: MEHL-Soup+)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="runs/bench_mehl.json", help="JSON file for the numbers")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # K of a subprocess
    return p.parse_args(argv)


def ks_of(spec, total):
    out = []
    for item in spec.split(","):
        k = total if item.strip() == "all" else int(item)
        if not 1 <= k <= total:
            raise UserError(f"--ks {item}: the zoo holds {total} ingredients")
        if k not in out:
            out.append(k)
    return out


# ------------------------------------------------------------------------------ one subprocess
def worker(args):
    import torch
    import MEHL_soup_layer as mehl
    from utils import cli, hyperplane, memory
    from utils.batchnorm import set_mode

    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.worker
    flags = ["--model-location", args.model_location, "--arch", args.arch, "--batch-size",
             str(args.batch_size), "--device", args.device, "--save-soup", "none", "--test-size", "10",
             "--params_end", str(max(k, 2))]
    if args.data_location:
        flags += ["--data-location", args.data_location]
    margs = mehl.parse_args(flags)
    setup = cli.prepare(margs, check_ingredients=False)
    layout = mehl.make_layout(setup.paths, setup, args.layer_size)
    model, device = setup.model, setup.device
    model.load_state_dict(layout.base)
    set_mode(model, layout.frozen_stats)
    batch = next(iter(torch.utils.data.DataLoader(setup.bundle.heldout, batch_size=args.batch_size)))
    n = len(batch[1])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step):
        step()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return (time.perf_counter() - start) / args.steps

    if k == 0:
        def plain():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(batch[0].to(device)), batch[1].to(device)).backward()
        seconds = timed(plain)
    else:
        memory.reset_peak(device)
        B = layout.num_blocks
        rows = mehl.load_rows(setup.paths, list(range(k)), layout, setup)
        center = rows.mean(0)
        P, _ = hyperplane.directions_(rows, center, layout.ids, B)
        X = torch.zeros(k, B, device=device, requires_grad=True)
        opt = torch.optim.AdamW([X], lr=0.01, weight_decay=0.0)
        box = {"soup": center.clone()}

        def mehl_step():
            mehl.set_params(model, layout.names, box["soup"])
            g, _ = mehl.flat_gradient(model, layout.names, batch, n, 0.0, device)
            X.grad = hyperplane.project(P, g, layout.ids, B)
            opt.step()
            box["soup"] = center + hyperplane.combine(X.detach(), P, layout.ids)
        seconds = timed(mehl_step)
    print(json.dumps({"k": k, "seconds_per_step": seconds, "peak_bytes": memory.peak_bytes(device),
                      "learned_numbers": layout.ids.numel(), "blocks": layout.num_blocks,
                      "device": str(device), "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------- driver
def run_one(args, k):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(k),
           "--model-location", args.model_location, "--arch", args.arch, "--batch-size",
           str(args.batch_size), "--steps", str(args.steps), "--layer-size", str(args.layer_size),
           "--device", args.device]
    if args.data_location:
        cmd += ["--data-location", args.data_location]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise UserError(f"the K={k} run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    total = len(available(args.model_location))
    if total < 2:
        raise UserError(f"--model-location {args.model_location}: needs at least 2 ingredients, found "
                        f"{total}")
    ks = ks_of(args.ks, total)
    plain = run_one(args, 0)
    rows = [run_one(args, k) for k in ks]
    gib = 2 ** 30
    print(f"{args.arch}, {plain['learned_numbers']} learned numbers in {plain['blocks']} blocks, batch "
          f"{args.batch_size}, {plain['device']}, {plain['threads']} thread(s), {args.steps} steps")
    print(f"plain forward/backward: {plain['seconds_per_step']:.4f} s/step, peak "
          f"{plain['peak_bytes'] / gib:.3f} GiB")
    print(f"{'K':>4} {'peak GiB':>9} {'above plain':>11} {'s/step':>8} {'x plain':>8}")
    for r in rows:
        print(f"{r['k']:>4} {r['peak_bytes'] / gib:>9.3f} {(r['peak_bytes'] - plain['peak_bytes']) / gib:>11.3f} "
              f"{r['seconds_per_step']:>8.4f} {r['seconds_per_step'] / plain['seconds_per_step']:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "plain": plain, "runs": rows}, indent=1))
    return rows


if __name__ == "__main__":
    run_main(main)
