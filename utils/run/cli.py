"""Flags shared by the soup scripts, their checks, and the setup every script does first
(device, data, architecture, ingredients)."""
import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from utils import archs
from utils.archs import timm_models
from utils.files import identity, ingredients, lock, mehl_state, paths, results
from utils.files.paths import check_run
from utils.files.soup_io import recipe_beside, recipe_describes
from utils.run import decoded, evaluation, precision, prefix
from utils.runtime import distributed
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

# Flags of the released launcher that this implementation accepts and ignores (torchrun sets the rank
# through the environment; DDP is always on under torchrun; the split and finetune switches had no
# effect on souping).
IGNORED_FLAGS = ("--local-rank", "--local_rank", "--ddp", "--split", "--finetune")
IGNORED_HELP = {"--split": "ignored (the released scripts' switch; the held-out split is what "
                "--heldout-per-class, --heldout-index and --split-seed say)",
                "--finetune": "ignored (the released scripts' switch; souping never fine-tunes)"}

# Also finetune.py's (it reads the fine-tune split's images too).
SKIP_BAD_IMAGES_HELP = ("drop the image files that fail the check before any work (not a regular file, "
                        "unreadable, a header that does not decode or declares over 89.5M pixels) with a "
                        "warning naming each, instead of refusing the run; the split record in the results "
                        "counts and names them (ImageNet and its shifts, ImageFolder; docs/DATA.md)")


def soup_parser(description, method):
    """The common flags. Each script adds its own on the returned parser. `method` only names the
    default --save-soup in the help; the method itself is never an argument (a script passes it)."""
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
                   f"(one of: {', '.join(sorted(archs.ARCHS) + sorted(archs.ALIASES))}; or "
                   f"timm:<name>[@<size>] (size: 1 to {timm_models.MAX_SIZE} pixels), or "
                   "package.module:factory: README, 'Your own zoo')")
    g.add_argument("--datasets", default="FashionMNIST", help="dataset name from the datasets registry")
    g.add_argument("--data-location", "--data_location", default=None,
                   help="root folder of the data; default: the dataset's standard place")
    g.add_argument("--heldout-per-class", type=int, default=None,
                   help="held-out images per class drawn from train (default: the dataset's)")
    g.add_argument("--heldout-index", default=None,
                   help="0/1 .npy file (numpy.save) over the sorted train set, 1 = held-out (docs/DATA.md)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the drawn held-out split")
    g.add_argument("--skip-bad-images", action="store_true", help=SKIP_BAD_IMAGES_HELP)
    g.add_argument("--test-size", type=int, default=None,
                   help="evaluate on this many test (and per-shift) images only (CPU runs); default: all")
    g.add_argument("--no-shifts", action="store_true",
                   help="evaluate the soup on held-out and test only, not on the shift sets (quicker "
                   "sweeps; individual ingredients are always evaluated on every set)")
    g.add_argument("--exclude-top", type=int, default=0,
                   help="drop the k ingredients with the best held-out accuracy before souping")
    g = p.add_argument_group("running")
    g.add_argument("--batch-size", "--batch_size", type=int, default=128, help="data batch size")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--device", default="auto", type=distributed.parse_device,
                   help="where to compute: auto (CUDA when available), cpu, cuda or cuda:N (GPU N; under "
                   "torchrun each rank takes the GPU of its LOCAL_RANK)")
    g.add_argument("--prefix-cache", default=None,
                   help="folder where the outputs of a frozen prefix shared by every ingredient (the default "
                   "zoo's) are kept between runs, checked before use (utils/run/prefix.py); default "
                   "$MODEL_SOUPS_CACHE/prefix, else $XDG_CACHE_HOME/model_soups/prefix or ~/.cache/model_soups/prefix; "
                   "'none' to compute them "
                   "in every run. Safe to delete at any time")
    g.add_argument("--decode-cache", default=None,
                   help="where image files read more than once (ImageNet, ImageFolder) are kept decoded at the "
                   "model's input size, as uint8, checked before use (utils/run/decoded.py): a folder (memory-"
                   "mapped, shared by later runs and by the ranks on one host; default $MODEL_SOUPS_CACHE/decoded, "
                   "else $XDG_CACHE_HOME/model_soups/decoded or ~/.cache/model_soups/decoded), 'memory' (this "
                   "process only), or 'none' (decode in every pass). Changes no number; safe to delete at any time")
    g.add_argument("--tf32", action="store_true",
                   help="let CUDA matmuls and convolutions use TF32 tensor cores (Ampere and later): faster, "
                   "about 10 bits of mantissa in the products. Off by default, as released. Changes the "
                   "numbers, so it defines the run (utils/run/precision.py)")
    g.add_argument("--precision", choices=precision.PRECISIONS, default=precision.DEFAULT,
                   help="the model's forward/backward in learning and in every evaluation: fp32 (as released) "
                   "or amp_bf16 (bfloat16 autocast; logits, loss, soup and coefficients stay float32). "
                   "Changes the numbers (utils/run/precision.py)")
    g = p.add_argument_group("outputs")
    g.add_argument("--results-db", "--results_db", default="runs/results.jsonl",
                   help="JSON-lines results file, appended to (never truncated)")
    g.add_argument("--save-soup", "--save_soup", default=None,
                   help=f"where to write the soup (.pt or .safetensors); default runs/{method}.pt; "
                   "'none' to skip")
    g.add_argument("--overwrite", action="store_true", help="replace an existing soup file")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline unless "
                   "configured)")
    g = p.add_argument_group("ignored", "flags of the released launcher, accepted so that its commands "
                             "run, and ignored")
    for flag in IGNORED_FLAGS:
        g.add_argument(flag, nargs="?", const=True, default=None,
                       help=IGNORED_HELP.get(flag, argparse.SUPPRESS))
    return p


def check_args(args):
    """Range checks of the common flags (a UserError names the flag), and of the distributed environment
    (utils.runtime.distributed.environment: a bad variable is one line before anything is read)."""
    distributed.environment()
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
    check_learning(args)
    for attr, flag in SEED_FLAGS:
        if getattr(args, attr, None) is not None:
            check_seed(flag, getattr(args, attr))


def check_learning(args):
    """The flags of the scripts that learn coefficients (MEHL-Soup, Learned-Soup), checked where a script
    has them: --lr, --wd, --layer-size, --memory-limit."""
    lr, wd = getattr(args, "lr", None), getattr(args, "wd", None)
    if lr is not None and not 0 < lr < math.inf:
        raise UserError(f"--lr must be a finite number > 0, got {lr}")
    if wd is not None and not 0 <= wd < math.inf:
        raise UserError(f"--wd must be a finite number >= 0, got {wd}")
    if lr is not None and lr > LR_MAX:  # float32 coefficients: Adam's first step is lr / 0.1
        raise UserError(f"--lr must be at most {LR_MAX:.6g} (a tenth of the largest float32), got {lr:g}")
    if lr is not None and wd is not None and lr * wd > LR_MAX:
        raise UserError(f"--lr times --wd must be at most {LR_MAX:.6g}, got {lr:g} x {wd:g}")
    layer_size, limit = getattr(args, "layer_size", None), getattr(args, "memory_limit", None)
    if layer_size is not None and layer_size < 0:
        raise UserError(f"--layer-size must be >= 0, got {layer_size}")
    if limit is not None and not 0 < limit < math.inf:
        raise UserError(f"--memory-limit must be a finite number of GiB > 0, got {limit}")
    if limit is not None and limit > MEMORY_LIMIT_MAX:
        raise UserError(f"--memory-limit must be at most {MEMORY_LIMIT_MAX:.0f} GiB (an exbibyte), got {limit:g}")


# Every seed a script takes ends in a torch.Generator (or numpy's, which takes any integer >= 0).
SEED_FLAGS = (("split_seed", "--split-seed"), ("randomseed", "--randomseed"), ("seed", "--seed"))
SEED_MAX = 2**64 - 1
LR_MAX = 3.4028234663852886e37  # torch.finfo(torch.float32).max / 10
MEMORY_LIMIT_MAX = 2.0**30  # GiB: an exbibyte, far above any machine, far below what bytes overflow at


def check_number(flag, value, low=None, high=None, *, above=None):
    """A flag's number is finite and within bounds (`low` <= value <= `high`, value > `above`); else
    a UserError naming the flag. For the scripts' own flags (benchmarks, paper_scale, finetune)."""
    ok = value is not None and math.isfinite(value) and (low is None or value >= low) \
        and (high is None or value <= high) and (above is None or value > above)
    if not ok:
        bounds = [f"> {above:g}" if above is not None else None, f">= {low:g}" if low is not None else None,
                  f"<= {high:g}" if high is not None else None]
        kind = "a whole number" if isinstance(value, int) else "a finite number"
        said = " and ".join(b for b in bounds if b)
        raise UserError(f"{flag} must be {kind}{' ' + said if said else ''}, got {value}")
    return value


def check_seed(flag, value):
    """A seed must be what torch.Generator.manual_seed takes and numpy accepts: 0 ... 2**64 - 1."""
    if not 0 <= value <= SEED_MAX:
        raise UserError(f"{flag} must be an integer in [0, 2**64 - 1] (what torch.Generator takes), "
                        f"got {value}")


def check_writable(args, methods, kind=True):
    """Fail before any work when an output cannot be written where asked (utils.files.paths.check_writable:
    the soup of each method in `methods`, its sidecars and temporary names, MEHL's state, the results
    file), and (`kind`) when the results file is another kind of file (utils.files.results.check_appendable;
    a caller that learns the data set's standard place later checks that first, for the clearer message)."""
    soups, states = run_targets(args, methods)
    paths.check_writable(paths.run_outputs(soups, states, args.results_db))
    if kind:
        results.check_appendable(args.results_db)


def run_targets(args, methods):
    """({soup path: the flag it came from}, {MEHL state path: whether --resume named it}) of a run that
    may learn any of `methods`: an explicit --save-soup is one path for every method."""
    soups, states = {}, {}
    for method in methods:
        soup = soup_target(args, method)
        if soup is not None:
            soups[soup] = "--save-soup" if args.save_soup else f"the default --save-soup of {method}"
        if hasattr(args, "resume"):  # MEHL: its state, --resume's file or the one beside the soup
            states[mehl_state.path_of(args.resume, soup, method)] = isinstance(args.resume, str)
    return soups, states


def check_paths(args, methods, standard=None):
    """No output of the run is an input or another output (utils.files.paths), checked before anything
    is read or written, and again with `standard`, the folder the data set was read from, when no
    --data-location named it. `methods`: MEHL's soup path follows the method it learns, so both are
    checked."""
    soups, states = run_targets(args, methods)
    check_run(soups, states, args.results_db, args.model_location, args.data_location,
              args.heldout_index, standard)


def check_data_place(args, methods, setup):
    """`check_paths` again once the data set is read, against the folder it was read from, when no
    --data-location named it (the data set's standard place)."""
    if args.data_location is None and setup.bundle.split.get("folder"):
        check_paths(args, methods, standard=setup.bundle.split["folder"])


def soup_target(args, method):
    """Where the soup of `method` goes (a Path: --save-soup, default runs/<method>.pt), or None for
    --save-soup none. No checks."""
    if args.save_soup is not None and args.save_soup.lower() == "none":
        return None
    return Path(args.save_soup or f"runs/{method}.pt")


@dataclass(frozen=True)
class Output:
    """Where a run writes its soup, decided once before work starts."""
    path: object = None       # the soup's path (None: --save-soup none)
    replace: bool = False     # whether an existing file there may be replaced


def soup_output(args, method, resumed=None):
    """The soup's Output: its path (None when 'none') and whether an existing file there may be
    replaced. An existing file is refused before work starts unless --overwrite, a resumed run
    (`resumed`: its own state produced the soup; None: not known yet, --resume may still find a state)
    or it is the leftover of an interrupted run of this same command: its recipe records the same
    arguments and this file's sha256, and no results line does (a finished run was returned by
    `finished`)."""
    path = soup_target(args, method)
    if path is None:
        return Output()
    if path.suffix not in (".pt", ".pth", ".safetensors"):
        raise UserError(f"--save-soup {path}: use a .pt or .safetensors file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"--save-soup {path}: {path.parent} is a file, not a folder")
    if not path.exists():
        return Output(path, False)
    if args.overwrite or (getattr(args, "resume", False) if resumed is None else resumed):
        return Output(path, True)
    recipe = recipe_beside(path)
    same = (recipe is not None and isinstance(recipe.get("args"), dict)
            and run_key(recipe["args"]) == run_key(vars(args)))
    if same and recipe_describes(recipe, path):
        log.warning("%s was left by an interrupted run of this same command (its recipe records the "
                    "same arguments, the results file no line): making it again", path)
        return Output(path, True)
    hint = (" (its recipe records this command but not this soup file's sha256: a run may have been "
            "interrupted while replacing it)") if same else ""
    raise UserError(f"--save-soup {path} exists: refusing to overwrite it (pass --overwrite or "
                    f"another path){hint}")


# ------------------------------------------------------------------------- finished and leftovers
# The one list of what defines a run: every argument defines it but these, which change neither the
# soup nor its scores (how fast, where it is logged or written, whether it may replace or continue, and
# the released launcher's ignored flags). Used by the rerun check (`run_key`: the same command already
# finished) and by MEHL's --resume state (a state made with other defining values is refused). Where the
# soup is written is compared on its own (a results line's soup_file), so a state or soup may be moved.
NOT_DEFINING = ("overwrite", "resume", "stop_after_groups", "wandb", "workers", "no_epoch_test",
                "results_db", "save_soup", "memory_check", "memory_limit", "method", "prefix_cache", "decode_cache",
                "local_rank", "local-rank", "ddp", "split", "finetune")


# Defining flags added later, at the value that gives what runs made before them gave: left out of the
# key at that value, so those runs' lines and states still match.
ADDED_DEFAULTS = {"precision": precision.DEFAULT, "tf32": False}


def run_key(args_dict):
    """The defining arguments of a run (from `vars(args)` or a results line's "args"), JSON-normalised.
    A value a script resolved (MEHL's --model_batch auto becomes a K) is keyed as the user gave it
    (`requested`), so that rerunning the same command finds its line."""
    key = {k: v for k, v in args_dict.items()
           if k not in NOT_DEFINING and not (k in ADDED_DEFAULTS and v == ADDED_DEFAULTS[k])}
    key.update(key.pop("requested", None) or {})
    return json.loads(json.dumps(key, default=str))


def finished(args, methods):
    """The results line of an earlier run of this same command that finished (same method, defining
    arguments and ingredient files, and its soup file still there), or None. The results line is a
    run's last write, so a line means the run is complete: a rerun returns it instead of redoing the work
    and appending a duplicate (docs/GUARANTEES.md, "Runs are resumable"). --overwrite always runs
    again."""
    record = None
    if not args.overwrite:
        distributed.setup(args.device)  # idempotent; prepare() reuses the process group
        if distributed.is_primary():
            record = _find_finished(args, methods)
        record = distributed.broadcast_object(record)
    if record is not None and distributed.is_primary():
        log.info("this run already finished (%s, line of %s in %s): nothing to do; pass --overwrite "
                 "to run it again", record.get("method"), record.get("time"), args.results_db)
    return record


def _find_finished(args, methods):
    try:
        records = results.read(args.results_db)
    except (OSError, ValueError):
        return None  # prepare() reports an unusable results file
    candidates = [r for r in records
                  if r.get("method") in methods and isinstance(r.get("args"), dict)
                  and "range_fingerprints" in r]
    if not candidates:
        return None
    key = run_key(vars(args))
    try:
        paths = ingredients.ingredient_paths(args.model_location, args.params_start, args.params_end)
        prints = [identity.stamp(p) for p in paths]
    except UserError:
        return None  # prepare() reports it
    for r in reversed(candidates):
        if run_key(r["args"]) == key and r["range_fingerprints"] == prints:
            target = soup_target(args, r["method"])
            soup = r.get("soup_file")
            if soup == (None if target is None else str(target)) and (soup is None or Path(soup).is_file()):
                return r
    return None


@dataclass
class Setup:
    """What a run uses, decided at its start: the objects, and the values of the arguments that library
    code needs (the argparse namespace stops here)."""
    device: object
    spec: archs.ArchSpec
    bundle: object
    model: object
    reference: dict           # the architecture's state dict (names, shapes, dtypes)
    paths: list               # ingredient paths of the range
    started: float
    arguments: dict           # every argument, as a results line and a recipe record them
    results_db: Path
    dataset: str              # --datasets as given
    arch: str                 # --arch as given
    model_location: str       # resolved
    batch_size: int
    workers: int
    precision: str
    test_size: object         # --test-size (None: all)


def recorded(args):
    """The arguments as a results line and a recipe record them."""
    return {k: v for k, v in vars(args).items() if k not in ("local_rank", "local-rank")}


def prepare(args, method=None, check_ingredients=True, *, data):
    """Device, data, model and ingredient paths; every check that can fail fails here, before work.
    `method` names the default soup path whose folder is checked (None: MEHL, before its blocks).
    `data` builds the data set from its name, root, the arch's preprocessing and options: the
    `datasets` package's `build_dataset`, which the recipe scripts pass in (utils never imports the
    data sets)."""
    started = time.time()
    check_args(args)
    check_writable(args, (method or "soup",), kind=False)  # the kind: once the data's place is known
    device = distributed.setup(args.device)
    precision.use_tf32(args.tf32)
    prefix.configure(prefix_folder(args.prefix_cache))
    decoded.configure(args.decode_cache)
    spec = archs.get_arch(args.arch)
    paths = ingredients.ingredient_paths(args.model_location, args.params_start, args.params_end)
    bundle = data(args.datasets, args.data_location, spec.preprocess, heldout_per_class=args.heldout_per_class,
                  heldout_index=args.heldout_index, seed=args.split_seed, test_size=args.test_size,
                  skip_bad_images=args.skip_bad_images)
    if len(bundle.heldout) == 0:
        raise UserError(f"the held-out split of {args.datasets} is empty")
    model = spec.build(bundle.num_classes, pretrained=False)
    if distributed.is_primary():
        precision.warn_if_slow(args.precision, device)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if check_ingredients:
        ingredients.preflight(paths, reference)
    return Setup(device, spec, bundle, model.to(device), reference, paths, started, recorded(args),
                 Path(args.results_db), args.datasets, args.arch, str(Path(args.model_location).resolve()),
                 args.batch_size, args.workers, args.precision, args.test_size)


def prefix_folder(flag):
    """--prefix-cache as a folder, or None for 'none'."""
    if flag is None:
        return prefix.default_folder()
    if not flag.strip():  # Path("") is the working folder: files would land wherever the run starts
        raise UserError("--prefix-cache: give a folder, or 'none' to keep no files")
    return None if flag.lower() == "none" else Path(flag)


def lock_output(*paths):
    """Hold an exclusive lock on each output path (not None) for the rest of the run: a second run
    writing the same soup (or MEHL state) is refused, naming the process that holds it. `end` releases
    them; a run that stops on an error keeps them until its process exits (the kernel releases them)."""
    for path in paths:
        if path is not None:
            lock.acquire(path)


def begin(args, method, methods=None, *, data):
    """The start every soup script shares. Returns (finished_line, setup, output): `finished_line` is the
    results line of this same command when it already finished (nothing else is done then), else None, with
    `setup` after every check that can fail (data, model, the ingredients, --exclude-top) and `output`,
    the soup's Output, locked for the run. `method` None: the method is known only later (MEHL counts
    its blocks, `methods` lists the candidates); an explicit --save-soup is checked and locked now, and
    `output` is None: the script decides it with `soup_output` once it knows the method. `data`: see
    `prepare`."""
    from utils.run import individual
    from utils.runtime import memory
    check_args(args)
    check_paths(args, methods or (method,))  # first: nothing is read or written before it
    finished_line = finished(args, methods or (method,))
    if finished_line is not None:
        end()
        return finished_line, None, None
    # before the locks, the data and any work; the results file's kind once no input is it (clearer): now
    # when --data-location named the data, else once the data set's standard place is known
    check_writable(args, methods or (method,), kind=args.data_location is not None)
    output = None
    if method is not None:
        output = soup_output(args, method)
        lock_output(output.path)  # before any write; a run holding it is refused here
    elif args.save_soup is not None:
        lock_output(soup_output(args, None).path)
    setup = prepare(args, method, data=data)
    check_data_place(args, methods or (method,), setup)
    if args.data_location is None:
        results.check_appendable(args.results_db)
    individual.check_exclude_top(setup, args.exclude_top)
    memory.reset_peak(setup.device)
    return None, setup, output


def end():
    """The end of every soup run: end its data loaders' workers, release its output locks and leave the
    process group."""
    evaluation.close_loaders()
    lock.release_all()
    distributed.teardown()
