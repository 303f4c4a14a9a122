"""MEHL-Soup's memory and step time as K (--model_batch) grows, against one plain forward/backward, and
beside the released algorithm's step (--baseline released).

Each K runs in a fresh subprocess (peak resident memory only grows within a process; on CUDA the peak
is `torch.cuda.max_memory_allocated`). A subprocess builds the model and the held-out data as
MEHL_soup_layer.py does, loads the first K ingredients as the rows of one group (`utils.run.mehl.
directions`), makes one step (the peak is read then), and times --steps real MEHL steps
(`utils.run.mehl.step`: gradient, ViT clipping, projection, AdamW step, soup update) on one fixed batch
already on the device, alternating with a plain forward/backward of the same model on the same batch
(`zero_grad(set_to_none=True)`, backward into fresh gradients): "x plain" is the ratio of their medians
in the same process, so a busy machine slows both alike. The "plain" run does forward/backward alone;
its peak is the memory every run shares (model, data, the ingredient checks), from which the peak above
plain is counted.

--baseline released adds, for every K, a subprocess timing the released algorithm's step as published
(the paper's released code, as the MEHL_soup_layer.py docstring describes the algorithm): the gradient concatenated into a new vector, a projection per tensor, AdamW on X,
a combine per tensor into a new vector, + center, the model's parameters replaced by copies. Both are
printed with their ratio; in --out's JSON each entry of "runs" says "step": "project" (this project's)
or "released". --profile DIR writes a torch.profiler table of one step of each run (the top 15 ops by
their own device time on CUDA, CPU time on a CPU) and records the number of kernels (CUDA) or ops (CPU)
the step ran.

    python scripts/bench_mehl.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 \\
        --ks 2,4,8,all --batch-size 128 --steps 5
    # the paper's architecture at its real size, nothing downloaded: 8 stand-in ingredients in the
    # published layout and a synthetic ImageNet tree of 224 px images, both removed afterwards
    python scripts/bench_mehl.py --arch clip-vit-b32 --datasets ImageNet --synthetic-zoo 8 \\
        --ks 8 --batch-size 8 --steps 5 --threads 2 --baseline released

Prints one line per K and step: peak memory, peak above the plain run (GiB and in ingredients, one
ingredient being the learned parameters in float32), the median seconds of a step and of a plain step,
their ratio, and the same ratio in CPU seconds of the process (steadier on a shared machine); writes the
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

from scripts.standins import input_size, write_synthetic_imagenet, write_synthetic_zoo  # noqa: E402
from utils.files import paths  # noqa: E402
from utils.files.ingredients import available  # noqa: E402
from utils.run.cli import check_number  # noqa: E402
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
    p.add_argument("--baseline", default="none", choices=["none", "released"],
                   help="released: also time the released algorithm's step for every K, in its own "
                   "process, and print the two side by side (float32 directions only)")
    p.add_argument("--profile", default=None,
                   help="folder for a torch.profiler table of one step of every run (profile_<step>_k<K>"
                   ".txt: the top 15 ops by own device time, CPU time on a CPU)")
    p.add_argument("--out", default="runs/bench_mehl.json", help="JSON file for the numbers")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # K of a subprocess
    p.add_argument("--step", default="project", help=argparse.SUPPRESS)       # its step: project, released
    return p.parse_args(argv)


def ks_of(spec, total=None):
    """The K values of --ks ('all': `total`); without `total`, only their form is checked."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item != "all" and not (item.isdigit() and int(item) >= 1):
            raise UserError(f"--ks {item!r}: give whole numbers >= 1 or 'all'")
        k = total if item == "all" else int(item)
        if total is not None and k > total:
            raise UserError(f"--ks {item}: the zoo holds {total} ingredients")
        if k not in out:
            out.append(k)
    return out


# ------------------------------------------------------------------------------ one subprocess
def released_step(model, params, group, bounds, batch, clip):
    """The released algorithm's step, written here from its published description:
    the model's own gradients concatenated into a new vector, clipped to norm 1 for ViTs, projected one
    tensor at a time, an AdamW step on X, the soup combined one tensor at a time into a new vector
    + center, and every parameter replaced by a copy of its slice."""
    import torch
    x, y = batch
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    g = torch.cat([p.grad.reshape(-1) for p in params])
    group.X.grad = torch.cat([torch.mm(group.P[:, s:e], g[s:e, None]) for s, e in bounds], dim=1)
    group.optimizer.step()
    X = group.X.detach()
    soup = torch.cat([torch.mm(X[None, :, b], group.P[:, s:e])[0] for b, (s, e) in enumerate(bounds)])
    soup = soup + group.center
    offset = 0
    for p in params:
        p.data = soup[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def profile_step(fn, device, path):
    """Profile one call of `fn`; write the top 15 ops by own device time (CPU time on a CPU) to `path`.
    Returns the number of CUDA kernels it ran (ops on a CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        count = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        key = ("self_device_time_total" if hasattr(events[0], "self_device_time_total")
               else "self_cuda_time_total")
    else:
        count, key = len(events), "self_cpu_time_total"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{count} {'CUDA kernels' if cuda else 'ops'} in one step\n"
                          + prof.key_averages().table(sort_by=key, row_limit=15) + "\n")
    return count


def learned_only(model, layout, base):
    """The model at the first ingredient (`base`), gradients for the learned parameters only."""
    from utils.run.batchnorm import set_mode
    model.load_state_dict(base)
    learned = set(layout.names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in learned)
    set_mode(model, layout.frozen_stats)


def released_setup(args, setup, layout, batch, params):
    """(step, None): the released step on the first K ingredients, the model moved to their mean."""
    import torch
    from utils.run import mehl
    from utils.runtime import memory
    from utils.soup import hyperplane
    from utils.soup.schedules import constant
    k, device = args.worker, setup.device
    memory.reset_peak(device)
    rows = mehl.load_rows(setup.paths, list(range(k)), layout.names, layout.sizes, setup.reference,
                          torch.float32, device)
    center = mehl.group_mean(rows, k, out=torch.empty(layout.numel, device=device))
    P, inv_norms = hyperplane.directions_(rows, center, layout.bounds)
    with torch.no_grad():
        for p, piece in zip(params, center.split(layout.sizes)):
            p.copy_(piece.view_as(p))
    X = torch.zeros(k, layout.num_blocks, device=device, requires_grad=True)
    group = mehl.Group(center, P, inv_norms, X, torch.optim.AdamW([X], lr=0.01, weight_decay=0.0),
                       constant(0.01))
    return (lambda: released_step(setup.model, params, group, layout.bounds, batch, setup.spec.is_vit)), None


def project_setup(args, setup, layout, batch, params, soup):
    """(step, prepare): this project's step on the first K ingredients as MEHL_soup_layer.py makes it,
    on the flat `soup`; `prepare` points the gradients at the flat vector again after a plain step set
    them to None."""
    import torch
    from utils.run import mehl
    from utils.runtime import memory
    from utils.soup.schedules import constant
    k, device, model = args.worker, setup.device, setup.model
    memory.reset_peak(device)
    center, P, inv_norms = mehl.directions(setup.paths, list(range(k)), k, layout, setup.reference, soup,
                                           mehl.DTYPES[args.directions_dtype], first=True)
    X = torch.zeros(k, layout.num_blocks, device=device, requires_grad=True)
    group = mehl.Group(center, P, inv_norms, X, torch.optim.AdamW([X], lr=0.01, weight_decay=0.0),
                       constant(0.01))
    views = [v.view_as(p) for v, p in zip(soup.grad.split(layout.sizes), params)]

    def prepare():
        for p, v in zip(params, views):
            p.grad = v

    def step():
        mehl.step(model, soup, group, layout.bounds, batch, len(batch[1]), clip=setup.spec.is_vit)
    return step, prepare


def timed(args, sync, *fns):
    """Median wall-clock and CPU seconds (this process, all its threads) of each function over --steps
    rounds, the functions alternating within a round (after one warm-up round), so that a busy machine
    slows them alike; CPU seconds do not count time spent waiting for a core. A function given as
    (prepare, run) times `run` only."""
    fns = [fn if isinstance(fn, tuple) else (None, fn) for fn in fns]
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for round_ in range(args.steps + 1):
        for j, (prepare, fn) in enumerate(fns):
            if prepare:
                prepare()
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            if round_:
                wall[j].append(time.perf_counter() - start)
                cpu[j].append(time.process_time() - start_cpu)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def worker(args):
    import torch
    import datasets
    import MEHL_soup_layer as recipe
    from utils.run import cli, mehl
    from utils.run.batchnorm import set_mode
    from utils.run.layout import make_layout
    from utils.runtime import memory

    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.worker
    flags = ["--model-location", args.model_location, "--arch", args.arch, "--datasets", args.datasets,
             "--batch-size", str(args.batch_size), "--device", args.device, "--save-soup", "none",
             "--test-size", "10", "--params_end", str(max(k, 2)), "--heldout-per-class",
             str(max(1, -(-args.batch_size // args.num_classes)))]
    if args.data_location:
        flags += ["--data-location", args.data_location]
    setup = cli.prepare(recipe.parse_args(flags), check_ingredients=False, data=datasets.build_dataset)
    layout, base = make_layout(setup.paths, setup.model, setup.reference, args.layer_size)
    model, device = setup.model, setup.device
    x, y = next(iter(torch.utils.data.DataLoader(setup.bundle.heldout, batch_size=args.batch_size)))
    batch = (x.to(device), y.to(device))  # on the device once: the steps time compute, not the copy
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = [dict(model.named_parameters())[n] for n in layout.names]

    def plain():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()

    if k and args.step == "project":
        soup = mehl.start_model(model, layout, base)
        set_mode(model, layout.frozen_stats)
    else:
        learned_only(model, layout, base)
    del base  # before the rows load: the model holds it now
    if k == 0:
        memory.reset_peak(device)  # as the other runs do before their rows load: the set-up's own peak
        step, prepare = plain, None  # is not the step's
    elif args.step == "released":
        step, prepare = released_setup(args, setup, layout, batch, params)
    else:
        step, prepare = project_setup(args, setup, layout, batch, params, soup)
    if prepare:
        prepare()
    step()  # the step's memory: read before any plain step (which makes gradients of its own) runs
    sync()
    peak = memory.peak_bytes(device)
    if k == 0:
        (seconds, cpu), = timed(args, sync, plain)
        plain_here, plain_cpu = seconds, cpu
    else:
        (plain_here, plain_cpu), (seconds, cpu) = timed(args, sync, plain, (prepare, step))
    kernels = None
    if args.profile:
        if prepare:
            prepare()
        name = f"profile_{args.step if k else 'plain'}_k{k}.txt"
        kernels = profile_step(step, device, Path(args.profile) / name)
    print(json.dumps({"k": k, "step": args.step if k else "plain", "seconds_per_step": seconds,
                      "plain_seconds_same_process": plain_here, "cpu_seconds_per_step": cpu,
                      "plain_cpu_seconds_same_process": plain_cpu, "peak_bytes": peak,
                      "learned_numbers": layout.numel, "blocks": layout.num_blocks, "device": str(device),
                      "threads": torch.get_num_threads(), "kernels_per_step": kernels}))


# ---------------------------------------------------------------------------------- driver
def run_one(args, k, step="project"):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(k), "--step", step,
           "--model-location", str(args.model_location), "--arch", args.arch, "--datasets", args.datasets,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--layer-size",
           str(args.layer_size), "--device", args.device, "--directions-dtype", args.directions_dtype,
           "--num-classes", str(args.num_classes)]
    if args.data_location:
        cmd += ["--data-location", str(args.data_location)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.profile:
        cmd += ["--profile", str(Path(args.profile).resolve())]
    # the caller's PYTHONPATH stays (packages installed beside the environment, e.g. gpu_check.sh's)
    path = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the K={k} run ({step} step) failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args, plain, rows):
    gib = 2 ** 30
    ingredient = plain["learned_numbers"] * 4
    print(f"{args.arch}, {plain['learned_numbers']} learned numbers in {plain['blocks']} blocks "
          f"(one ingredient = {ingredient / gib:.3f} GiB), batch {args.batch_size}, {plain['device']}, "
          f"{plain['threads']} thread(s), {args.steps} steps, directions in {args.directions_dtype}")
    print(f"plain forward/backward: {plain['seconds_per_step']:.4f} s/step, peak "
          f"{plain['peak_bytes'] / gib:.3f} GiB")
    print(f"{'K':>4} {'step':<9} {'peak GiB':>9} {'above plain':>11} {'ingredients':>11} {'s/step':>8} "
          f"{'plain s':>8} {'x plain':>8} {'x plain (CPU s)':>15}")
    for r in rows:
        above = r["peak_bytes"] - plain["peak_bytes"]
        r["above_plain_ingredients"] = above / ingredient
        r["x_plain"] = r["seconds_per_step"] / r["plain_seconds_same_process"]
        r["x_plain_cpu"] = r["cpu_seconds_per_step"] / r["plain_cpu_seconds_same_process"]
        print(f"{r['k']:>4} {r['step']:<9} {r['peak_bytes'] / gib:>9.3f} {above / gib:>11.3f} "
              f"{r['above_plain_ingredients']:>11.2f} {r['seconds_per_step']:>8.4f} "
              f"{r['plain_seconds_same_process']:>8.4f} {r['x_plain']:>8.3f} {r['x_plain_cpu']:>15.3f}",
              flush=True)
        ours = [o for o in rows if o["k"] == r["k"] and o["step"] == "project"]
        if r["step"] == "released" and ours:
            o = ours[0]
            print(f"{'':>4} project / released: x plain {o['x_plain'] / r['x_plain']:.3f} (wall), "
                  f"{o['x_plain_cpu'] / r['x_plain_cpu']:.3f} (CPU s); above plain "
                  f"{o['above_plain_ingredients']:.2f} / {r['above_plain_ingredients']:.2f} ingredients",
                  flush=True)


def bench(args):
    total = len(available(args.model_location))
    if total < 2:
        raise UserError(f"--model-location {args.model_location}: needs at least 2 ingredients, found "
                        f"{total}")
    ks = ks_of(args.ks, total)
    plain = run_one(args, 0)
    steps = ["project"] + (["released"] if args.baseline == "released" else [])
    rows = [run_one(args, k, step) for k in ks for step in steps]
    report(args, plain, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "plain": plain,
                               "runs": rows}, indent=1))
    return rows


def check_args(args):
    """Every flag and output checked before any work (a UserError names the flag): --out and --profile
    land on no input (an ingredient, the data) and can be written, and an existing --out is a file this
    script wrote."""
    if args.synthetic_zoo < 0 or args.synthetic_zoo == 1:
        raise UserError(f"--synthetic-zoo must be 0 (off) or at least 2, got {args.synthetic_zoo}")
    if args.batch_size < 1 or args.steps < 1:
        raise UserError("--batch-size and --steps must be >= 1")
    ks_of(args.ks)
    check_number("--layer-size", args.layer_size, 0)
    check_number("--num-classes", args.num_classes, 1)
    if args.threads is not None:
        check_number("--threads", args.threads, 1)
    outputs = [paths.Role("--out", "the numbers file (--out)", Path(args.out))]
    if args.profile:
        outputs.append(paths.Role("--profile", f"a profile table of --profile {args.profile}",
                                  Path(args.profile) / "profile_project_k1.txt"))
    paths.check_outputs(outputs, args.model_location, args.data_location)
    paths.check_own_json(args.out, "--out", ("args", "plain", "runs"))


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    check_args(args)
    if args.baseline == "released" and args.directions_dtype != "float32":
        raise UserError("--baseline released times the released step, which keeps its directions in "
                        f"float32: drop --directions-dtype {args.directions_dtype} or the baseline")
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
