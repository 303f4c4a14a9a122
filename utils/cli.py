"""Flags shared by the soup scripts, their checks, and the setup every script does first
(device, data, architecture, ingredients)."""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from utils import archs, distributed, ingredients
from utils.errors import UserError

# Flags of the released launcher that this implementation accepts and ignores (torchrun sets the rank
# through the environment; DDP is always on under torchrun; the split and finetune switches had no
# effect on souping).
IGNORED_FLAGS = ("--local-rank", "--local_rank", "--ddp", "--split", "--finetune")


def soup_parser(description, method):
    """The common flags. Each script adds its own on the returned parser."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("ingredients and data")
    g.add_argument("--model-location", "--model_location", default="zoo/fashion_mnist",
                   help="folder holding the ingredients model_{i}.pt (or .safetensors)")
    g.add_argument("--params_start", "--params-start", type=int, default=0,
                   help="first ingredient index (inclusive)")
    g.add_argument("--params_end", "--params-end", type=int, default=None,
                   help="last ingredient index (exclusive); default: up to the last one present")
    g.add_argument("--arch", default="efficientnet-lite0", help="architecture of the ingredients "
                   f"(one of: {', '.join(sorted(archs.ARCHS) + sorted(archs.ALIASES))})")
    g.add_argument("--datasets", default="FashionMNIST", help="dataset name from the datasets registry")
    g.add_argument("--data-location", "--data_location", default=None,
                   help="root folder of the data; default: the dataset's standard place")
    g.add_argument("--heldout-per-class", type=int, default=None,
                   help="held-out images per class drawn from train (default: the dataset's)")
    g.add_argument("--heldout-index", default=None,
                   help="0/1 numpy index file over the sorted train set selecting the held-out split")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the drawn held-out split")
    g.add_argument("--test-size", type=int, default=None,
                   help="evaluate on this many test (and per-shift) images only (CPU runs); default: all")
    g.add_argument("--exclude-top", type=int, default=0,
                   help="drop the k ingredients with the best held-out accuracy before souping")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", "--batch_size", type=int, default=128, help="data batch size")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute; auto = CUDA when available")
    g = p.add_argument_group("outputs")
    g.add_argument("--results-db", "--results_db", default="runs/results.jsonl",
                   help="JSON-lines results file, appended to (never truncated)")
    g.add_argument("--save-soup", "--save_soup", default=None,
                   help=f"where to write the soup (.pt or .safetensors); default runs/{method}.pt; "
                   "'none' to skip")
    g.add_argument("--overwrite", action="store_true", help="replace an existing soup file")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline unless "
                   "configured)")
    for flag in IGNORED_FLAGS:
        p.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    p.set_defaults(method=method)
    return p


def check_args(args):
    """Range checks of the common flags (a UserError names the flag)."""
    positive = {"batch_size": "--batch-size"}
    for attr, flag in positive.items():
        if getattr(args, attr) < 1:
            raise UserError(f"{flag} must be >= 1, got {getattr(args, attr)}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.exclude_top < 0:
        raise UserError(f"--exclude-top must be >= 0, got {args.exclude_top}")
    if args.test_size is not None and args.test_size < 1:
        raise UserError(f"--test-size must be >= 1, got {args.test_size}")
    if args.heldout_per_class is not None and args.heldout_per_class < 1:
        raise UserError(f"--heldout-per-class must be >= 1, got {args.heldout_per_class}")
    if args.params_end is not None and args.params_end <= args.params_start:
        raise UserError(f"--params_start {args.params_start} must be < --params_end {args.params_end}")


def soup_path(args):
    """The soup's output path (None when 'none'); an existing file is refused now, before work starts,
    unless --overwrite (or --resume, whose own state decides)."""
    if args.save_soup is not None and args.save_soup.lower() == "none":
        return None
    path = Path(args.save_soup or f"runs/{args.method}.pt")
    if path.suffix not in (".pt", ".pth", ".safetensors"):
        raise UserError(f"--save-soup {path}: use a .pt or .safetensors file name")
    if path.exists() and not args.overwrite and not getattr(args, "resume", False):
        raise UserError(f"--save-soup {path} exists: refusing to overwrite it (pass --overwrite or "
                        "another path)")
    return path


@dataclass
class Setup:
    device: object
    spec: archs.ArchSpec
    bundle: object
    model: object
    reference: dict           # the architecture's state dict (names, shapes, dtypes)
    paths: list               # ingredient paths of the range
    started: float


def prepare(args, check_ingredients=True):
    """Device, data, model and ingredient paths; every check that can fail fails here, before work."""
    from datasets import build_dataset
    started = time.time()
    check_args(args)
    device = distributed.setup(args.device)
    spec = archs.get_arch(args.arch)
    paths = ingredients.ingredient_paths(args.model_location, args.params_start, args.params_end)
    bundle = build_dataset(args.datasets, args.data_location, spec.preprocess,
                           heldout_per_class=args.heldout_per_class, heldout_index=args.heldout_index,
                           seed=args.split_seed, test_size=args.test_size)
    if len(bundle.heldout) == 0:
        raise UserError(f"the held-out split of {args.datasets} is empty")
    model = spec.build(bundle.num_classes, pretrained=False)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if check_ingredients:
        ingredients.preflight(paths, reference)
    return Setup(device, spec, bundle, model.to(device), reference, paths, started)


def record_args(args):
    """The arguments as they go into a results line."""
    return {k: v for k, v in vars(args).items() if k not in ("local_rank", "local-rank")}


def result_record(args, setup, paths, scores, **extra):
    """One results line: method, ingredients, held-out / test / shifts, seconds, peak memory, arguments."""
    from utils import memory
    return {
        "method": args.method,
        "dataset": args.datasets,
        "arch": args.arch,
        "ingredients": [ingredients.index_of(p) for p in paths],
        "model_location": str(Path(args.model_location).resolve()),
        **scores,
        "split": setup.bundle.split,
        "seconds": round(time.time() - setup.started, 2),
        "peak_memory_bytes": memory.peak_bytes(setup.device),
        "device": str(setup.device),
        "world_size": distributed.world_size(),
        **extra,
        "args": record_args(args),
    }
