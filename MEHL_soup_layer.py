"""MEHL-Soup and MEHL-Soup+: soup coefficients learned on the held-out split, on the hyperplane (affine
hull) of the ingredients, K ingredients at a time.

For each models-epoch the ingredients are shuffled (seed --randomseed) and cut into groups of at most
K = --model_batch. The first group's center is its mean; every later group starts from the current
soup. Per block b (--layer-size) each ingredient i of the group gives a unit direction
P[i, b] = (theta_i,b - center_b) / ||theta_i,b - center_b||, and coefficients X (zeros, fresh per group)
are learned with soup_b = center_b + sum_i X[i, b] P[i, b]: one model is in the autograd graph, its
gradient g is projected, dX[i, b] = <P[i, b], g_b> (the step: `utils/run/mehl.py`; the math:
`utils/soup/hyperplane.py`). The implied coefficients over all ingredients (alpha, blocks x ingredients, rows
summing to 1, negative values allowed) are tracked exactly and saved. --layer-size 0 (default) gives one
block per parameter tensor: MEHL-Soup+; a layer size at least the model's size gives one block:
MEHL-Soup. The method name in the results follows the block count.

Parameters identical in every ingredient (CLIP's text leftovers) are kept as they are and left out of
the problem. BatchNorm statistics identical in every ingredient are kept and those layers run in eval
mode while learning; when they differ, learning uses batch statistics and the final soup's statistics
are re-estimated on the held-out split (README, "Rules that decide what a soup is").

Memory: the model's parameters are the soup and their gradients one flat vector, and the soup is its
own center (no copy is kept), so a step holds K ingredients' learned parameters more than a plain
forward/backward that keeps its gradient as one vector (K + 1 on a GPU, where a plain step peaks before
its gradients exist), plus the checkpoint being read while a row loads (`utils/run/mehl.py` lists every
tensor; the plan printed before learning predicts the peak).
--directions-dtype bfloat16 stores the rows in half the memory.

    python MEHL_soup_layer.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 \\
        --model_batch 4 --epochs 5 --cosine-lr
    torchrun --nproc_per_node=2 MEHL_soup_layer.py --model-location zoo/fashion_mnist \\
        --arch efficientnet-lite0 --model_batch 4 --epochs 5 --cosine-lr

Expect (as in the paper) a soup whose held-out accuracy is above the uniform soup's and usually above
the best ingredient's, with a test accuracy near or above the greedy soup's; the test accuracy after
each inner epoch is logged (never used to choose anything). The results line holds the alpha summary
(negative coefficients, largest, effective number of ingredients); `<soup>.alpha.json` holds alpha.
Under torchrun every rank holds only its contiguous share of each group (memory ~ K / world
ingredients + one model per process), each global data batch is split over the ranks, and the same
seed gives the same soup as one process (up to float rounding).

After every group the state (soup, alpha, position in the order, generator states, the arguments that
define the result) is written atomically to --resume's file (default: `<soup>.state.pt`); rerun with
--resume to continue an interrupted run, which ends with the same soup as an uninterrupted one. The
state file is kept after success (it also records the finished run); a new run over it needs
--resume or --overwrite.
"""
import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate
from tqdm import tqdm

import datasets
from utils.files import mehl_state, soup_io
from utils.files.ingredients import index_of
from utils.files.soup_io import sidecar
from utils.files.state_dicts import atomic_write
from utils.run import cli, individual, inputs, mehl, outputs, plan
from utils.run.batchnorm import batchnorm_statistics, check_batch_statistics, reestimate, rule, set_mode
from utils.run.evaluation import evaluate_all
from utils.run.layout import Layout, make_layout, state_buffers
from utils.run.precision import DEFAULT as DEFAULT_PRECISION
from utils.runtime import distributed
from utils.runtime.errors import UserError, run_main
from utils.runtime.memory import reset_peak
from utils.soup import hyperplane, sampling, segmented
from utils.soup.schedules import constant, cosine_with_warmup

log = logging.getLogger("MEHL_soup")
STATE_VERSION = 1
METHODS = ("MEHL-Soup", "MEHL-Soup+")
UNDERSCORE_FLAGS = ("params_start", "params_end", "model_batch", "models_epochs")


def parse_args(argv=None):
    p = cli.soup_parser("MEHL-Soup / MEHL-Soup+: hyperplane soup coefficients learned by gradient "
                        "projection, K ingredients at a time.", "MEHL-Soup+")
    g = p.add_argument_group("MEHL-Soup")
    g.add_argument("--lr", type=float, default=0.01, help="learning rate of the coefficients X")
    g.add_argument("--wd", type=float, default=0.0, help="weight decay of the coefficients X")
    g.add_argument("--epochs", type=int, default=5,
                   help="epochs over the held-out split for each group of ingredients")
    g.add_argument("--cosine-lr", "--cosine_lr", action="store_true",
                   help="cosine learning rate with linear warm-up over the first 20%% of each group's "
                   "steps (default: constant)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="optimizer of X, fresh for each group (sgd: momentum 0.9)")
    g.add_argument("--randomseed", type=int, default=1,
                   help="seed of the ingredient order and of the held-out order")
    g.add_argument("--model_batch", "--model-batch", type=model_batch_value, default=18,
                   help="K: ingredients per group (memory ~ K / world size ingredients per process); "
                   "larger than the range means one group. 'auto': the largest K whose predicted peak "
                   "fits the device (or --memory-limit); the plan is printed before learning either way")
    g.add_argument("--memory-limit", type=float, default=None,
                   help="GiB this process may peak at, for the plan and --model_batch auto (a shared "
                   "device); default: the device's free memory (CPU: MemAvailable)")
    g.add_argument("--models_epochs", "--models-epochs", type=int, default=1,
                   help="passes over the reshuffled ingredients")
    g.add_argument("--layer-size", "--layer_size", type=int, default=0,
                   help="block size S: 0 = one block per parameter tensor (MEHL-Soup+); at least the "
                   "model's size = one block (MEHL-Soup)")
    g.add_argument("--labelsmooth", type=float, default=0.0, help="label smoothing of the cross-entropy")
    g.add_argument("--directions-dtype", "--directions_dtype", choices=sorted(mehl.DTYPES),
                   default="float32", help="storage of the K rows of directions: bfloat16 / float16 "
                   "halve their memory (products still accumulate in float32; the soup and gradient "
                   "stay float32)")
    g.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the state file (PATH, or <soup>.state.pt when given without "
                   "one); a missing file starts from the beginning")
    g.add_argument("--stop-after-groups", type=int, default=None,
                   help="stop after this many groups in this process, state saved and no soup written "
                   "(time-sliced jobs; tests of --resume)")
    g.add_argument("--no-epoch-test", action="store_true",
                   help="skip the test accuracy logged after each inner epoch (logged only, never used)")
    return p.parse_args(argv)


def model_batch_value(text):
    """--model_batch: a whole number, or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a whole number or 'auto', got {text!r}") from None


def check_args(args):
    """MEHL's own flags (--lr, --wd, --layer-size and --memory-limit: `cli.check_learning`, with the
    shared ones)."""
    if args.model_batch != "auto" and args.model_batch < 1:
        raise UserError(f"--model_batch must be >= 1, got {args.model_batch}")
    for flag, value in (("--epochs", args.epochs), ("--models_epochs", args.models_epochs)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.labelsmooth < 1:
        raise UserError(f"--labelsmooth must be in [0, 1), got {args.labelsmooth}")
    if args.stop_after_groups is not None and args.stop_after_groups < 1:
        raise UserError(f"--stop-after-groups must be >= 1, got {args.stop_after_groups}")


# ------------------------------------------------------------------------------------- state
def method_of(layout):
    """MEHL-Soup with one block (model-wise), MEHL-Soup+ with more."""
    return METHODS[0] if layout.num_blocks == 1 else METHODS[1]


def config_of(args, paths):
    """The arguments that define the run (`cli.run_key`, as for reruns) and its ingredients: a --resume
    state made with other values is refused."""
    cfg = cli.run_key(vars(args))
    cfg["model_location"] = str(Path(args.model_location).resolve())
    cfg["ingredients"] = [index_of(p) for p in paths]
    return cfg


def flag_of(key):
    return "--" + (key if key in UNDERSCORE_FLAGS else key.replace("_", "-"))


def state_file(args, method):
    """--resume's file when it names one, else `<soup>.state.pt` (runs/<method>.state.pt without a soup)."""
    if isinstance(args.resume, str):
        return Path(args.resume)
    return sidecar(cli.soup_target(args, method) or Path(f"runs/{method}.pt"), "state")


def load_state(path, args, config):
    """The saved state when --resume names an existing file (checked against `config`), else None.
    Without --resume an existing state file is refused unless --overwrite."""
    exists = path.is_file()
    distributed.agree(exists == distributed.broadcast_object(exists),
                      f"{path}: the state file is not visible to every rank (use a shared folder)")
    if not args.resume:
        if exists and not args.overwrite:
            raise UserError(f"{path} holds the state of an earlier run: pass --resume to continue it "
                            "or --overwrite to start again")
        return None
    if not exists:
        log.info("--resume: %s does not exist yet; starting from the beginning", path)
        return None
    state = mehl_state.read(path)
    saved = state.get("config") if isinstance(state, dict) else None
    saved = saved.get("precision", DEFAULT_PRECISION) if isinstance(saved, dict) else args.precision
    if saved != args.precision:  # the config leaves fp32 out (cli.ADDED_DEFAULTS): compared both ways here
        raise UserError(f"--resume {path} was made with another configuration: --precision {saved!r} in the "
                        f"state, {args.precision!r} now")
    config_saved = state.get("config") if isinstance(state, dict) else None
    made = config_saved.get("tf32", False) if isinstance(config_saved, dict) else args.tf32
    if made != args.tf32:  # left out of the config when off (cli.ADDED_DEFAULTS): compared both ways here
        raise UserError(f"--resume {path} was made with another configuration: --tf32 {made!r} in the "
                        f"state, {args.tf32!r} now")
    mehl_state.check_header(state, path, config, flag_of)
    return state



def save_state(path, state):
    if distributed.is_primary():
        atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


# ---------------------------------------------------------------------------------- learning
@dataclass
class Run:
    """What every group of one run uses, fixed at its start."""
    args: object
    method: str               # MEHL-Soup or MEHL-Soup+ (`method_of` the layout)
    setup: cli.Setup
    output: cli.Output        # where the soup goes
    layout: Layout
    paths: list
    soup: mehl.FlatSoup       # the model's learned parameters, as one flat vector
    state_path: Path
    config: dict
    wandb: object
    loader: sampling.RankLoader = None  # the held-out batches of every epoch of the run (one DataLoader)
    block_products: str = None  # the path of the block products, from the first group's self-check


@dataclass
class Progress:
    """Where a run stands: the --resume state, saved after every group."""
    models_epoch: int = 0
    next_group: int = 0
    order: list = None        # this models-epoch's ingredient order (None: not drawn yet)
    alpha: torch.Tensor = None  # B x N coefficients of the soup (None: before the first group)
    groups: list = field(default_factory=list)
    seconds: float = 0.0
    models_rng: torch.Generator = None
    data_rng: torch.Generator = None

    @classmethod
    def start(cls, seed, state=None):
        p = cls(models_rng=sampling.models_generator(seed), data_rng=sampling.data_generator(seed))
        if state is not None:
            p.models_epoch, p.next_group, p.order = state["models_epoch"], state["next_group"], state["order"]
            p.alpha, p.groups, p.seconds = state["alpha"], state["groups"], state["seconds"]
            p.models_rng.set_state(state["models_rng"])
            p.data_rng.set_state(state["data_rng"])
        return p

    def state(self, config, soup):
        return {"version": STATE_VERSION, "config": config, "models_epoch": self.models_epoch,
                "next_group": self.next_group, "order": self.order, "soup": soup.cpu(),
                "alpha": self.alpha, "models_rng": self.models_rng.get_state(),
                "data_rng": self.data_rng.get_state(), "groups": self.groups, "seconds": self.seconds}


def make_optimizer(args, X):
    if args.optimizer == "sgd":
        return torch.optim.SGD([X], lr=args.lr, momentum=0.9, weight_decay=args.wd)
    return torch.optim.AdamW([X], lr=args.lr, weight_decay=args.wd)


def learn_group(run, group, progress):
    """Learn X for one group from the current soup (the model's parameters); the soup is updated in
    place. Returns the new alpha (B x N) and the group's log."""
    args, setup, layout = run.args, run.setup, run.layout
    B, N = layout.num_blocks, len(run.paths)
    first = progress.alpha is None
    # this rank's ingredients of the group (all of them on one process)
    my_rows = sampling.my_share(group, distributed.world_size(), distributed.rank())
    # the soup is the group's center: for the first group its mean is written into the soup here
    center, P, inv_norms = mehl.directions(run.paths, my_rows, len(group), layout, setup.reference, run.soup,
                                           mehl.DTYPES[args.directions_dtype], first)
    if run.block_products is None:  # the first group of this process: the fast path against the loop
        run.block_products = mehl.check_fast_path(P, layout.bounds, run.soup.theta, run.soup.grad)
    alpha_center = hyperplane.mean_alpha(group, N, B) if first else progress.alpha
    X = torch.zeros(len(my_rows), B, dtype=run.soup.theta.dtype, device=setup.device, requires_grad=True)
    per_epoch = math.ceil(len(setup.bundle.heldout) / args.batch_size)
    schedule = (cosine_with_warmup(args.lr, args.epochs * per_epoch) if args.cosine_lr
                else constant(args.lr))
    state = mehl.Group(center, P, inv_norms, X, make_optimizer(args, X), schedule)
    label = len(progress.groups) + 1
    tests = []
    bar = tqdm(total=args.epochs * per_epoch, desc=f"group {label}", leave=False,
               disable=not distributed.is_primary())
    for epoch in range(args.epochs):
        set_mode(setup.model, layout.frozen_stats)
        # what runs on the held-out split: a frozen prefix that holds no learned tensor runs once, images
        # are decoded once, all in --precision (utils/run/inputs.py)
        heldout = inputs.learning(setup.model, setup.bundle.heldout, setup.device, args.batch_size, args.workers,
                                  layout.names, args.precision)
        epoch_loss, steps = 0.0, mehl.StepLog(state, label, args.lr)
        for n_global, batch in run.loader.epoch(heldout.dataset, heldout.workers):
            loss = mehl.step(heldout.forward, run.soup, state, layout.bounds, batch, n_global,
                             args.labelsmooth, clip=setup.spec.is_vit)
            steps.add(loss, n_global, schedule(state.step - 1))
            bar.update()
            if steps.due():  # losses and the non-finite flag are read every mehl.LOG_EVERY steps
                epoch_loss += steps.read(bar, run.wandb)
        epoch_loss += steps.read(bar, run.wandb)
        state.losses.append(epoch_loss / len(setup.bundle.heldout))
        if not args.no_epoch_test:  # logged only, never used to choose anything
            test = inputs.evaluation(setup.model, setup.device, args.batch_size, args.workers, args.precision)
            tests.append(evaluate_all(test, setup.bundle, setup.device, args.batch_size, heldout=False,
                                      shifts=False)["test"])
            run.wandb.log({"epoch_test": tests[-1], "epoch_loss": state.losses[-1]})
        if distributed.is_primary():
            log.info("group %d epoch %d: held-out loss %.4f%s", label, epoch + 1, state.losses[-1],
                     f", test {tests[-1]:.2f} (logged only)" if tests else "")
    bar.close()
    delta = hyperplane.alpha_delta(alpha_center, X, inv_norms, my_rows)
    alpha = alpha_center + distributed.all_reduce_sum(delta.to(setup.device)).cpu()
    products, why = mehl.products_record(run.block_products)  # this group's path (turned off since?)
    if distributed.is_distributed():  # "kernels" only where every rank ran them
        on_loop = distributed.all_reduce_sum(torch.tensor([float(products != "kernels")], device=setup.device))
        if products == "kernels" and float(on_loop) > 0:
            products, why = "loop", "another rank ran the per-block loop"
    return alpha, {"ingredients": [index_of(run.paths[i]) for i in group],
                   "heldout_loss": state.losses, "test_logged_only": tests,
                   "block_products": products, "block_products_why": why}


def products_of(groups):
    """The results line's `block_products` ("kernels" when every group's steps ran the fast path, else
    "loop") and `block_products_why` (the first group's reason for the loop), from the groups' log, which
    the resume state keeps (docs/GUARANTEES.md)."""
    paths = [g.get("block_products") for g in groups]
    if paths and all(p == "kernels" for p in paths):
        return "kernels", None
    why = next((g.get("block_products_why") for g in groups if g.get("block_products_why")), None)
    return "loop", why or "not recorded (groups learned before the path was recorded)"


def learn(run, progress):
    """The MEHL loop over models-epochs and groups, from `progress`. Returns True when every group is
    learned, False when --stop-after-groups stopped it first (the state is saved either way)."""
    args, N, K = run.args, len(run.paths), run.args.model_batch
    previous = list(range(N)) if progress.order is None else progress.order
    bar = tqdm(total=args.models_epochs * math.ceil(N / K), initial=len(progress.groups), desc="groups",
               disable=not distributed.is_primary())
    done_here, started, seconds = 0, time.time(), progress.seconds
    while progress.models_epoch < args.models_epochs:
        if progress.order is None:
            progress.order = sampling.shuffled(previous, progress.models_rng)
        groups = sampling.groups(progress.order, K)
        while progress.next_group < len(groups):
            progress.alpha, info = learn_group(run, groups[progress.next_group], progress)
            progress.groups.append({"models_epoch": progress.models_epoch,
                                    "group": progress.next_group, **info})
            progress.next_group += 1
            progress.seconds = seconds + time.time() - started
            save_state(run.state_path, progress.state(run.config, run.soup.theta))
            bar.update()
            done_here += 1
            last = progress.models_epoch == args.models_epochs - 1 and progress.next_group == len(groups)
            if args.stop_after_groups and done_here >= args.stop_after_groups and not last:
                bar.close()
                return False
        previous, progress.order, progress.next_group = progress.order, None, 0
        progress.models_epoch += 1
    bar.close()
    return True


# ---------------------------------------------------------------------------------- outputs
def finish(run, progress):
    """Re-estimate BatchNorm statistics when they differ, evaluate, and write the alpha sidecar, the
    soup with its recipe, and the results line (`outputs.write_outputs`; a kill before the line
    leaves the state file, from which --resume redoes only this)."""
    args, setup, layout = run.args, run.setup, run.layout
    reestimated = not layout.frozen_stats
    if reestimated:
        reestimate(setup.model, setup.bundle.heldout, setup.device, args.batch_size, args.workers)
    evaluated = inputs.evaluation(setup.model, setup.device, args.batch_size, args.workers, args.precision)
    scores = evaluate_all(evaluated, setup.bundle, setup.device, args.batch_size, shifts=not args.no_shifts,
                          keep=True)
    summary = hyperplane.summary(progress.alpha)
    alpha = progress.alpha.tolist()
    identical_numbers = sum(setup.reference[n].numel() for n in layout.identical)
    rows_per_rank = sampling.shard_range(min(args.model_batch, len(run.paths)), distributed.world_size(), 0)[1]
    itemsize = run.soup.theta.element_size()
    soup_sd = {k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()}
    statistics = batchnorm_statistics(setup.model, state_buffers(setup.model, floating=False)) if reestimated else []
    coefficients = soup_io.coefficients(layout, alpha, soup_sd, statistics)
    batchnorm = rule(setup.model, reestimated)
    alpha_doc = {"ingredients": [str(p) for p in run.paths], "blocks": layout.blocks, "alpha": alpha,
                 "summary": summary}
    products, why = products_of(progress.groups)
    record = outputs.write_outputs(
        setup, run.output, run.method, run.paths, scores, soup_sd, sidecars={"alpha": alpha_doc},
        coefficients=coefficients, recipe={"batchnorm": batchnorm},
        blocks=layout.num_blocks, model_batch=args.model_batch, groups=progress.groups,
        alpha_summary=summary, identical_parameters=layout.identical, identical_numbers=identical_numbers,
        identical_bytes_not_held_per_rank=identical_numbers * itemsize * (rows_per_rank + 1),
        batchnorm=batchnorm, state_file=str(run.state_path),
        learning_seconds_all_sessions=round(progress.seconds, 2), block_products=products,
        block_products_why=why)
    if distributed.is_primary():
        log.info("%s of %d (K=%d): held-out %.2f, test %.2f, shift mean %s; alpha: %d negative "
                 "(%.1f%%), max %.3f, effective ingredients %.2f", run.method, len(run.paths),
                 args.model_batch, scores["heldout"], scores["test"], scores.get("shift_mean"),
                 summary["negative"], 100 * summary["negative_fraction"], summary["max"],
                 summary["effective_ingredients"])
    run.wandb.log({f"final_{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
    return record


def start_model(model, layout, base):
    """Load the starting state dict, and make the learned parameters one flat soup vector; only they
    get gradients."""
    model.load_state_dict(base)
    learned = set(layout.names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in learned)
    return mehl.FlatSoup(model, layout.names)


def log_start(args, method, setup, layout, n):
    if not distributed.is_primary():
        return
    identical_numbers = sum(setup.reference[k].numel() for k in layout.identical)
    log.info("%s: %d ingredients, K=%d, %d block(s) over %d learned parameter tensors (%d numbers, "
             "directions in %s); %d parameter tensor(s) identical in all ingredients kept as they are "
             "(%d numbers); BatchNorm: %s", method, n, args.model_batch, layout.num_blocks,
             len(layout.names), layout.numel, args.directions_dtype, len(layout.identical), identical_numbers,
             "statistics identical, eval mode" if layout.frozen_stats else "statistics differ, "
             "train mode, re-estimated at the end")


# ------------------------------------------------------------------------------- memory plan
def chosen_k(state, path):
    """The K that --model_batch auto chose when the resumed run started (a resume continues with it)."""
    k = state["config"].get("model_batch_chosen")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"--resume {path}: its configuration records no K chosen by --model_batch auto "
                        f"(found {k!r}); start again with --overwrite")
    return k


def footprint(run, batch):
    """The run's `plan.Footprint` and the batch it measured: one plain forward/backward on the first
    `batch` held-out items (the rank's share of a batch), measured; the model's buffers (BatchNorm
    statistics that a train-mode forward updates) and the gradient are put back as they were, so the
    run is unchanged."""
    args, setup, layout, soup = run.args, run.setup, run.layout, run.soup
    saved = [b.detach().clone() for b in setup.model.buffers()]
    set_mode(setup.model, layout.frozen_stats)  # as learning: a frozen prefix stands in only in eval mode
    held = inputs.learning(setup.model, setup.bundle.heldout, setup.device, args.batch_size, args.workers,
                           layout.names, args.precision)
    items = default_collate([held.dataset[i] for i in range(min(batch, len(held.dataset)))])
    batch = len(items[1])
    before = plan.so_far(setup.device)
    peak, resident = plan.measure(
        lambda: mehl.gradient(held.forward, soup, items, args.batch_size, args.labelsmooth), setup.device)
    with torch.no_grad():
        for b, value in zip(setup.model.buffers(), saved):
            b.copy_(value)
        soup.grad.zero_()
    checkpoint = 0
    if setup.device.type == "cpu":  # read into host memory: on a GPU it is not on the device
        checkpoint = max(sum(v.numel() * v.element_size() for v in setup.reference.values()),
                         max(Path(p).stat().st_size for p in run.paths))
    dtype = mehl.DTYPES[args.directions_dtype]
    width = segmented.padded(layout.numel)  # the rows' stride (mehl.load_rows)
    return plan.Footprint(plain_peak=peak, resident=resident, row=width * dtype.itemsize,
                          soup_row=width * soup.theta.element_size(), checkpoint=checkpoint,
                          halved=dtype.itemsize < soup.theta.element_size(), so_far=before), batch


def agreed_minimum(k, n, device):
    """The smallest of every rank's `k` (in [0, n])."""
    if not distributed.is_distributed():
        return k
    votes = torch.zeros(n + 1, dtype=torch.float64, device=device)
    votes[k] = 1
    distributed.all_reduce_sum(votes)
    return int(torch.nonzero(votes)[0])


def settle_model_batch(run, resumed_k):
    """Measure the plain step, fix K and print the plan. K is --model_batch as given; with 'auto', the
    resumed state's K (a run continues with the K it started with) or the largest that fits. 'auto'
    stays what defines the run (a rerun of the same command finds its line: `cli.run_key` reads
    `args.requested`); the K chosen goes into the results line's arguments and the state."""
    args, setup = run.args, run.setup
    n, world = len(run.paths), distributed.world_size()
    batch = -(-args.batch_size // world)
    plan.prepare_allocator(setup.device)  # expandable segments on CUDA, for the measurement and the run
    fp, batch = footprint(run, batch)
    plan.release_cached(setup.device)  # the first group's rows come before the step's activations
    capacity = plan.capacity_bytes(setup.device, args.memory_limit, plan.local_world_size())
    fits = agreed_minimum(n if capacity is None else plan.largest_k(fp, capacity, n, world, setup.device.type),
                          n, setup.device)
    if args.model_batch != "auto":
        k, how = args.model_batch, "--model_batch as given"
    elif resumed_k is not None:
        k, how = resumed_k, "chosen by --model_batch auto when this run started, from its state"
    elif fits:
        k, how = fits, "--model_batch auto: the largest that fits"
    else:
        limited = " (--memory-limit)" if args.memory_limit is not None else ""
        raise UserError(f"--model_batch auto: not even K = 1 fits: its predicted peak is "
                        f"{plan.gib(plan.predicted_peak(fp, 1, world))}, {plan.gib(capacity)} is available"
                        f"{limited}; free memory, use bfloat16 directions (--directions-dtype), a smaller "
                        "--batch-size or more processes (torchrun)")
    if distributed.is_primary():
        for line in plan.describe(fp, k, how, n, world, setup.device, capacity, fits, run.layout.numel,
                                  args.directions_dtype, batch):
            log.info("plan: %s", line)
        if capacity is not None and plan.step_peak(fp, min(k, n), world) > plan.budget(capacity, setup.device.type):
            log.warning("plan: K = %d is predicted to need more than the %s available (%s)", k,
                        plan.gib(capacity), f"K = {fits} would fit" if fits else "not even K = 1 fits")
    if args.model_batch == "auto":
        args.requested = {"model_batch": "auto"}
        args.model_batch = k
        run.config["model_batch_chosen"] = k
        setup.arguments = cli.recorded(args)  # the results line and recipe record the K chosen


# -------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    # The method (hence the default soup path) is known once the blocks are counted: an explicit
    # --save-soup is checked now, before the long work, the default one below.
    finished_line, setup, _ = cli.begin(args, None, METHODS, data=datasets.build_dataset)
    if finished_line is not None:
        return finished_line
    paths = individual.souped_paths(setup, args.exclude_top)
    reset_peak(setup.device)

    layout, base = make_layout(paths, setup.model, setup.reference, args.layer_size)
    if not layout.frozen_stats:
        check_batch_statistics(len(setup.bundle.heldout), args.batch_size, distributed.world_size())
    method = method_of(layout)
    config = config_of(args, paths)
    config[mehl_state.FILES_KEY] = mehl_state.fingerprints(paths)
    state_path = state_file(args, method)
    cli.lock_output(cli.soup_target(args, method), state_path)
    state = load_state(state_path, args, config)
    resumed_k = chosen_k(state, state_path) if state is not None and args.model_batch == "auto" else None
    if state is not None:
        mehl_state.check_contents(state, state_path, n=len(paths), numel=layout.numel,
                                  blocks=layout.num_blocks, model_batch=resumed_k or args.model_batch,
                                  models_epochs=args.models_epochs,
                                  dtype=setup.reference[layout.names[0]].dtype)
    # --resume replaces an existing soup only when its own state is continued.
    output = cli.soup_output(args, method, resumed=state is not None)
    soup = start_model(setup.model, layout, base)
    del base  # the model holds it now: a second full copy would cost memory all run long
    if state is not None:
        soup.theta.copy_(state["soup"].to(soup.theta.device))
    run = Run(args, method, setup, output, layout, paths, soup, state_path, config, wandb=None)
    settle_model_batch(run, resumed_k)
    log_start(args, method, setup, layout, len(paths))
    run.wandb = outputs.Wandb(args.wandb, "model-soups", setup.arguments,
                              output.path.parent if output.path else Path("runs"))
    wandb = run.wandb
    progress = Progress.start(args.randomseed, state)
    run.loader = sampling.RankLoader(args.batch_size, progress.data_rng, distributed.world_size(),
                                     distributed.rank(), pin_memory=setup.device.type == "cuda")

    record = None
    if learn(run, progress):
        record = finish(run, progress)
    else:
        log.info("stopped after %d group(s) (--stop-after-groups); continue with --resume %s",
                 len(progress.groups), state_path)
    wandb.finish()
    cli.end()
    return record


if __name__ == "__main__":
    run_main(main)
