"""FashionMNIST builder: splits disjoint and deterministic, corruptions deterministic, clear errors."""
import numpy as np
import pytest
import torch

from datasets import build_dataset
from datasets.fashion_mnist import CORRUPTIONS, corrupt
from tests.models import TINY_CNN
from utils.archs import get_arch
from utils.runtime.errors import UserError


def build(root, **kw):
    return build_dataset("FashionMNIST", str(root), get_arch(TINY_CNN).preprocess, **kw)


def train_ids(ds):
    """Identify images by their bytes (the tiny fixture has no duplicate images)."""
    return {bytes(ds.images[i].numpy().tobytes()) for i in range(len(ds))}


def test_splits_disjoint_balanced_and_deterministic(fmnist_root):
    a = build(fmnist_root, heldout_per_class=7, seed=3)
    b = build(fmnist_root, heldout_per_class=7, seed=3)
    c = build(fmnist_root, heldout_per_class=7, seed=4)
    assert len(a.heldout) == 70 and len(a.finetune) == 600 - 70
    assert np.bincount(a.heldout.labels, minlength=10).tolist() == [7] * 10
    assert not train_ids(a.heldout) & train_ids(a.finetune)
    assert torch.equal(a.heldout.images, b.heldout.images)
    assert not torch.equal(a.heldout.images, c.heldout.images)
    assert a.split["per_class"] == 7 and a.split["seed"] == 3


def test_subsampling_and_items(fmnist_root):
    b = build(fmnist_root, heldout_per_class=5, finetune_size=100, test_size=50)
    assert len(b.finetune) == 100 and len(b.test.dataset) == 50
    x, y = b.test.dataset[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    assert [s.name for s in b.shifts] == list(CORRUPTIONS)
    assert all(len(s.dataset) == 50 and torch.equal(s.dataset.labels, b.test.dataset.labels)
               if isinstance(s.dataset.labels, torch.Tensor) else
               np.array_equal(s.dataset.labels, b.test.dataset.labels) for s in b.shifts)


def test_corruptions_deterministic_and_change_images(fmnist_root):
    b = build(fmnist_root, heldout_per_class=5)
    clean = b.test.dataset.images
    for name in CORRUPTIONS:
        one, two = corrupt(clean, name, seed=11), corrupt(clean, name, seed=11)
        assert one.dtype == torch.uint8 and one.shape == clean.shape
        assert torch.equal(one, two), name
        assert not torch.equal(one, clean), name
    assert not torch.equal(corrupt(clean, "gaussian_noise", 1), corrupt(clean, "gaussian_noise", 2))


def test_heldout_index_file(fmnist_root, tmp_path):
    mask = np.zeros(600, dtype=np.int64)
    mask[::10] = 1
    np.save(tmp_path / "idx.npy", mask)
    b = build(fmnist_root, heldout_index=str(tmp_path / "idx.npy"))
    assert len(b.heldout) == 60 and b.split["heldout"] == "index file"
    np.save(tmp_path / "bad.npy", mask[:-1])
    with pytest.raises(UserError, match="length 600"):
        build(fmnist_root, heldout_index=str(tmp_path / "bad.npy"))


def test_missing_files_and_unknown_name(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        build(tmp_path)
    with pytest.raises(UserError, match="known: FashionMNIST"):
        build_dataset("FashionMNSIT", None, None)


def test_eval_cache_gives_the_same_items(fmnist_root):
    b = build(fmnist_root, heldout_per_class=5, test_size=30)
    tf = b.test.dataset.transform
    for i in (0, 7, 29):
        x, y = b.test.dataset[i]
        torch.testing.assert_close(x, tf(b.test.dataset.images[i]), rtol=0, atol=0)
        assert y == int(b.test.dataset.labels[i])
    assert b.finetune.cached is False  # training transforms may be random: never cached
