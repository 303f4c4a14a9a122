"""Which ingredients go together and in what order (MEHL-Soup's model sampling), and the order of the
held-out examples. Everything is driven by `torch.Generator`s whose state is saved for --resume.

Two generators come from one seed so that the model order and the data order do not depend on each
other: `models_generator(seed)` and `data_generator(seed)`. Under torchrun every rank draws the same
orders and takes its contiguous share (`shard_range`); the caller says which rank of how many it is.
"""
import torch
from torch.utils.data import DataLoader, Dataset


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
    yield from RankLoader(batch_size, generator, world, rank).epoch(dataset, workers)


class _Shares:
    """The batch sampler of a `RankLoader`: the non-empty shares of the epoch drawn last."""

    def __init__(self):
        self.shares = []

    def __iter__(self):
        return iter([s for s in self.shares if s])

    def __len__(self):
        return sum(1 for s in self.shares if s)


class _Current(Dataset):
    """The data set of the epoch being read, behind one DataLoader for the whole run (the in-memory sets
    of utils/run/inputs.py are new objects at each epoch, over the same tensors)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    def __getitems__(self, indices):
        many = getattr(self.dataset, "__getitems__", None)
        return many(indices) if many is not None else [self.dataset[i] for i in indices]


class RankLoader:
    """`rank_batches` for every epoch of a run through one DataLoader: its workers persist between epochs
    (workers > 0) and, with `pin_memory` (CUDA), batches come in page-locked memory so that the step's
    copies to the device do not wait (`non_blocking`). Each epoch draws its global batches from
    `generator` exactly as `rank_batches` does, so the order is the same batch for batch."""

    def __init__(self, batch_size, generator, world, rank, pin_memory=False):
        self.batch_size, self.generator, self.world, self.rank = batch_size, generator, world, rank
        self.pin_memory = pin_memory
        self.sampler, self.current, self.loader, self.workers = _Shares(), None, None, 0

    def _reuse(self, dataset, workers):
        """Whether the DataLoader made before serves `dataset` with `workers` (else a new one is made: in
        a run only if the held-out inputs changed kind)."""
        if self.loader is not None and workers == self.workers and \
                (workers == 0 or self.current.dataset is dataset):
            self.current.dataset = dataset  # no worker holds a copy of it
            return True
        self.current, self.workers = _Current(dataset), workers
        self.loader = DataLoader(self.current, batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=self.pin_memory, persistent_workers=workers > 0)
        return False

    def epoch(self, dataset, workers=0):
        """Yield (global batch size, this rank's (x, y) or None) for the next shuffled epoch over
        `dataset`, read by `workers` processes."""
        batches = global_batches(len(dataset), self.batch_size, self.generator)
        self.sampler.shares = [my_share(b, self.world, self.rank) for b in batches]
        if self._reuse(dataset, workers) and workers > 0:
            # A DataLoader draws its workers' base seed from torch's global generator each time a new
            # iterator is made; persistent workers keep theirs. Draw it anyway, so that whatever reads
            # the global generator next (dropout) sees the same numbers as with a loader per epoch.
            torch.empty((), dtype=torch.int64).random_()
        it = iter(self.loader)
        for full, share in zip(batches, self.sampler.shares):
            yield len(full), (next(it) if share else None)
