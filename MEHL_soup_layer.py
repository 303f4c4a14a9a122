"""MEHL-Soup and MEHL-Soup+: soup coefficients learned on the held-out split, on the hyperplane (affine
hull) of the ingredients, K = --model_batch ingredients at a time. --layer-size 0 (default) gives one
block per parameter tensor: MEHL-Soup+; a layer size at least the model's size gives one block:
MEHL-Soup (the method name follows the block count).

Algorithm 1 of the paper, line by line, and where it is written:

    order = ingredients; rng = --randomseed          main: `make_run`, `mehl_state.Progress.start`
    for e in range(models_epochs): shuffle(order)    `learn`: the first loop, `sampling.shuffled`
      for each group G of at most K in order:        `learn`: `sampling.groups`
        center = mean over G (first) / the soup      `mehl.directions` (the soup is its own center)
        P[i, b] = unit (theta_i,b - center_b)         `mehl.directions` (`mehl.load_rows`)
        X = zeros(|G|, B); AdamW (or SGD) over X     `learn`: written where they are made
        cosine with warm-up over 20 % of the steps   `learn`: `cosine_with_warmup`
        repeat epochs times over the held-out split  `learn`: the inner epochs, then the batches
          g = d loss / d theta (ViT: clip to 1)      `mehl.step` (`mehl.gradient`, `mehl.clip_factor`)
          dX[i, b] = <P[i, b], g_b>; optimizer step  `mehl.step` (`hyperplane.project`)
          soup_b = center_b + sum_i X[i, b] P[i, b]  `mehl.step` (`hyperplane.combine`)
    alpha (B x N) tracked exactly, saved             `learn`: `hyperplane.alpha_delta`; `finish`

Progress bars, the resume state saved after every group, the per-epoch test accuracy (logged only,
never used) and --stop-after-groups are one helper, `Ledger`, called at the loops' edges.

Parameters identical in every ingredient are kept as they are; BatchNorm statistics that differ are
learned through in train mode and re-estimated at the end (README, "Rules that decide what a soup is").
A step holds K ingredients' learned parameters more than a plain forward/backward (`utils/run/mehl.py`);
the plan printed before learning predicts the peak, --model_batch auto takes the largest K that fits
(`utils/run/plan.py`). Under torchrun each rank holds its contiguous share of each group and of each
data batch; the same seed gives the same soup as one process (up to float rounding).

    python MEHL_soup_layer.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 \\
        --model_batch 4 --epochs 5 --cosine-lr
    torchrun --nproc_per_node=2 MEHL_soup_layer.py --model-location zoo/fashion_mnist \\
        --arch efficientnet-lite0 --model_batch 4 --epochs 5 --cosine-lr

The results line holds the alpha summary, `<soup>.coefficients.json` alpha. The resume state
(`utils/files/mehl_state.py`, default `<soup>.state.pt`) is saved after every group and kept."""
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import datasets
from utils.files import mehl_state, soup_io
from utils.run import cli, individual, inputs, mehl, outputs, plan
from utils.run.batchnorm import batchnorm_statistics, check_batch_statistics, reestimate, rule, set_mode
from utils.run.evaluation import evaluate_all
from utils.run.layout import make_layout, state_buffers
from utils.runtime import distributed
from utils.runtime.errors import UserError, run_main
from utils.runtime.memory import reset_peak
from utils.soup import hyperplane, sampling
from utils.soup.schedules import constant, cosine_with_warmup

log = logging.getLogger("MEHL_soup")
FAMILY = "MEHL-Soup"
METHODS = (FAMILY, FAMILY + "+")


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
    g.add_argument("--model_batch", "--model-batch", type=plan.model_batch_value, default=18,
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
                   help="continue from the resume state file (PATH, or <soup>.state.pt when given "
                   "without one); a missing file starts from the beginning")
    g.add_argument("--stop-after-groups", type=int, default=None,
                   help="stop after this many groups in this process, resume state saved and no soup "
                   "written (time-sliced jobs; tests of --resume)")
    g.add_argument("--no-epoch-test", action="store_true",
                   help="skip the test accuracy logged after each inner epoch (logged only, never used)")
    return p.parse_args(argv)


def check_args(args):
    """MEHL's own flags (--lr, --wd, --layer-size and --memory-limit: `cli.check_learning`)."""
    if args.model_batch != "auto" and args.model_batch < 1:
        raise UserError(f"--model_batch must be >= 1, got {args.model_batch}")
    for flag, value in (("--epochs", args.epochs), ("--models_epochs", args.models_epochs)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.labelsmooth < 1:
        raise UserError(f"--labelsmooth must be in [0, 1), got {args.labelsmooth}")
    if args.stop_after_groups is not None and args.stop_after_groups < 1:
        raise UserError(f"--stop-after-groups must be >= 1, got {args.stop_after_groups}")


@dataclass(frozen=True)
class Run:
    """What every group of one run uses, fixed at its start: values, not the argparse namespace."""
    method: str               # MEHL-Soup or MEHL-Soup+ (`soup_io.method_of`, from the block count)
    setup: cli.Setup          # device, data, model, and the arguments as the results line records them
    output: cli.Output        # where the soup goes
    layout: object            # the blocks (`utils.run.layout.Layout`)
    paths: list
    soup: mehl.FlatSoup       # the model's learned parameters, as one flat vector
    state_path: Path          # the resume state's file
    config: dict              # what defines the run, kept in the resume state
    k: int                    # K: ingredients per group
    models_epochs: int
    epochs: int
    optimizer: str
    lr: float
    wd: float
    cosine_lr: bool
    labelsmooth: float
    directions_dtype: str
    epoch_test: bool
    stop_after_groups: int
    no_shifts: bool
    loader: sampling.RankLoader   # the held-out batches of every epoch of the run (one DataLoader)
    wandb: object


def make_run(args):
    """Set up from the flags: data, model, ingredients, blocks, the resume state and K. Returns (run,
    progress), or (the finished results line, None) when this same command already finished."""
    finished_line, setup, _ = cli.begin(args, None, METHODS, data=datasets.build_dataset)
    if finished_line is not None:
        return finished_line, None
    paths = individual.souped_paths(setup, args.exclude_top)
    reset_peak(setup.device)
    layout, base = make_layout(paths, setup.model, setup.reference, args.layer_size)
    if not layout.frozen_stats:
        check_batch_statistics(len(setup.bundle.heldout), args.batch_size, distributed.world_size())
    method = soup_io.method_of(FAMILY, plus=layout.num_blocks > 1)
    config = mehl_state.config_of(cli.run_key(vars(args)), args.model_location, paths)
    state_path = mehl_state.path_of(args.resume, cli.soup_target(args, method), method)
    cli.lock_output(cli.soup_target(args, method), state_path)
    state = mehl_state.load(state_path, resume=args.resume, overwrite=args.overwrite, config=config,
                            added={k: (getattr(args, k), v) for k, v in cli.ADDED_DEFAULTS.items()},
                            flag_of=mehl_state.flag_of)
    resumed = mehl_state.resumed_k(state, state_path) if state is not None and args.model_batch == "auto" else None
    if state is not None:
        mehl_state.check_contents(state, state_path, n=len(paths), numel=layout.numel, blocks=layout.num_blocks,
                                  model_batch=resumed or args.model_batch, models_epochs=args.models_epochs,
                                  dtype=setup.reference[layout.names[0]].dtype)
    output = cli.soup_output(args, method, resumed=state is not None)  # --resume replaces its own soup only
    soup = mehl.start_model(setup.model, layout, base)
    del base  # the model holds it now: a second full copy would cost memory all run long
    if state is not None:
        soup.theta.copy_(state["soup"].to(soup.theta.device))
    k = plan.choose_k(setup, layout, soup, paths, args.model_batch, resumed, memory_limit=args.memory_limit,
                      batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                      labelsmooth=args.labelsmooth, directions_dtype=args.directions_dtype)
    if args.model_batch == "auto":  # the K chosen is recorded; 'auto' still defines the run (cli.run_key)
        config = {**config, "model_batch_chosen": k}
        setup = dataclasses.replace(setup, arguments={**setup.arguments, "model_batch": k,
                                                      "requested": {"model_batch": "auto"}})
    mehl.log_start(method, setup, layout, len(paths), k, args.directions_dtype)
    progress = mehl_state.Progress.start(args.randomseed, state)
    loader = sampling.RankLoader(args.batch_size, progress.data_rng, distributed.world_size(),
                                 distributed.rank(), pin_memory=setup.device.type == "cuda")
    wandb = outputs.Wandb(args.wandb, "model-soups", setup.arguments,
                          output.path.parent if output.path else Path("runs"))
    return Run(method, setup, output, layout, paths, soup, state_path, config, k, args.models_epochs,
               args.epochs, args.optimizer, args.lr, args.wd, args.cosine_lr, args.labelsmooth,
               args.directions_dtype, not args.no_epoch_test, args.stop_after_groups, args.no_shifts,
               loader, wandb), progress


def learn(run, progress, ledger):
    """Algorithm 1 from where `progress` (the resume state) stands; the soup (the model's parameters) moves
    in place, `progress.alpha` tracks it. False when --stop-after-groups stopped it first."""
    setup, layout, N, B = run.setup, run.layout, len(run.paths), run.layout.num_blocks
    per_epoch = math.ceil(len(setup.bundle.heldout) / setup.batch_size)
    previous = list(range(N)) if progress.order is None else progress.order
    while progress.models_epoch < run.models_epochs:
        if progress.order is None:
            progress.order = sampling.shuffled(previous, progress.models_rng)
        groups = sampling.groups(progress.order, run.k)
        while progress.next_group < len(groups):
            group, first = groups[progress.next_group], progress.alpha is None
            my_rows = sampling.my_share(group, distributed.world_size(), distributed.rank())  # all on one process
            # the soup is the group's center: for the first group its mean is written into the soup here
            center, P, inv_norms = mehl.directions(run.paths, my_rows, len(group), layout, setup.reference,
                                                   run.soup, mehl.DTYPES[run.directions_dtype], first)
            X = torch.zeros(len(my_rows), B, dtype=run.soup.theta.dtype, device=setup.device, requires_grad=True)
            if run.optimizer == "sgd":
                optimizer = torch.optim.SGD([X], lr=run.lr, momentum=0.9, weight_decay=run.wd)
            else:
                optimizer = torch.optim.AdamW([X], lr=run.lr, weight_decay=run.wd)
            steps = run.epochs * per_epoch
            schedule = cosine_with_warmup(run.lr, steps) if run.cosine_lr else constant(run.lr)
            learner = mehl.Group(center, P, inv_norms, X, optimizer, schedule)
            ledger.start_group(steps, P)
            for epoch in range(run.epochs):
                set_mode(setup.model, layout.frozen_stats)
                # what runs on the held-out split: a frozen prefix that holds no learned tensor runs
                # once, images are decoded once, all in --precision (utils/run/inputs.py)
                heldout = inputs.learning(setup.model, setup.bundle.heldout, setup.device, setup.batch_size,
                                          setup.workers, layout.names, setup.precision)
                ledger.start_epoch(learner)
                for n_global, batch in run.loader.epoch(heldout.dataset, heldout.workers):
                    loss = mehl.step(heldout.forward, run.soup, learner, layout.bounds, batch, n_global,
                                     run.labelsmooth, clip=setup.spec.is_vit)
                    ledger.after_step(learner, loss, n_global)
                ledger.after_epoch(learner, epoch)
            alpha_center = hyperplane.mean_alpha(group, N, B) if first else progress.alpha
            delta = hyperplane.alpha_delta(alpha_center, X, inv_norms, my_rows)
            progress.alpha = alpha_center + distributed.all_reduce_sum(delta.to(setup.device)).cpu()
            stop = ledger.after_group(progress, group, learner.losses, last=progress.next_group + 1 == len(groups)
                                      and progress.models_epoch + 1 == run.models_epochs)
            del center, P, inv_norms, X, optimizer, learner  # the K rows go before the next group's load
            if stop:
                return False
        previous, progress.order, progress.next_group = progress.order, None, 0
        progress.models_epoch += 1
    ledger.close()
    return True


def finish(run, progress):
    """Re-estimate BatchNorm statistics when they differ, evaluate, write the sidecar, the soup and its
    recipe, and the results line (a kill before the line: --resume redoes only this)."""
    setup, layout = run.setup, run.layout
    reestimated = not layout.frozen_stats
    if reestimated:
        reestimate(setup.model, setup.bundle.heldout, setup.device, setup.batch_size, setup.workers)
    evaluated = inputs.evaluation(setup.model, setup.device, setup.batch_size, setup.workers, setup.precision)
    scores = evaluate_all(evaluated, setup.bundle, setup.device, setup.batch_size, shifts=not run.no_shifts,
                          keep=True)
    summary, alpha = hyperplane.summary(progress.alpha), progress.alpha.tolist()
    identical_numbers = sum(setup.reference[n].numel() for n in layout.identical)
    rows_per_rank = sampling.shard_range(min(run.k, len(run.paths)), distributed.world_size(), 0)[1]
    soup_sd = {k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()}
    statistics = (batchnorm_statistics(setup.model, state_buffers(setup.model, floating=False))
                  if reestimated else [])
    batchnorm = rule(setup.model, reestimated)
    products, why = mehl.products_of(progress.groups)
    record = outputs.write_outputs(
        setup, run.output, run.method, run.paths, scores, soup_sd,
        sidecars={"coefficients": soup_io.coefficients_file(layout.blocks, alpha, summary=summary)},
        coefficients=soup_io.coefficients(layout, alpha, soup_sd, statistics), recipe={"batchnorm": batchnorm},
        blocks=layout.num_blocks, model_batch=run.k, groups=progress.groups, alpha_summary=summary,
        identical_parameters=layout.identical, identical_numbers=identical_numbers,
        identical_bytes_not_held_per_rank=identical_numbers * run.soup.theta.element_size() * (rows_per_rank + 1),
        batchnorm=batchnorm, state_file=str(run.state_path),
        learning_seconds_all_sessions=round(progress.seconds, 2), block_products=products,
        block_products_why=why)
    if distributed.is_primary():
        log.info("%s of %d (K=%d): held-out %.2f, test %.2f, shift mean %s; alpha: %d negative (%.1f%%), "
                 "max %.3f, effective ingredients %.2f", run.method, len(run.paths), run.k, scores["heldout"],
                 scores["test"], scores.get("shift_mean"), summary["negative"],
                 100 * summary["negative_fraction"], summary["max"], summary["effective_ingredients"])
    run.wandb.log({f"final_{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
    return record


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    run, progress = make_run(args)
    if progress is None:
        return run  # this same command already finished: its results line
    record = None
    if learn(run, progress, mehl.Ledger(run, progress)):
        record = finish(run, progress)
    else:
        log.info("stopped after %d group(s) (--stop-after-groups); continue with --resume %s",
                 len(progress.groups), run.state_path)
    run.wandb.finish()
    cli.end()
    return record


if __name__ == "__main__":
    run_main(main)
