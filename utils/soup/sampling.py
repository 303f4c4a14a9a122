"""Which ingredients go together and in what order (MEHL-Soup's model sampling), and the order of the
held-out examples. Everything is driven by `torch.Generator`s whose state is saved for --resume.

Two generators come from one seed so that the model order and the data order do not depend on each
other: `models_generator(seed)` and `data_generator(seed)`. Under torchrun every rank draws the same
orders and takes its contiguous share (`shard_range`); the caller says which rank of how many it is.
"""
import torch
from torch.utils.data import DataLoader


def shard_range(n, parts, index):
    """Contiguous split of range(n) into `parts` pieces, the first n % parts one longer: (start, stop) of
    piece `index`."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


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


def my_share(group, world, rank):
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


def global_batches(n, batch_size, generator):
    """One epoch of the held-out split: a seeded permutation of range(n) cut into global batches."""
    perm = torch.randperm(n, generator=generator).tolist()
    return [perm[s:s + batch_size] for s in range(0, n, batch_size)]


def rank_batches(dataset, batch_size, generator, world, rank, workers=0):
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
