"""BatchNorm handling: one rule for every learned soup (`batchnorm_statistics` states it).

If the running statistics are identical in every ingredient (fine-tuned with frozen statistics), every
soup keeps them and runs those layers in eval mode, also while learning coefficients. If they differ,
learned soups learn in train mode (batch statistics) and the final soup's statistics are re-estimated
on the held-out split."""
import torch
from torch import nn
from tqdm import tqdm

from utils.runtime import distributed
from utils.runtime.errors import UserError
from utils.soup.sampling import smallest_share

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model):
    return any(isinstance(m, BN_TYPES) for m in model.modules())


def batchnorm_statistics(model, names):
    """The names among `names` (state-dict keys) that belong to a BatchNorm layer of `model`.

    The rule of every learned soup: when none of the BatchNorm statistics differ across the
    ingredients, they are kept and those layers run in eval mode while learning (`set_mode`); when some
    differ, learning uses batch statistics and the final soup's statistics are re-estimated on the
    held-out split (`reestimate`). Other float buffers that differ are averaged and never decide it."""
    layers = {n for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
    return [k for k in names if k.rpartition(".")[0] in layers]


# What a learned soup's results line and recipe record under "batchnorm".
REESTIMATED = "re-estimated on held-out"
KEPT = "identical statistics, eval mode"
NONE = "none"


def rule(model, reestimated):
    """The "batchnorm" field of a learned or MEHL soup: statistics re-estimated on held-out (they
    differed across the ingredients), kept (identical in all), or no BatchNorm layer at all."""
    if reestimated:
        return REESTIMATED
    return KEPT if has_batchnorm(model) else NONE


def set_mode(model, frozen_stats):
    """The mode for learning soup coefficients: BatchNorm layers use batch statistics only when their
    statistics differ across ingredients (frozen_stats=False); everything else is in eval mode, so
    dropout and drop-connect are off. That keeps learning deterministic for a seed, equal on 1 and N
    processes and across --resume (random masks would differ per rank and per restart); the paper's
    CLIP towers have no dropout, so their learning is unchanged by it."""
    model.eval()
    if not frozen_stats:
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                m.train()
    return model


def check_batch_statistics(n, batch_size, world=1):
    """Learning with batch statistics (BatchNorm in train mode) needs two or more images in every
    rank's share of every batch: refuse a split that would give a share of one image, before work."""
    if smallest_share(n, batch_size, world) < 2:
        raise UserError(f"BatchNorm statistics differ across the ingredients, so learning uses batch "
                        f"statistics, which one image does not have: {n} held-out images in batches of "
                        f"{batch_size} over {world} process(es) leave a share of 1 image; choose another "
                        "--batch-size (or --heldout-per-class)")


@torch.no_grad()
def reestimate(model, dataset, device, batch_size=256, workers=0):
    """Recompute the running statistics of every BatchNorm layer on `dataset` (cumulative average over
    the whole set; ranks average their estimates)."""
    from utils.run.evaluation import make_loader
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        return model
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    for x, _ in tqdm(make_loader(dataset, batch_size, workers), desc="re-estimating BatchNorm",
                     leave=False, disable=not distributed.is_primary()):
        model(x.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
        if distributed.is_distributed():
            for buf in (m.running_mean, m.running_var):
                distributed.all_reduce_sum(buf)
                buf /= distributed.world_size()
    model.eval()
    return model
