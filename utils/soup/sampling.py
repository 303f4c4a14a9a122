"""Which ingredients go together and in what order (MEHL-Soup's model sampling), and the order of the
held-out examples. Everything is driven by `torch.Generator`s whose state is saved for --resume.

Two generators come from one seed so that the model order and the data order do not depend on each
other: `models_generator(seed)` and `data_generator(seed)`.
"""
import torch
from torch.utils.data import DataLoader

from utils.runtime.distributed import shard_range


def models_generator(seed):
    return torch.Generator().manual_seed(seed)


def data_generator(seed):
    # A different stream from the models' generator of the same seed.
    return torch.Generator().manual_seed((seed + 1_000_003) % 2**64)  # any seed in [0, 2**64)


def shuffled(order, generator):
    """A new list: `order` permuted by `generator` (one models-epoch)."""
    perm = torch.randperm(len(order), generator=generator).tolist()
    return [order[j] for j in perm]


def groups(order, k):
    """Consecutive groups of at most k items."""
    if k < 1:
        raise ValueError(f"group size must be >= 1, got {k}")
    return [order[s:s + k] for s in range(0, len(order), k)]


def my_share(group, world=None, rank=None):
    """The contiguous part of `group` this rank holds (the first len % world ranks take one more)."""
    start, stop = shard_range(len(group), world, rank)
    return group[start:stop]


def smallest_share(n, batch_size, world=1):
    """The fewest examples a rank gets of any global batch of an epoch over n examples (ranks whose
    share of a small last batch is empty sit that step out and do not count)."""
    sizes = {min(batch_size, n)} | ({n % batch_size} if n % batch_size else set())
    shares = [stop - start for size in sizes for start, stop in
              (shard_range(size, world, r) for r in range(world))]
    return min(x for x in shares if x > 0)


def check_batch_statistics(n, batch_size, world=1):
    """Learning with batch statistics (BatchNorm in train mode) needs two or more images in every
    rank's share of every batch: refuse a split that would give a share of one image, before work."""
    if smallest_share(n, batch_size, world) < 2:
        from utils.runtime.errors import UserError
        raise UserError(f"BatchNorm statistics differ across the ingredients, so learning uses batch "
                        f"statistics, which one image does not have: {n} held-out images in batches of "
                        f"{batch_size} over {world} process(es) leave a share of 1 image; choose another "
                        "--batch-size (or --heldout-per-class)")


def global_batches(n, batch_size, generator):
    """One epoch of the held-out split: a seeded permutation of range(n) cut into global batches."""
    perm = torch.randperm(n, generator=generator).tolist()
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def rank_batches(dataset, batch_size, generator, workers=0, world=None, rank=None):
    """Yield (global batch size, this rank's (x, y) or None) for one shuffled epoch over `dataset`.

    Every rank draws the same global batches and takes its contiguous slice of each, so the summed
    per-example losses divided by the global size give exactly the single-process mean. A rank whose
    slice is empty (a last batch smaller than the world) gets None and still takes part."""
    batches = global_batches(len(dataset), batch_size, generator)
    shares = [my_share(b, world, rank) for b in batches]
    loader = DataLoader(dataset, batch_sampler=[s for s in shares if s], num_workers=workers)
    it = iter(loader)
    for full, share in zip(batches, shares):
        yield len(full), (next(it) if share else None)
