"""Learned-Soup and Learned-Soup+: mixing coefficients learned by gradient descent on the
held-out split, with all N ingredients resident.

Raw coefficients R (B, N) start equal (the first soup is the uniform soup); alpha = softmax(R, dim=1);
theta_b = sum_i alpha[b, i] theta_{i,b}; a temperature beta (starting at 1) multiplies the logits;
loss = CE(beta * f(x; theta(alpha)), y). Only R and beta are learned (AdamW, lr 0.05, wd 0, 5 epochs,
batch 256, constant lr). B = 1 (Learned-Soup) or, with --layerwise, one row per parameter tensor
(Learned-Soup+; --layer-size S for coarser blocks). Parameters identical in every ingredient are kept as
they are. BatchNorm (README, "Rules that decide what a soup is"): statistics identical in every
ingredient are kept and those layers run in eval mode while learning; statistics that differ are learned
through in train mode and the final soup's statistics are re-estimated on the held-out split.

    python learned_soup.py --model-location zoo/fashion_mnist --arch efficientnet-lite0 --layerwise
    torchrun --nproc_per_node=2 learned_soup.py --model-location zoo/fashion_mnist --layerwise

Under torchrun each rank holds all N ingredients and takes its slice of every global batch; the R and
beta gradients are summed over ranks, so 1 and 2 processes give the same soup for the same --seed.
Memory is about N times the model's parameters: the script estimates it first and refuses when it does
not fit (--memory-check off to skip). Expect held-out accuracy above the uniform soup's and usually
above the best ingredient's; the coefficients and temperature are written to <soup>.coefficients.json.
"""
import logging
import math

import torch
from tqdm import tqdm

import datasets
from utils.files import soup_io
from utils.files.state_dicts import param_names
from utils.run import batchnorm, cli, individual, inputs, outputs, plan
from utils.run.evaluation import evaluate_all
from utils.run.layout import make_layout, state_buffers
from utils.runtime import distributed
from utils.runtime.errors import UserError, run_main
from utils.runtime.memory import gib, reset_peak
from utils.soup import learned, sampling

log = logging.getLogger("learned_soup")
MARGIN_BYTES = 512 * 2**20  # activations of one batch, the optimizer, the runtime


def parse_args(argv=None):
    p = cli.soup_parser("Learned-Soup(+): mixing coefficients learned on the held-out split.",
                        "Learned-Soup")
    g = p.add_argument_group("learning")
    g.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate (constant)")
    g.add_argument("--wd", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--epochs", type=int, default=5, help="epochs over the shuffled held-out split")
    g.add_argument("--layerwise", action="store_true",
                   help="one row of coefficients per parameter tensor (Learned-Soup+)")
    g.add_argument("--layer-size", "--layer_size", type=int, default=None,
                   help="blocks of coefficients as in the released code (a new block once the current "
                   "one holds more than this many numbers; 0 = one per tensor); implies Learned-Soup+")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out shuffling")
    g.add_argument("--memory-check", choices=["on", "off"], default="on",
                   help="refuse to start when the N resident ingredients will not fit in memory")
    g.add_argument("--memory-limit", type=float, default=None,
                   help="treat at most this many GiB as available (a shared machine); default: what "
                   "the device reports")
    p.set_defaults(batch_size=256)
    return p.parse_args(argv)


def block_size(args):
    """The --layer-size of the blocks: None gives one block (Learned-Soup); --layerwise alone is 0."""
    if args.layer_size is not None:
        return args.layer_size
    return 0 if args.layerwise else None


def check_learning_args(args):
    """Learned-Soup's own flags (--lr, --wd, --layer-size and --memory-limit: `cli.check_learning`, with
    the shared ones)."""
    if args.epochs < 0:
        raise UserError(f"--epochs must be >= 0, got {args.epochs}")


# ------------------------------------------------------------------------------------------ memory
def check_memory(args, setup, n):
    """Refuse (on every rank) when N ingredients + the model + a margin will not fit in what this process
    may use (`plan.capacity_bytes`, MEHL's measure too: --memory-limit, the device's free memory, a
    host's shared among its ranks)."""
    param_bytes = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    model_bytes = sum(v.numel() * v.element_size() for v in setup.reference.values())
    need = n * param_bytes + 3 * model_bytes + MARGIN_BYTES
    have = plan.capacity_bytes(setup.device, args.memory_limit, distributed.local_world_size())
    ok = args.memory_check == "off" or have is None or need <= have
    distributed.agree(ok, f"{n} resident ingredients need about {gib(need)} on {setup.device} "
                      f"({n} x {gib(param_bytes)} of parameters + model + margin) but {gib(have or 0)} "
                      "is available: use fewer ingredients (--params_start/--params_end), MEHL soup, "
                      "or --memory-check off")
    return need, have


# ------------------------------------------------------------------------------------- ingredients
def load_resident(paths, setup, layer_size):
    """The coefficient problem (utils/run/layout.py `make_layout`: which parameters differ, the blocks,
    the BatchNorm rule) from one streamed pass over the ingredients, which also stacks the parameters
    that differ: {name: (N, *shape)} on the device, in the layout's order. A parameter is stacked only
    once an ingredient differs from the first, so parameters identical in all (CLIP's text leftovers)
    never take N copies. The model gets the first ingredient with the differing float buffers averaged.
    Returns (layout, stacked)."""
    stacked, first = {}, {}

    def stack(i, sd, newly_differing):
        if i == 0:
            first.update(sd)
        for k in newly_differing:
            if k in params:
                stacked[k] = torch.empty((len(paths), *sd[k].shape), dtype=sd[k].dtype, device=setup.device)
                stacked[k][:i] = first[k]
        for k in stacked:
            stacked[k][i].copy_(sd[k])

    params = set(param_names(setup.model))
    layout, base = make_layout(paths, setup.model, setup.reference, layer_size, visit=stack)
    setup.model.load_state_dict(base)
    return layout, {k: stacked[k] for k in layout.names}


# ---------------------------------------------------------------------------------------- learning
def learn(args, setup, layout, stacked, wandb):
    """AdamW over R and beta on the shuffled held-out split, each global batch shared out over the ranks
    as MEHL-Soup shares it (utils/soup/sampling.py); returns (R, beta, mean held-out loss per epoch)."""
    model, device = setup.model, setup.device
    owner = learned.owners(layout.blocks)
    raw = learned.init_raw(layout.num_blocks, len(next(iter(stacked.values()))), device)
    beta = torch.ones((), device=device, requires_grad=True)
    opt = torch.optim.AdamW([raw, beta], lr=args.lr, weight_decay=args.wd)
    data_rng, losses, step = sampling.data_generator(args.seed), [], 0
    per_epoch = math.ceil(len(setup.bundle.heldout) / args.batch_size)
    for epoch in range(args.epochs):
        batchnorm.set_mode(model, layout.frozen_stats)
        # what runs on the held-out split: a frozen prefix that holds no learned tensor runs once, images
        # are decoded once, all in --precision (utils/run/inputs.py)
        heldout = inputs.learning(model, setup.bundle.heldout, device, args.batch_size, args.workers,
                                  layout.names, args.precision)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        batches = sampling.rank_batches(heldout.dataset, args.batch_size, data_rng, distributed.world_size(),
                                        distributed.rank(), heldout.workers)
        for n_global, batch in tqdm(batches, total=per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                                    leave=False, disable=not distributed.is_primary()):
            opt.zero_grad(set_to_none=False)
            if batch is not None:
                x, y = batch
                loss = learned.soup_loss(heldout.forward, stacked, raw, beta, owner, x.to(device), y.to(device),
                                         n_global, heldout.key_prefix)
            else:  # a global batch smaller than the world: this rank adds nothing
                loss = 0.0 * (raw.sum() + beta)
            loss.backward()
            for t in (raw, beta):
                distributed.all_reduce_sum(t.grad)
            opt.step()
            if not (torch.isfinite(raw).all() and torch.isfinite(beta)):
                raise UserError(f"the coefficients became non-finite (NaN or Inf) in epoch {epoch + 1}, "
                                f"step {step + 1}: try a smaller --lr (now {args.lr:g}); nothing was written")
            total += torch.stack([loss.detach().double() * n_global,
                                  torch.tensor(0.0 if batch is None else len(batch[1]), dtype=torch.float64,
                                               device=device)])
            step += 1
        distributed.all_reduce_sum(total)
        losses.append(total[0].item() / total[1].item())
        wandb.log({"heldout_loss": losses[-1], "temperature": beta.item(), "epoch": epoch + 1}, step=step)
        if distributed.is_primary():
            log.info("epoch %d: held-out loss %.4f, temperature %.3f", epoch + 1, losses[-1], beta.item())
    return raw.detach(), beta.detach(), losses


def mix_into_model(setup, layout, stacked, alpha, args):
    """Put the soup sum_i alpha[b, i] theta_i into the model; re-estimate its BatchNorm statistics on the
    held-out split when they differ across the ingredients. Returns the names of the re-estimated ones."""
    model = setup.model
    with torch.no_grad():
        state = model.state_dict()
        for k, v in learned.mix(stacked, alpha, learned.owners(layout.blocks)).items():
            state[k].copy_(v)
    if layout.frozen_stats:
        return []
    batchnorm.reestimate(model, setup.bundle.heldout, setup.device, args.batch_size, args.workers)
    return batchnorm.batchnorm_statistics(model, state_buffers(model, floating=False))


# -------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    check_learning_args(args)
    method = soup_io.method_of("Learned-Soup", plus=block_size(args) is not None)  # by the flags
    finished_line, setup, output = cli.begin(args, method, data=datasets.build_dataset)
    if finished_line is not None:
        return finished_line
    need, have = check_memory(args, setup, len(setup.paths) - args.exclude_top)
    paths = individual.souped_paths(setup, args.exclude_top)
    torch.manual_seed(args.seed)
    reset_peak(setup.device)  # again: leave the individual evaluations of --exclude-top out of the peak
    for p in setup.model.parameters():
        p.requires_grad_(False)

    layout, stacked = load_resident(paths, setup, block_size(args))
    if not layout.frozen_stats:
        batchnorm.check_batch_statistics(len(setup.bundle.heldout), args.batch_size, distributed.world_size())
    log_start(method, layout, len(paths))
    wandb = outputs.Wandb(args.wandb, "model-soups", setup.arguments, setup.results_db.parent)
    raw, beta, losses = learn(args, setup, layout, stacked, wandb)

    alpha = torch.softmax(raw, dim=1)
    reestimated = mix_into_model(setup, layout, stacked, alpha, args)
    del stacked
    soup = {k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()}
    evaluated = inputs.evaluation(setup.model, setup.device, args.batch_size, args.workers, args.precision)
    scores = evaluate_all(evaluated, setup.bundle, setup.device, args.batch_size, shifts=not args.no_shifts,
                          keep=True)

    alpha_list = alpha.cpu().double().tolist()
    rule = batchnorm.rule(setup.model, reestimated=bool(reestimated))
    fields = {"temperature": beta.item(), "heldout_loss_per_epoch": losses, "blocks": layout.num_blocks,
              "identical_parameters": layout.identical,
              "identical_numbers": sum(setup.reference[k].numel() for k in layout.identical), "batchnorm": rule,
              "memory_estimate_bytes": need, "memory_available_bytes": have,
              **({"alpha": alpha_list[0]} if layout.num_blocks == 1 else {})}
    record = outputs.write_outputs(
        setup, output, method, paths, scores, soup,
        sidecars={"coefficients": soup_io.coefficients_file(layout.blocks, alpha_list, temperature=beta.item())},
        coefficients=soup_io.coefficients(layout, alpha_list, soup, reestimated),
        recipe={"temperature": beta.item(), "batchnorm": rule}, **fields)
    wandb.log({"heldout": scores["heldout"], "test": scores["test"]})
    wandb.finish()
    if distributed.is_primary():
        log.info("%s: held-out %.2f, test %.2f, shift mean %s, temperature %.3f", method,
                 scores["heldout"], scores["test"], scores.get("shift_mean"), beta.item())
    cli.end()
    return record


def log_start(method, layout, n):
    if distributed.is_primary():
        log.info("%s: %d ingredients, %d learned tensors in %d block(s), %d identical in all kept as they are; "
                 "BatchNorm statistics %s", method, n, len(layout.names), layout.num_blocks,
                 len(layout.identical), "frozen (eval mode)" if layout.frozen_stats
                 else "differ (train mode, re-estimated at the end)")


if __name__ == "__main__":
    run_main(main)
