"""CIFAR builders on tiny batches written in the official python-pickle format (protocol 2 dicts with
bytes keys: b"data" as N x 3072 uint8 rows of R, G, B planes, labels as a list)."""
import os
import pickle

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from datasets import build_dataset
from datasets.cifar import build_cifar10, build_cifar100, read_batch
from utils.runtime.errors import UserError

TO_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def planes(labels):
    """Images whose red plane encodes the label, green = 20, blue = 30, and pixel (row 0, col 1) of the
    red plane set to 255 (to check the plane/row layout)."""
    data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    data[:, 0] = (np.asarray(labels) * 2)[:, None, None]
    data[:, 1], data[:, 2] = 20, 30
    data[:, 0, 0, 1] = 255
    return data.reshape(len(labels), 3072)


def write_batch(path, labels, label_key):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", label_key: list(map(int, labels)), b"data": planes(labels)}, f,
                    protocol=2)


@pytest.fixture
def root(tmp_path):
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for i in range(1, 6):
        write_batch(c10 / f"data_batch_{i}", np.arange(20) % 10, b"labels")
    write_batch(c10 / "test_batch", np.arange(30) % 10, b"labels")
    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    write_batch(c100 / "train", np.arange(300) % 100, b"fine_labels")
    write_batch(c100 / "test", np.arange(100), b"fine_labels")
    return tmp_path


def test_cifar10_layout_and_split(root):
    b = build_dataset("cifar10", root, TO_TENSOR, heldout_per_class=3, seed=1)
    assert b.num_classes == 10 and b.shifts == []
    assert len(b.heldout) == 30 and len(b.finetune) == 70 and len(b.test.dataset) == 30
    assert np.bincount(b.heldout.labels, minlength=10).tolist() == [3] * 10
    # held-out and fine-tune are disjoint parts of train: each train row is used once
    assert len(b.heldout) + len(b.finetune) == 100
    x, y = b.test.dataset[7]
    assert x.shape == (3, 32, 32) and y == 7
    assert round(x[0, 5, 5].item() * 255) == 14 and round(x[1, 5, 5].item() * 255) == 20
    assert round(x[0, 0, 1].item() * 255) == 255 and round(x[0, 1, 0].item() * 255) == 14
    again = build_cifar10(root, TO_TENSOR, heldout_per_class=3, seed=1)
    assert np.array_equal(again.heldout.images, b.heldout.images)
    assert b.split["heldout"] == "drawn" and b.split["seed"] == 1


def test_cifar100_default_heldout_and_sizes(root):
    b = build_cifar100(root, TO_TENSOR, test_size=10, finetune_size=50)
    assert b.num_classes == 100
    assert b.split["per_class"] == 1            # 2 percent of 300 images over 100 classes, at least 1
    assert len(b.heldout) == 100 and len(b.finetune) == 50 and len(b.test.dataset) == 10


def test_missing_files_name_the_path(tmp_path, root):
    with pytest.raises(UserError, match="cifar-100-python/train not found"):
        build_cifar100(tmp_path / "nowhere", TO_TENSOR)
    os.remove(root / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match="data_batch_3 not found"):
        build_cifar10(root, TO_TENSOR)


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(UserError, match="refused to load"):
        read_batch(tmp_path / "evil", b"labels")
    assert not (tmp_path / "pwned").exists()
