"""Check a device can run the paper's model: the clip-vit-b32 wrapper (random weights), forward +
backward at batch 128, 224 px; prints peak memory and images per second.

With --mehl, check instead the MEHL step's block products on the arch's learned tensors (random rows,
K = --rows): the fixed-launch fast path (utils/soup/segmented.py) against the per-block loop for
float32, bfloat16 and float16 rows; the time of a projection + combine by each; the kernels one step
launches with 14 blocks and with one block per tensor, by each path; that the step's non-finite check
sees NaN and Inf there; and, on CUDA, that a step makes no host sync (torch.cuda.set_sync_debug_mode).
Exits with status 1 when a check fails.

    python scripts/gpu_check.py                                  # CUDA, batch 128, 10 timed iterations
    python scripts/gpu_check.py --mehl                           # CUDA, K = 18
    python scripts/gpu_check.py --device cpu --batch-size 2 --iters 1 --warmup 1   # CPU smoke test

With --real-run, check instead a real MEHL run (`real_run_check`, below): MEHL_soup_layer.py in this
process on a synthetic zoo and ImageNet tree, --model_batch auto under a memory limit that the allocator
enforces, then one group at the K it picks: every step's batch comes pinned through the run's DataLoader
and no step synchronises with the host; no OOM; the plan's predicted peak within 5 % of the measured one.

    python scripts/gpu_check.py --real-run --zoo ZOO --data DATA     # CUDA; without --zoo/--data both
                                                                     # are written to a temporary folder

Matmuls run in exact fp32 unless --tf32. On CPU the memory printed is the process's peak resident set.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.archs import get_arch  # noqa: E402
from utils.run import mehl  # noqa: E402
from utils.runtime.memory import gib, peak_bytes, reset_peak  # noqa: E402
from utils.soup import hyperplane, sampling, segmented  # noqa: E402
from utils.soup.blocks import block_bounds, make_blocks  # noqa: E402
from utils.soup.schedules import constant  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-vit-b32", help="architecture name (default: clip-vit-b32)")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda; 'cpu' for a smoke test)")
    p.add_argument("--batch-size", type=int, default=128, help="images per iteration (default: 128)")
    p.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the linear head (default: 1000)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: 3)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default: 10)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: exact fp32)")
    p.add_argument("--mehl", action="store_true",
                   help="check the MEHL step's block products instead (see above)")
    p.add_argument("--rows", type=int, default=18, help="K, rows of directions for --mehl (default: 18)")
    p.add_argument("--real-run", action="store_true",
                   help="check a real MEHL run's step and its --model_batch auto plan instead (see above)")
    p.add_argument("--zoo", default=None, help="--real-run: a synthetic zoo of --arch (default: write one)")
    p.add_argument("--data", default=None, help="--real-run: its synthetic ImageNet tree (default: write one)")
    p.add_argument("--zoo-size", type=int, default=12,
                   help="--real-run: ingredients written when --zoo is not given (default: 12)")
    p.add_argument("--workers", type=int, default=2, help="--real-run: data loader workers (default: 2)")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def learned_layouts(model):
    """(names, bounds with one block per tensor, bounds with 14 blocks or as near as --layer-size gets)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    low, high = 0, sum(sizes)  # the fewest blocks a layer size gives is 1, the most len(sizes)
    while low < high:          # the smallest layer size giving at most 14 blocks
        mid = (low + high) // 2
        low, high = (low, mid) if len(make_blocks(sizes, mid)) <= 14 else (mid + 1, high)
    return names, block_bounds(sizes, make_blocks(sizes, 0)), block_bounds(sizes, make_blocks(sizes, low))


def timed_ms(fn, device, repeat=10):
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def check_agreement(P, bounds, device, failures):
    """The fast path against the per-block loop for one dtype of rows; appends to `failures`."""
    gen = torch.Generator(device=device).manual_seed(1)
    D, n = P.shape[1], P.shape[0]
    g = torch.randn(D, device=device, generator=gen)
    X = torch.randn(n, len(bounds), device=device, generator=gen)
    scale = torch.tensor(0.5, device=device)
    fast, loop = segmented.project(P, g, bounds, scale), hyperplane.project_blocks(P, g, bounds, scale)
    if fast is None:
        failures.append(f"fast path failed: {segmented.failure}")
        return
    err_p = float((fast - loop).abs().max() / loop.abs().max())
    start = torch.randn(D, device=device, generator=gen)
    fast = segmented.combine(X, P, bounds, start.clone(), accumulate=True)
    loop = hyperplane.combine_blocks(X, P, bounds, start.clone(), accumulate=True)
    err_c = float((fast - loop).abs().max() / loop.abs().max())
    ok = err_p < 1e-4 and err_c < 1e-4
    print(f"  {str(P.dtype)[6:]:>8} rows: largest difference from the per-block loop, relative to its "
          f"largest value: projection {err_p:.1e}, combine {err_c:.1e}: {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(f"{P.dtype} rows disagree")
    traffic = 2 * P.numel() * P.element_size() / 1e9
    ms_fast = timed_ms(lambda: (segmented.project(P, g, bounds),
                                segmented.combine(X, P, bounds, start, accumulate=True)), device)
    ms_loop = timed_ms(lambda: (hyperplane.project_blocks(P, g, bounds),
                                hyperplane.combine_blocks(X, P, bounds, start, accumulate=True)), device)
    print(f"  {'':>8}       projection + combine: fast path {ms_fast:.2f} ms "
          f"({traffic / ms_fast * 1e3:.0f} GB/s of rows), per-block loop {ms_loop:.2f} ms "
          f"({traffic / ms_loop * 1e3:.0f} GB/s)")


def sweep_tiles(P, bounds, device):
    """Time the fast path's projection + combine for a few tile shapes (columns x rows per program, warps),
    so that a later change of segmented.COLS / MAX_ROWS / WARPS rests on a measurement."""
    gen = torch.Generator(device=device).manual_seed(2)
    g = torch.randn(P.shape[1], device=device, generator=gen)
    X = torch.randn(P.shape[0], len(bounds), device=device, generator=gen)
    out = torch.zeros(P.shape[1], device=device)
    saved = segmented.COLS, segmented.MAX_ROWS, segmented.WARPS
    cells = []
    try:
        shapes = (1024, 16, 16), (1024, 8, 16), (1024, 16, 8), (1024, 8, 8), (512, 16, 8), (2048, 8, 16)
        for shape in shapes:
            segmented.COLS, segmented.MAX_ROWS, segmented.WARPS = shape
            ms = timed_ms(lambda: (segmented.project(P, g, bounds),
                                   segmented.combine(X, P, bounds, out, accumulate=True)), device)
            cells.append("{}x{}/{} {:.2f} ms".format(*shape, ms))
    finally:
        segmented.COLS, segmented.MAX_ROWS, segmented.WARPS = saved
    print(f"  {str(P.dtype)[6:]:>8} rows, tile shapes (columns x rows / warps): " + ", ".join(cells))


def count_step(model, names, bounds, device, x, y, clip, fast):
    """Kernels (CUDA) or ops (CPU) the profiler records for one MEHL step with 2 random rows."""
    soup = mehl.FlatSoup(model, names)
    P, inv = hyperplane.directions_(soup.theta + torch.randn(2, soup.theta.numel(), device=device),
                                   soup.theta, bounds)
    X = torch.zeros(2, len(bounds), device=device, requires_grad=True)
    group = mehl.Group(soup.theta, P, inv, X, torch.optim.AdamW([X], lr=0.01), constant(0.01))
    saved = segmented.failure
    segmented.failure = saved if fast else "off for the comparison"
    try:
        mehl.step(model, soup, group, bounds, (x, y), len(y), clip=clip)
        sync(device)
        cuda = device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            mehl.step(model, soup, group, bounds, (x, y), len(y), clip=clip)
            sync(device)
    finally:
        segmented.failure = saved
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA), group, soup
    return len(events), group, soup


def mehl_check(args, model, device):
    failures = []
    names, per_tensor, fourteen = learned_layouts(model)
    D = sum(stop - start for start, stop in per_tensor)
    print(f"MEHL block products on {args.arch}: {D} learned numbers, {len(per_tensor)} tensors, "
          f"K = {args.rows}, {device}")
    gen = torch.Generator(device=device).manual_seed(0)
    P = segmented.empty_rows(args.rows, D, torch.float32, device)  # padded as a run's rows are
    P.normal_(generator=gen)
    fast_here = segmented.supports(P, P[0], per_tensor)
    if not fast_here:
        why = segmented.failure or "the per-block loop runs"
        print(f"  fast path: not used on {device.type} here ({why})")
    else:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            rows = P if dtype == torch.float32 else segmented.empty_rows(*P.shape, dtype, device).copy_(P)
            check_agreement(rows, per_tensor, device, failures)
        if device.type == "cuda":
            sweep_tiles(P, per_tensor, device)
    del P
    x = torch.randn(min(args.batch_size, 8), 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (len(x),), device=device)
    clip = get_arch(args.arch).is_vit
    what = "CUDA kernels" if device.type == "cuda" else "ops"
    for fast in (True, False):
        counts = [count_step(model, names, bounds, device, x, y, clip, fast)[0]
                  for bounds in (fourteen, per_tensor)]
        fast = fast and fast_here and segmented.failure is None
        print(f"  {what} in one step ({'fast path' if fast else 'per-block loop'}): "
              f"{counts[0]} with {len(fourteen)} blocks, {counts[1]} with {len(per_tensor)} blocks")
        if fast and counts[0] != counts[1]:
            failures.append("the fast path's kernel count depends on the blocks")
    ok = all(not torch.isfinite(torch.stack(torch.aminmax(torch.tensor(v, device=device)))).all()
             for v in ([1.0, float("nan"), 2.0], [float("inf"), 0.0], [0.0, -float("inf")]))
    print(f"  the step's non-finite check sees NaN and Inf on {device.type}: {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append("NaN or Inf not seen")
    if device.type == "cuda":
        _, group, soup = count_step(model, names, per_tensor, device, x, y, clip, True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            mehl.step(model, soup, group, per_tensor, (x, y), len(y), clip=clip)
            print("  no host sync in a step (torch.cuda.set_sync_debug_mode): ok")
        except RuntimeError as err:
            print(f"  a step synchronised with the host: FAIL ({str(err).splitlines()[0]})")
            failures.append("host sync")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if failures:
        print("MEHL check FAILED: " + "; ".join(failures))
        return 1
    print("MEHL check passed")
    return 0


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available here (use --device cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if args.real_run:
        return real_run_check(args, device)
    if args.mehl:
        model = get_arch(args.arch).build(args.num_classes, pretrained=False).to(device).train()
        return mehl_check(args, model, device)
    model = get_arch(args.arch).build(args.num_classes, pretrained=False).to(device).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    for _ in range(args.warmup):
        step(model, x, y)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        loss = step(model, x, y)
    sync(device)
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device {name}, arch {args.arch}, batch {args.batch_size}, {args.image_size} px, "
          f"params {total / 1e6:.1f} M ({trained / 1e6:.1f} M trained), loss {loss.item():.3f}")
    print(f"forward+backward: {args.iters * args.batch_size / seconds:.1f} images/s "
          f"({seconds / args.iters * 1000:.1f} ms/iter over {args.iters} iterations)")
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident set of the process"
    print(f"peak memory: {gib(peak_bytes(device))} ({kind})")


# ------------------------------------------------------------------------ a real run (issue 29)
# A real MEHL run in this process: its own DataLoader, its own plan. `real_run_check` wraps three of the
# run's functions to watch it: the footprint (to set the memory limit from the measured plain step), the
# step (pinned batches, no host sync) and the fast path's self-check (which path ran).

def real_run_check(args, device):
    """--real-run. The limit is set once the plain step is measured, to the capacity at which the plan
    picks K = half the zoo (half a row to spare), for the plan (--memory-limit) and, on CUDA, for the
    allocator too (torch.cuda.set_per_process_memory_fraction): a prediction short by more than the
    margin and headroom ends in an OOM at that K. One group is learned (--stop-after-groups 1), two
    epochs (the DataLoader's workers persist between them), every step, and every batch's way out of
    the run's DataLoader, under torch.cuda.set_sync_debug_mode("error") (not the reads of the loss every
    mehl.LOG_EVERY steps, which are meant to wait). Exits with status 1 when a check fails."""
    import tempfile
    import MEHL_soup_layer as script
    from scripts.standins import input_size, write_synthetic_imagenet, write_synthetic_zoo
    from utils.run import plan

    cuda = device.type == "cuda"
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_real_run."))
    seen = {"steps": 0, "batches": 0, "unpinned": 0, "syncs": [], "paths": [], "limit": None, "fp": None, "k": None}
    real = plan.footprint, mehl.step, mehl.check_fast_path, plan.predicted_peak, sampling.RankLoader.epoch
    capacity_bytes = plan.capacity_bytes

    def footprint(setup, layout, soup, paths, batch, **kw):
        fp, batch = real[0](setup, layout, soup, paths, batch, **kw)
        n = len(paths)
        capacity = (plan.step_peak(fp, n // 2) + fp.row // 2 + (plan.CUDA_HEADROOM if cuda else 0)) / (1 - plan.MARGIN)
        seen["limit"] = capacity / 2**30  # the plan's --memory-limit from here on (`limited`)
        if cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, capacity / total), device)
        seen["fp"] = fp
        return fp, batch

    def limited(device, limit_gib=None, local_world=1):
        return capacity_bytes(device, seen["limit"] if seen["limit"] is not None else limit_gib, local_world)

    def step(model, soup, group, bounds, batch, *rest, **kw):
        seen["steps"] += 1
        if batch is not None and cuda and not all(t.is_pinned() for t in batch):
            seen["unpinned"] += 1
        seen["k"] = group.P.shape[0]
        if not cuda:
            return real[1](model, soup, group, bounds, batch, *rest, **kw)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real[1](model, soup, group, bounds, batch, *rest, **kw)
        except RuntimeError as err:
            if "synchroniz" in str(err):  # set_sync_debug_mode's error, not (say) an OOM
                seen["syncs"].append(str(err).strip().splitlines()[0])
            raise
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def check_fast_path(*a, **kw):
        seen["paths"].append(real[2](*a, **kw))
        return seen["paths"][-1]

    def epoch(loader, dataset, workers=0):  # each batch's way out of the DataLoader, watched too
        batches = real[4](loader, dataset, workers)
        while True:
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                item = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                if "synchroniz" in str(err):
                    seen["syncs"].append("DataLoader: " + str(err).strip().splitlines()[0])
                raise
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
            seen["batches"] += 1
            yield item

    failures = []
    try:
        zoo, data = args.zoo, args.data
        if zoo is None or data is None:
            zoo, data = scratch / "zoo", scratch / "data"
            write_synthetic_zoo(zoo, args.zoo_size, args.arch, 10)
            write_synthetic_imagenet(data, 10, 27, input_size(get_arch(args.arch)))  # 13 held out a class
        plan.footprint, plan.capacity_bytes = footprint, limited
        mehl.step, mehl.check_fast_path = step, check_fast_path
        sampling.RankLoader.epoch = epoch
        argv = ["--arch", args.arch, "--datasets", "ImageNet", "--model-location", str(zoo),
                "--data-location", str(data), "--heldout-per-class", "13", "--model_batch", "auto",
                "--epochs", "2", "--batch-size", str(args.batch_size), "--cosine-lr", "--no-epoch-test",
                "--no-shifts", "--test-size", "10", "--device", device.type, "--workers", str(args.workers),
                "--decode-cache", "none", "--stop-after-groups", "1", "--save-soup", "none",
                "--results-db", str(scratch / "results.jsonl"), "--resume", str(scratch / "state.pt")]
        print(f"a real MEHL run on {args.arch} ({zoo}), batch {args.batch_size}, --workers {args.workers}, "
              f"--model_batch auto, one group of two epochs, {device}")
        try:
            script.main(argv)
        except (Exception, SystemExit) as err:  # an OOM at the K picked, a host sync, a user error
            failures.append(f"the run failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}")
        fp, k = seen["fp"], seen["k"]
        if fp is not None and k is not None:
            n = len(list(Path(zoo).glob("model_*")))
            print(f"  --model_batch auto under a limit of {seen['limit']:.3f} GiB (the plan's; "
                  f"{'and the allocator' if cuda else 'not enforced on a CPU'}): K = {k} of {n} "
                  f"({'as' if k == n // 2 else 'NOT as'} planned: {n // 2})")
            if k != n // 2:
                failures.append(f"auto picked K = {k}, not {n // 2}")
            predicted = real[3](fp, k)
            measured = max(fp.so_far, torch.cuda.max_memory_allocated(device)) if cuda else None
            if measured is not None:
                off = measured / predicted - 1
                ok = abs(off) <= 0.05
                print(f"  peak at K = {k}: predicted {gib(predicted)}, measured {gib(measured)} "
                      f"(torch.cuda.max_memory_allocated; {gib(torch.cuda.max_memory_reserved(device))} "
                      f"reserved): {off:+.1%}: {'ok' if ok else 'FAIL'} (within 5 %)")
                if not ok:
                    failures.append(f"predicted peak off by {off:+.1%}")
            else:
                print(f"  peak at K = {k}: predicted {gib(predicted)} (measured on CUDA only)")
        print(f"  steps: {seen['steps']}, batches read through the run's DataLoader: {seen['batches']}" + (f", every batch pinned: {'ok' if not seen['unpinned'] else 'FAIL'}, "
              f"no host sync in any step nor in reading its batch (set_sync_debug_mode error): "
              f"{'ok' if not seen['syncs'] else 'FAIL'}"
              if cuda else " (pinned memory and host syncs are checked on CUDA only)"))
        if seen["unpinned"]:
            failures.append(f"{seen['unpinned']} batch(es) not pinned")
        if seen["syncs"]:
            failures.append(f"a step synchronised with the host: {seen['syncs'][0]}")
        if not seen["steps"] or seen["batches"] != seen["steps"]:
            failures.append(f"{seen['steps']} steps, {seen['batches']} batches from the run's DataLoader")
        print(f"  block products: {', '.join(seen['paths']) or 'not checked'}"
              + (f" ({segmented.failure})" if segmented.failure else ""))
    finally:
        plan.footprint, mehl.step, mehl.check_fast_path = real[:3]
        plan.capacity_bytes = capacity_bytes
        sampling.RankLoader.epoch = real[4]
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    if failures:
        print("REAL RUN check FAILED: " + "; ".join(failures))
        return 1
    print("REAL RUN check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
