"""MEHL-Soup and MEHL-Soup+ (SPEC 7): soup coefficients learned on the held-out split, on the
hyperplane (affine hull) of the ingredients, K ingredients at a time.

For each models-epoch the ingredients are shuffled (seed --randomseed) and cut into groups of at most
K = --model_batch. The first group's center is its mean; every later group starts from the current
soup. Per block b (--layer-size) each ingredient i of the group gives a unit direction
P[i, b] = (theta_i,b - center_b) / ||theta_i,b - center_b||, and coefficients X (zeros, fresh per group)
are learned with soup_b = center_b + sum_i X[i, b] P[i, b]: one model is in the autograd graph, its
gradient g is projected, dX[i, b] = <P[i, b], g_b>. The implied coefficients over all ingredients
(alpha, blocks x ingredients, rows summing to 1, negative values allowed) are tracked exactly and saved.
--layer-size 0 (default) gives one block per parameter tensor: MEHL-Soup+; a layer size at least the
model's size gives one block: MEHL-Soup. The method name in the results follows the block count.

Parameters identical in every ingredient are kept as they are and left out of the problem. BatchNorm
statistics identical in every ingredient are kept and those layers run in eval mode while learning;
when they differ, learning uses batch statistics and the final soup's statistics are re-estimated on
the held-out split (SPEC 3).

    python MEHL_soup_layer.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 \\
        --model_batch 4 --epochs 5 --cosine-lr
    torchrun --nproc_per_node=2 MEHL_soup_layer.py --model-location zoo/fashion_mnist \\
        --arch efficientnet-lite0 --model_batch 4 --epochs 5 --cosine-lr

Expect (as in the paper) a soup whose held-out accuracy is above the uniform soup's and usually above
the best ingredient's, with a test accuracy near or above the greedy soup's; the test accuracy after
each inner epoch is logged (never used to choose anything). The results line holds the alpha summary
(negative coefficients, largest, effective number of ingredients); `<soup>.alpha.json` holds alpha.
On the default zoo (README, "Results on the embedded default") MEHL-Soup+ with K=4 reaches the best
ingredient's held-out accuracy and is about level with greedy soup on test over three seeds.
Under torchrun every rank holds only its contiguous share of each group (memory ~ K / world
ingredients + one model per process), each global data batch is split over the ranks, and the same
seed gives the same soup as one process (up to float rounding).

After every group the state (soup, alpha, position in the order, generator states, the arguments that
define the result) is written atomically to --resume's file (default: `<soup>.state.pt`); rerun with
--resume to continue an interrupted run, which ends with the same soup as an uninterrupted one. The
state file is kept after success (it also records the finished run); a new run over it needs
--resume or --overwrite.
"""
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import cli, distributed, hyperplane, individual, mehl_state, results, sampling
from utils.batchnorm import buffer_keys, has_batchnorm, reestimate, set_mode
from utils.errors import UserError, run_main
from utils.evaluation import accuracy, evaluate_all
from utils.ingredients import index_of, load_checked, stream
from utils.memory import gib, reset_peak
from utils.schedules import constant, cosine_with_warmup, set_lr
from utils.soup_io import save_soup
from utils.state_dicts import atomic_write, block_ids, flatten, identical_keys, make_blocks, param_names

log = logging.getLogger("MEHL_soup")
STATE_VERSION = 1
# The arguments that define the result: a --resume state made with other values is refused.
DEFINING = ("model_location", "params_start", "params_end", "arch", "datasets", "data_location",
            "heldout_per_class", "heldout_index", "split_seed", "exclude_top", "batch_size", "lr", "wd",
            "epochs", "cosine_lr", "optimizer", "randomseed", "model_batch", "models_epochs",
            "layer_size", "labelsmooth")
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
    g.add_argument("--model_batch", "--model-batch", type=int, default=18,
                   help="K: ingredients per group (memory ~ K / world size ingredients per process); "
                   "larger than the range means one group")
    g.add_argument("--models_epochs", "--models-epochs", type=int, default=1,
                   help="passes over the reshuffled ingredients")
    g.add_argument("--layer-size", "--layer_size", type=int, default=0,
                   help="block size S: 0 = one block per parameter tensor (MEHL-Soup+); at least the "
                   "model's size = one block (MEHL-Soup)")
    g.add_argument("--labelsmooth", type=float, default=0.0, help="label smoothing of the cross-entropy")
    g.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the state file (PATH, or <soup>.state.pt when given without "
                   "one); a missing file starts from the beginning")
    g.add_argument("--stop-after-groups", type=int, default=None,
                   help="stop after this many groups in this process, state saved and no soup written "
                   "(time-sliced jobs; tests of --resume)")
    g.add_argument("--no-epoch-test", action="store_true",
                   help="skip the test accuracy logged after each inner epoch (logged only, never used)")
    return p.parse_args(argv)


def check_args(args):
    if args.model_batch < 1:
        raise UserError(f"--model_batch must be >= 1, got {args.model_batch}")
    for flag, value in (("--epochs", args.epochs), ("--models_epochs", args.models_epochs)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not 0 < args.lr < math.inf:
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.wd < math.inf:
        raise UserError(f"--wd must be a finite number >= 0, got {args.wd}")
    if not 0 <= args.labelsmooth < 1:
        raise UserError(f"--labelsmooth must be in [0, 1), got {args.labelsmooth}")
    if args.layer_size < 0:
        raise UserError(f"--layer-size must be >= 0, got {args.layer_size}")
    if args.stop_after_groups is not None and args.stop_after_groups < 1:
        raise UserError(f"--stop-after-groups must be >= 1, got {args.stop_after_groups}")


# ------------------------------------------------------------------------------------ layout
@dataclass
class Layout:
    """What is learned and how: parameter names in the coefficient problem, their blocks, and the
    state dict every soup starts from (first ingredient; differing float buffers averaged)."""
    names: list            # learned parameters, named_parameters() order
    frozen: list           # parameters identical in every ingredient: kept, not learned
    blocks: list           # lists of learned names
    ids: torch.Tensor      # block of every number of the flat learned vector
    base: dict
    frozen_stats: bool     # every float buffer identical: BatchNorm in eval mode while learning
    differing_buffers: list

    @property
    def num_blocks(self):
        return len(self.blocks)


def make_layout(paths, setup, layer_size):
    """One streamed pass over the ingredients: which tensors are identical in all, the mean of the
    buffers, the blocks over the remaining parameters."""
    model, reference = setup.model, setup.reference
    names, buffers = param_names(model), buffer_keys(model)
    first = load_checked(paths[0], reference)
    sums = {k: first[k].to(torch.float64).clone() for k in buffers}

    def others():
        for _, _, sd in stream(paths[1:], reference, desc="comparing ingredients"):
            for k in buffers:
                sums[k] += sd[k].to(torch.float64)
            yield sd

    rest = others()
    same = set(identical_keys(first, rest, names + buffers))
    for _ in rest:  # identical_keys stops early when nothing is identical; the buffer sums need all
        pass
    differing = [k for k in buffers if k not in same]
    base = dict(first)
    for k in differing:
        base[k] = (sums[k] / len(paths)).to(first[k].dtype)
    learned = [n for n in names if n not in same]
    if not learned:
        raise UserError(f"every parameter is identical in the {len(paths)} ingredient(s): there is "
                        "nothing to learn (the soup would be the ingredient itself)")
    sizes = [reference[n].numel() for n in learned]
    index_blocks = make_blocks(sizes, layer_size)
    return Layout(names=learned, frozen=[n for n in names if n in same],
                  blocks=[[learned[t] for t in b] for b in index_blocks],
                  ids=block_ids(sizes, index_blocks).to(setup.device), base=base,
                  frozen_stats=not differing, differing_buffers=differing)


# ------------------------------------------------------------------------------------- state
def config_of(args, paths):
    cfg = {k: getattr(args, k) for k in DEFINING}
    cfg["model_location"] = str(Path(args.model_location).resolve())
    cfg["ingredients"] = [index_of(p) for p in paths]
    return cfg


def flag_of(key):
    return "--" + (key if key in UNDERSCORE_FLAGS else key.replace("_", "-"))


def state_file(args, out_path):
    if isinstance(args.resume, str):
        return Path(args.resume)
    base = out_path if out_path is not None else Path(f"runs/{args.method}.pt")
    return base.with_name(base.stem + ".state.pt")


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"--resume {path}: not a readable MEHL state file: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from err
    mehl_state.check_header(state, path, config, flag_of)
    return state


# ---------------------------------------------------------------------------------- learning
def set_params(model, names, flat):
    """Copy the flat learned vector into the model's parameters."""
    params = dict(model.named_parameters())
    offset = 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def flat_gradient(model, names, batch, n_global, labelsmooth, device):
    """The gradient of the mean loss over the global batch w.r.t. the learned parameters, summed over
    ranks (each rank's loss is a sum over its examples divided by the global batch size)."""
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    loss = torch.zeros(1, device=device)
    if batch is not None:
        x, y = batch
        logits = model(x.to(device, non_blocking=True))
        batch_loss = F.cross_entropy(logits, y.to(device), label_smoothing=labelsmooth,
                                     reduction="sum") / n_global
        batch_loss.backward()
        loss += batch_loss.detach()
    g = torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]))
                   .reshape(-1) for n in names])
    distributed.all_reduce_sum(g)
    distributed.all_reduce_sum(loss)
    return g, float(loss)


def make_optimizer(args, X):
    if args.optimizer == "sgd":
        return torch.optim.SGD([X], lr=args.lr, momentum=0.9, weight_decay=args.wd)
    return torch.optim.AdamW([X], lr=args.lr, weight_decay=args.wd)


def load_rows(paths, members, layout, setup):
    """This rank's ingredients of the group as rows (n, D) of the flat learned vector."""
    D = layout.ids.numel()
    dtype = setup.reference[layout.names[0]].dtype
    rows = torch.empty(len(members), D, dtype=dtype, device=setup.device)
    for j, i in enumerate(members):
        rows[j] = flatten(load_checked(paths[i], setup.reference), layout.names).to(setup.device)
    return rows


def learn_group(ctx, group, soup, alpha):
    """Learn X for one group; returns the new soup (flat) and alpha (B x N), and the group's log."""
    args, setup, layout = ctx["args"], ctx["setup"], ctx["layout"]
    B, N, device = layout.num_blocks, len(ctx["paths"]), setup.device
    mine = sampling.my_share(group)
    rows = load_rows(ctx["paths"], mine, layout, setup)
    if soup is None:
        acc = torch.zeros(rows.shape[1], dtype=torch.float64, device=device)
        for r in rows:
            acc += r.to(torch.float64)
        center = (distributed.all_reduce_sum(acc) / len(group)).to(rows.dtype)
        alpha_center = hyperplane.mean_alpha(group, N, B)
    else:
        center, alpha_center = soup, alpha
    P, inv_norms = hyperplane.directions_(rows, center, layout.ids, B)
    X = torch.zeros(len(mine), B, dtype=P.dtype, device=device, requires_grad=True)
    optimizer = make_optimizer(args, X)
    per_epoch = math.ceil(len(setup.bundle.heldout) / args.batch_size)
    schedule = (cosine_with_warmup(args.lr, args.epochs * per_epoch) if args.cosine_lr
                else constant(args.lr))
    soup, step, losses, tests = center.clone(), 0, [], []
    bar = tqdm(total=args.epochs * per_epoch, desc=f"group {ctx['groups_done'] + 1}", leave=False,
               disable=not distributed.is_primary())
    for epoch in range(args.epochs):
        set_mode(setup.model, layout.frozen_stats)
        epoch_loss = 0.0
        for n_global, batch in sampling.rank_batches(setup.bundle.heldout, args.batch_size,
                                                     ctx["data_rng"], args.workers):
            set_params(setup.model, layout.names, soup)
            g, loss = flat_gradient(setup.model, layout.names, batch, n_global, args.labelsmooth, device)
            if setup.spec.is_vit:  # the released code clips the gradient norm for ViTs
                g.mul_(min(1.0, 1.0 / (float(g.norm()) + 1e-6)))
            X.grad = hyperplane.project(P, g, layout.ids, B)
            set_lr(optimizer, schedule(step))
            optimizer.step()
            soup = center + distributed.all_reduce_sum(hyperplane.combine(X.detach(), P, layout.ids))
            mehl_state.check_finite(soup, ctx["groups_done"] + 1, step + 1, args.lr)
            epoch_loss += loss * n_global
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            ctx["wandb"].log({"loss": loss, "lr": schedule(step - 1)})
        losses.append(epoch_loss / len(setup.bundle.heldout))
        if not args.no_epoch_test:  # logged only, never used to choose anything (SPEC 2)
            set_params(setup.model, layout.names, soup)
            tests.append(accuracy(setup.model, setup.bundle.test.dataset, device, args.batch_size,
                                  args.workers, setup.bundle.test.project, desc="test (logged only)"))
            ctx["wandb"].log({"epoch_test": tests[-1], "epoch_loss": losses[-1]})
        if distributed.is_primary():
            log.info("group %d epoch %d: held-out loss %.4f%s", ctx["groups_done"] + 1, epoch + 1,
                     losses[-1], f", test {tests[-1]:.2f} (logged only)" if tests else "")
    bar.close()
    delta = hyperplane.alpha_delta(alpha_center, X, inv_norms, mine)
    alpha = alpha_center + distributed.all_reduce_sum(delta.to(device)).cpu()
    return soup, alpha, {"ingredients": [index_of(ctx["paths"][i]) for i in group],
                         "heldout_loss": losses, "test_logged_only": tests}


def save_state(path, state):
    if distributed.is_primary():
        atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def learn(ctx, state):
    """The MEHL loop over models-epochs and groups, from `state` (None: from the beginning).
    Returns (soup, alpha, group logs, finished)."""
    args, paths = ctx["args"], ctx["paths"]
    N, K = len(paths), args.model_batch
    models_rng, data_rng = sampling.models_generator(args.randomseed), sampling.data_generator(args.randomseed)
    if state is None:
        me, gi, order, soup, alpha, logs, seconds = 0, 0, None, None, None, [], 0.0
    else:
        me, gi, order, logs, seconds = (state["models_epoch"], state["next_group"], state["order"],
                                        state["groups"], state["seconds"])
        soup, alpha = state["soup"].to(ctx["setup"].device), state["alpha"]
        models_rng.set_state(state["models_rng"])
        data_rng.set_state(state["data_rng"])
    ctx["data_rng"] = data_rng
    previous = list(range(N)) if order is None else order
    per_epoch = math.ceil(N / K)
    bar = tqdm(total=args.models_epochs * per_epoch, initial=len(logs), desc="groups",
               disable=not distributed.is_primary())
    done_here, started = 0, time.time()
    ctx["seconds"] = seconds
    while me < args.models_epochs:
        if order is None:
            order = sampling.shuffled(previous, models_rng)
        groups = sampling.groups(order, K)
        while gi < len(groups):
            ctx["groups_done"] = len(logs)
            soup, alpha, info = learn_group(ctx, groups[gi], soup, alpha)
            logs.append({"models_epoch": me, "group": gi, **info})
            gi += 1
            done_here += 1
            ctx["seconds"] = seconds + time.time() - started
            save_state(ctx["state_path"], {
                "version": STATE_VERSION, "config": ctx["config"], "models_epoch": me, "next_group": gi,
                "order": order, "soup": soup.cpu(), "alpha": alpha, "models_rng": models_rng.get_state(),
                "data_rng": data_rng.get_state(), "groups": logs,
                "seconds": ctx["seconds"]})
            bar.update()
            last = me == args.models_epochs - 1 and gi == len(groups)
            if args.stop_after_groups and done_here >= args.stop_after_groups and not last:
                bar.close()
                return soup, alpha, logs, False
        previous, order, gi, me = order, None, 0, me + 1
    bar.close()
    return soup, alpha, logs, True


# -------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    # The method (hence the default soup path) is known once the blocks are counted: an explicit
    # --save-soup is checked now, before the long work, the default one below.
    earlier, setup = cli.begin(args, ("MEHL-Soup", "MEHL-Soup+"), check_output=args.save_soup is not None)
    if earlier is not None:
        return earlier
    paths = individual.souped_paths(args, setup)
    reset_peak(setup.device)

    layout = make_layout(paths, setup, args.layer_size)
    args.method = "MEHL-Soup" if layout.num_blocks == 1 else "MEHL-Soup+"
    out_path, replace = cli.soup_output(args)
    config = config_of(args, paths)
    config[mehl_state.FILES_KEY] = mehl_state.fingerprints(paths)
    path = state_file(args, out_path)
    cli.lock_output(out_path, path)
    state = load_state(path, args, config)
    if state is not None:
        mehl_state.check_contents(state, path, n=len(paths), numel=layout.ids.numel(),
                                  blocks=layout.num_blocks, model_batch=args.model_batch,
                                  models_epochs=args.models_epochs,
                                  dtype=setup.reference[layout.names[0]].dtype)
    setup.model.load_state_dict(layout.base)
    layout.base = None  # the model holds it now; a second full copy would cost memory all run long
    learned = set(layout.names)
    for n, p in setup.model.named_parameters():
        p.requires_grad_(n in learned)
    frozen_numbers = sum(setup.reference[n].numel() for n in layout.frozen)
    itemsize = setup.reference[layout.names[0]].element_size()
    rows_per_rank = sampling.shard_range(min(args.model_batch, len(paths)), index=0)[1]
    if distributed.is_primary():
        log.info("%s: %d ingredients, K=%d, %d block(s) over %d learned parameter tensors; %d "
                 "parameter tensor(s) identical in all ingredients kept as they are (%d numbers, "
                 "%.3f GiB of directions and center per rank not held); BatchNorm: %s",
                 args.method, len(paths), args.model_batch, layout.num_blocks, len(layout.names),
                 len(layout.frozen), frozen_numbers, gib(frozen_numbers * itemsize * (rows_per_rank + 1)),
                 "statistics identical, eval mode" if layout.frozen_stats else "statistics differ, "
                 "train mode, re-estimated at the end")

    wandb = results.Wandb(args.wandb, "model-soups", cli.record_args(args),
                          out_path.parent if out_path else Path("runs"))
    ctx = {"args": args, "setup": setup, "layout": layout, "paths": paths, "config": config,
           "state_path": path, "wandb": wandb}
    soup, alpha, logs, finished = learn(ctx, state)
    if not finished:
        log.info("stopped after %d group(s) (--stop-after-groups); continue with --resume %s", len(logs),
                 path)
        wandb.finish()
        distributed.teardown()
        return None

    set_params(setup.model, layout.names, soup)
    has_bn = has_batchnorm(setup.model)
    reestimated = bool(layout.differing_buffers) and has_bn
    if reestimated:
        reestimate(setup.model, setup.bundle.heldout, setup.device, args.batch_size, args.workers)
    scores = evaluate_all(setup.model, setup.bundle, setup.device, args.batch_size, args.workers,
                          shifts=not args.no_shifts)
    summary = hyperplane.summary(alpha)
    coefficients = {"names": layout.names, "blocks": layout.blocks, "alpha": alpha.tolist(),
                    "frozen": layout.frozen,
                    ("reestimated_buffers" if reestimated else "averaged_buffers"): layout.differing_buffers}
    extra = {"blocks": layout.num_blocks, "model_batch": args.model_batch, "groups": logs,
             "alpha_summary": summary, "frozen_parameters": layout.frozen,
             "frozen_numbers": frozen_numbers,
             "frozen_bytes_not_held_per_rank": frozen_numbers * itemsize * (rows_per_rank + 1),
             "batchnorm": ("re-estimated on held-out" if reestimated else
                           "identical statistics, eval mode" if has_bn else "none"),
             "state_file": str(path),
             "learning_seconds_all_sessions": round(ctx["seconds"], 2)}
    soup_sd = {k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()}
    # The results line last: it marks the run as finished; a kill before it leaves the state file,
    # from which --resume redoes only the final evaluation and writes.
    if out_path is not None and distributed.is_primary():
        alpha_file = out_path.with_name(out_path.stem + ".alpha.json")
        text = json.dumps({"ingredients": [str(p) for p in paths], "blocks": layout.blocks,
                           "alpha": alpha.tolist(), "summary": summary}, indent=1)
        atomic_write(alpha_file, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    save_soup(soup_sd, out_path, args.method, paths, cli.record_args(args), coefficients=coefficients,
              overwrite=replace)
    record = results.append(args.results_db, cli.result_record(args, setup, paths, scores, **extra))
    if distributed.is_primary():
        log.info("%s of %d (K=%d): held-out %.2f, test %.2f, shift mean %s; alpha: %d negative "
                 "(%.1f%%), max %.3f, effective ingredients %.2f", args.method, len(paths),
                 args.model_batch, scores["heldout"], scores["test"], scores.get("shift_mean"),
                 summary["negative"], 100 * summary["negative_fraction"], summary["max"],
                 summary["effective_ingredients"])
    wandb.log({f"final_{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
    wandb.finish()
    distributed.teardown()
    return record


if __name__ == "__main__":
    run_main(main)
