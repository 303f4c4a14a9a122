"""The small stages of scripts/gpu_check.sh that need Python, one subcommand each (the shell script runs
them; each ends with status 0 when its check passed, 1 when it failed):

    python scripts/gpu_stages.py imports                   # every import the stages need, before any stage
    python scripts/gpu_stages.py disk DIR BYTES [WHAT]     # DIR's file system has BYTES free (+ 1 GiB)
    python scripts/gpu_stages.py standin-bytes ARCH N      # bytes that N stand-ins of ARCH take on disk
    torchrun --nproc_per_node 1 scripts/gpu_stages.py group --device cuda   # a real process group
    python scripts/gpu_stages.py vit-l14 --device cuda --batch 128 --out DIR   # ViT-L/14 (see below)
    python scripts/gpu_stages.py summary OUT               # the summary table and OUT/gpu_check.json

`group` initialises a process group as torchrun's environment says (nccl on CUDA, gloo on a CPU; a world
of one process is enough to exercise the rendezvous), all-reduces a tensor, checks the sum and tears the
group down.

`vit-l14`: the paper's second model, CLIP ViT-L/14, as `clip-vit-l14` in the published checkpoint layout
(utils/archs/clip.py): writes --n stand-in ingredients, loads each back through the ingredient checks
and strictly into the model, then measures one plain forward/backward with MEHL's flat gradient
(`utils.run.plan.measure`, as MEHL-Soup+ measures its own before learning) at each --batch, and prints
the planner's K for the launchers' 24 GB card with float32 and with bfloat16 directions over the paper's
72 ingredients (`utils.run.plan.card_k`), into --out/vit_l14.json too. The stand-ins are removed.
"""
import argparse
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30
NEEDED = ["numpy", "PIL", "torch", "torchvision", "tqdm", "safetensors", "regex", "ftfy", "timm", "open_clip",
          "open_clip.tokenizer", "open_clip.model"]
PROJECT = ["datasets", "utils.run.cli", "utils.run.plan", "scripts.standins", "utils.soup.segmented",
           "MEHL_soup_layer", "greedy_soup", "uniform_soup", "learned_soup", "report"]
SCRIPTS = ["gpu_check.py", "bench_mehl.py", "paper_scale.py", "individual.py"]
PAPER_INGREDIENTS = 72


def imports(args):
    """Import every module the stages need (the scripts are loaded, not run) and build tiny-clip (what
    open_clip's model code needs); one line per failure."""
    failed = []
    for name in NEEDED + PROJECT:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure to import is what this stage reports
            failed.append(f"import {name}: {type(err).__name__}: {err}")
    for name in SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"_stage_{name[:-3]}", ROOT / "scripts" / name)
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except Exception as err:  # noqa: BLE001
            failed.append(f"scripts/{name}: {type(err).__name__}: {err}")
    if not failed:
        try:
            from utils.archs import get_arch
            get_arch("tiny-clip").build(10)
        except Exception as err:  # noqa: BLE001
            failed.append(f"building tiny-clip: {type(err).__name__}: {err}")
    import torch
    print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    for optional, what in (("triton", "the fast path's kernels (else the per-block loop runs)"),
                           ("matplotlib", "report.py's figures")):
        try:
            module = importlib.import_module(optional)
            print(f"{optional} {getattr(module, '__version__', '')}: importable")
        except Exception as err:  # noqa: BLE001
            print(f"{optional}: not importable ({type(err).__name__}): {what} will not run")
    for line in failed:
        print("FAILED: " + line)
    print(f"imports: {len(NEEDED) + len(PROJECT) + len(SCRIPTS) - len(failed)} of "
          f"{len(NEEDED) + len(PROJECT) + len(SCRIPTS)} modules import" + ("" if failed else ": ok"))
    return 1 if failed else 0


def standin_bytes(arch, n):
    """What `write_synthetic_zoo` writes for n stand-ins of `arch` (the model built on the meta device)."""
    import torch
    from utils.archs import get_arch
    with torch.device("meta"):
        model = get_arch(arch).build(1000)
    return n * sum(v.numel() * v.element_size() for v in model.state_dict().values())


def disk(args):
    free = shutil.disk_usage(args.dir).free
    need = args.bytes + GiB  # a margin for the images, logs and the file system's own
    ok = free >= need
    print(f"free disk in {args.dir}: {free / GiB:.1f} GiB, {args.what} needs {args.bytes / GiB:.1f} GiB "
          f"(+ 1 GiB margin): {'ok' if ok else 'NOT ENOUGH, not written'}")
    return 0 if ok else 1


def group(args):
    """Init, all_reduce, barrier, teardown of a real process group under torchrun."""
    import torch
    import torch.distributed as dist
    from utils.runtime import distributed
    if "RANK" not in os.environ:
        print("group: not started by torchrun (no RANK in the environment)")
        return 1
    device = distributed.setup(args.device)  # the device of LOCAL_RANK; a group only when WORLD_SIZE > 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    started = time.perf_counter()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    x = torch.full((4,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(x)
    dist.barrier()
    expected = world * (world + 1) / 2
    ok = bool((x == expected).all())
    dist.destroy_process_group()
    print(f"process group: {backend} on {device}, rank {rank} of {world}, init + all_reduce + "
          f"barrier + teardown in {time.perf_counter() - started:.2f} s, sum {x[0].item():g} "
          f"(expected {expected:g}): {'ok' if ok else 'FAIL'}")
    return 0 if ok and not dist.is_initialized() else 1


# ------------------------------------------------------------------------------------------- ViT-L/14
PUBLISHED_OUTSIDE_VISUAL = {"model.positional_embedding", "model.text_projection", "model.logit_scale",
                            "model.token_embedding.weight", "model.ln_final.weight", "model.ln_final.bias",
                            "classification_head.weight", "classification_head.bias"}


def vit_l14(args):
    import torch
    from utils.archs import get_arch
    from scripts.standins import write_synthetic_zoo
    from utils.files.ingredients import ingredient_paths, load_checked
    from utils.run import mehl, plan
    device = torch.device(args.device)
    spec = get_arch("clip-vit-l14")
    model = spec.build(args.classes)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    outside = {k for k in reference if not k.startswith("model.visual.")}
    layout_ok = outside == PUBLISHED_OUTSIDE_VISUAL
    print(f"clip-vit-l14: {len(reference)} tensors, {sum(v.numel() for v in reference.values()) / 1e6:.1f} M "
          f"numbers; outside model.visual: the published layout's {len(PUBLISHED_OUTSIDE_VISUAL)}: "
          f"{'ok' if layout_ok else 'FAIL ' + str(sorted(outside ^ PUBLISHED_OUTSIDE_VISUAL))}")
    scratch = Path(tempfile.mkdtemp(prefix="vit_l14.", dir=args.scratch))
    try:
        started = time.perf_counter()
        write_synthetic_zoo(scratch, args.n, "clip-vit-l14", args.classes,
                            device="cuda" if device.type == "cuda" else "cpu")
        paths = ingredient_paths(scratch)
        for path in paths:
            model.load_state_dict(load_checked(path, reference), strict=True)
        size = sum(p.stat().st_size for p in paths)
        print(f"{args.n} stand-ins written ({size / GiB:.2f} GiB), checked and loaded strictly in "
              f"{time.perf_counter() - started:.1f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model = model.to(device).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    soup = mehl.FlatSoup(model, names)
    numel = soup.theta.numel()
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, args.classes, (batch,), device=device)
        before = plan.so_far(device)
        try:
            peak, resident = plan.measure(lambda: mehl.gradient(model, soup, (x, y), batch, 0.0), device)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: a plain forward/backward does not fit this device")
            continue
        finally:
            del x, y
        checkpoint = 0 if device.type == "cuda" else sum(v.numel() * v.element_size() for v in reference.values())
        row = {"batch": batch, "plain_peak_bytes": peak, "learned_numbers": numel}
        for dtype in ("float32", "bfloat16"):
            size = mehl.DTYPES[dtype].itemsize
            fp = plan.Footprint(plain_peak=peak, resident=resident, row=numel * size, soup_row=numel * 4,
                                checkpoint=checkpoint, halved=size < 4, so_far=before)
            row[f"card_k_{dtype}"] = plan.card_k(fp, PAPER_INGREDIENTS)
            row[f"predicted_peak_k2_{dtype}"] = plan.predicted_peak(fp, 2)
        rows.append(row)
        print(f"batch {batch}: plain forward/backward {plan.gib(peak)} on {device}; a 24 GB card "
              f"({plan.gib(plan.CARD_BYTES - plan.CARD_CONTEXT_BYTES)} usable) would take K = "
              f"{row['card_k_float32'] or 'none'} (float32 directions) or {row['card_k_bfloat16'] or 'none'} "
              f"(bfloat16) of {PAPER_INGREDIENTS}")
        soup.grad.zero_()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vit_l14.json").write_text(json.dumps(
            {"arch": "clip-vit-l14", "device": str(device), "published_layout": layout_ok,
             "standins": args.n, "rows": rows}, indent=1))
    return 0 if layout_ok and rows else 1


# -------------------------------------------------------------------------------------------- summary
def numbers(out):
    """The headline numbers of the stages' outputs that exist, for the table and the JSON."""
    found = {}
    for name, label in (("gpu_check.txt", "fp32"), ("gpu_check_tf32.txt", "tf32")):
        text = _read(out / name)
        m = re.search(r"\(([0-9.]+) ms/iter", text)
        if m:
            found[f"forward_backward_ms_{label}"] = float(m.group(1))
    for name in ("bench_mehl_float32.json", "bench_mehl_bfloat16.json", "bench_mehl_tf32.json"):
        try:
            doc = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        for r in doc.get("runs", []):
            key = f"{name[:-5]}_{r.get('step')}_k{r.get('k')}"
            found[key] = {"x_plain": _round(r.get("x_plain")),
                          "above_plain_ingredients": _round(r.get("above_plain_ingredients")),
                          "peak_gib": _round((r.get("peak_bytes") or 0) / GiB)}
    try:
        doc = json.loads((out / "paper_scale" / "paper_scale.json").read_text())
        found["paper_scale"] = {p["name"]: {"seconds": p["seconds"], "extrapolated_seconds":
                                            p["extrapolated_seconds"], "exit_code": p["exit_code"]}
                                for p in doc.get("phases", [])}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        found["vit_l14"] = json.loads((out / "vit_l14.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        pass
    return found


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""


def _round(v):
    return None if v is None else round(v, 3)


def summary(args):
    out = Path(args.out)
    stages = []
    for line in _read(out / "stages.tsv").splitlines():
        name, budget, seconds, status = line.split("\t")
        stages.append({"stage": name, "budget_s": int(budget), "seconds": int(seconds), "status": status})
    width = max([len(s["stage"]) for s in stages] + [5])
    print(f"{'stage':<{width}}  {'budget s':>8}  {'took s':>6}  status")
    for s in stages:
        print(f"{s['stage']:<{width}}  {s['budget_s']:>8}  {s['seconds']:>6}  {s['status']}")
    print(f"{'all':<{width}}  {sum(s['budget_s'] for s in stages):>8}  {sum(s['seconds'] for s in stages):>6}  "
          f"{sum(s['status'] == 'ok' for s in stages)} of {len(stages)} ok")
    found = numbers(out)
    for key, value in found.items():
        print(f"  {key}: {json.dumps(value)}")
    doc = {"stages": stages, "numbers": found, "ok": all(s["status"] == "ok" for s in stages)}
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
    print(f"written: {out / 'gpu_check.json'}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("imports", help="import every module the stages need")
    d = sub.add_parser("disk", help="check free disk before writing stand-ins")
    d.add_argument("dir")
    d.add_argument("bytes", type=int)
    d.add_argument("what", nargs="?", default="the stand-ins")
    b = sub.add_parser("standin-bytes", help="bytes of N stand-ins of ARCH")
    b.add_argument("arch")
    b.add_argument("n", type=int)
    g = sub.add_parser("group", help="a real process group under torchrun")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    v = sub.add_parser("vit-l14", help="ViT-L/14: published layout, stand-ins, the plan for a 24 GB card")
    v.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    v.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[128],
                   help="comma-separated batch sizes of the plain step measured (default: 128)")
    v.add_argument("--n", type=int, default=2, help="stand-ins written and loaded back (default: 2)")
    v.add_argument("--classes", type=int, default=1000, help="classes of the head (default: 1000)")
    v.add_argument("--scratch", default=None, help="where the stand-ins are written (default: the temp dir)")
    v.add_argument("--out", default=None, help="folder for vit_l14.json")
    s = sub.add_parser("summary", help="the summary table and OUT/gpu_check.json")
    s.add_argument("out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "standin-bytes":
        print(standin_bytes(args.arch, args.n))
        return 0
    return {"imports": imports, "disk": disk, "group": group, "vit-l14": vit_l14, "summary": summary}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
