"""One DataLoader for a whole MEHL run (`sampling.RankLoader`): every epoch gives the same batches, in
the same order, as the DataLoader made anew for each epoch before it (kept below as `per_epoch`), so
every soup stays bit-identical on the CPU."""
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import MEHL_soup_layer as mehl
from tests import helpers
from tests.conftest import make_zoo
from utils.soup import sampling


def per_epoch(dataset, batch_size, generator, world, rank, workers=0):
    """The held-out batches of one epoch as they were read before `RankLoader`: a DataLoader per epoch."""
    batches = sampling.global_batches(len(dataset), batch_size, generator)
    shares = [sampling.my_share(b, world, rank) for b in batches]
    loader = DataLoader(dataset, batch_sampler=[s for s in shares if s], num_workers=workers)
    it = iter(loader)
    for full, share in zip(batches, shares):
        yield len(full), (next(it) if share else None)


def as_lists(epoch):
    """(global size, item indices or None) of each step: the items are their own indices."""
    return [(n, None if b is None else b[0].tolist()) for n, b in epoch]


def data(n=22):
    return TensorDataset(torch.arange(n), torch.arange(n) % 3)


WORKERS = pytest.param(2, marks=pytest.mark.slow)  # worker processes: not in the fast tier


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 0), (3, 2)])
@pytest.mark.parametrize("workers", [0, WORKERS])
def test_every_epoch_reads_the_batches_a_loader_per_epoch_read(world, rank, workers):
    torch.manual_seed(5)
    before = sampling.data_generator(7)
    expected = [as_lists(per_epoch(data(), 5, before, world, rank, workers)) for _ in range(4)]
    global_after = torch.get_rng_state()
    torch.manual_seed(5)
    after = sampling.data_generator(7)
    loader = sampling.RankLoader(5, after, world, rank)
    got, made = [], set()
    for _ in range(4):
        got.append(as_lists(loader.epoch(data() if workers == 0 else data_once, workers)))
        made.add(id(loader.loader))
    assert got == expected
    assert len(made) == 1  # one DataLoader for every epoch
    assert torch.equal(after.get_state(), before.get_state())  # a resumed run continues the same
    # the global generator (dropout, the workers' seeds) is where a loader per epoch left it
    assert torch.equal(torch.get_rng_state(), global_after)
    if world == 3 and rank == 2:
        assert any(b is None for n, b in got[0])  # the small last batch leaves this rank out


data_once = data()  # the plain data set of a run: one object, read by persistent workers


def test_the_order_is_the_one_drawn_before():
    """The first epochs of seed 0 over 11 items in batches of 4, as `per_epoch` draws them."""
    generator = sampling.data_generator(0)
    loader = sampling.RankLoader(4, generator, 1, 0)
    reference = sampling.data_generator(0)
    for _ in range(3):
        assert as_lists(loader.epoch(data(11))) == as_lists(per_epoch(data(11), 4, reference, 1, 0))
    first = as_lists(sampling.RankLoader(4, sampling.data_generator(0), 1, 0).epoch(data(11)))
    perm = torch.randperm(11, generator=sampling.data_generator(0)).tolist()
    assert first == [(4, perm[:4]), (4, perm[4:8]), (3, perm[8:])]


class PerEpoch:
    """`sampling.RankLoader` as the run read its batches before it: a DataLoader per epoch."""

    def __init__(self, batch_size, generator, world, rank, pin_memory=False):
        self.args = batch_size, generator, world, rank

    def epoch(self, dataset, workers=0):
        return per_epoch(dataset, *self.args, workers)


argv = partial(helpers.argv, heldout=4, batch_size=15, device=None,
               first=("--epochs", 2, "--no-epoch-test", "--model_batch", 2, "--models_epochs", 2))


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_mehl_soup_is_bit_identical_to_a_loader_per_epoch(tmp_path, fmnist_root, monkeypatch, workers):
    """Two models-epochs of two groups of two epochs: 8 epochs, read through one DataLoader."""
    zoo = make_zoo(tmp_path / "zoo", 3)
    made = []
    monkeypatch.setattr(sampling, "DataLoader", lambda *a, **kw: made.append(kw) or DataLoader(*a, **kw))
    flags = ("--workers", workers, "--decode-cache", "none")
    now = mehl.main(argv(zoo, fmnist_root, tmp_path / "now", *flags))
    assert len(made) == 1 and made[0]["persistent_workers"] == (workers > 0)
    assert made[0]["pin_memory"] is False  # on CUDA only
    monkeypatch.setattr(mehl.sampling, "RankLoader", PerEpoch)
    before = mehl.main(argv(zoo, fmnist_root, tmp_path / "before", *flags))
    a = torch.load(tmp_path / "now" / "soup.pt", weights_only=True)
    b = torch.load(tmp_path / "before" / "soup.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [g["heldout_loss"] for g in now["groups"]] == [g["heldout_loss"] for g in before["groups"]]
