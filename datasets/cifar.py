"""CIFAR-10 / CIFAR-100 from the official python-pickle batches (layout: docs/DATA.md).

    <root>/cifar-10-batches-py/data_batch_1..5, test_batch
    <root>/cifar-100-python/train, test

These are the data sets' own format (python pickles of dicts with bytes keys, written by Python 2,
hence encoding="bytes"). A pickle can run code when loaded, so they are read with an unpickler that
only resolves the few numpy names an array needs and refuses everything else. The held-out split is
drawn per class from train with a seed (default 2 percent of train, as for ImageNet); no shift sets.
"""
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datasets.base import DataBundle, EvalSet
from datasets.heldout import check_source, heldout_split, subsample
from utils.runtime.errors import UserError

LAYOUT = {
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "CIFAR100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
HELDOUT_FRACTION = 0.02
# What a pickled numpy array needs (numpy 1 and numpy 2 module names); nothing else may be resolved.
ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
           ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def read_batch(path, label_key):
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) of one pickle batch."""
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
        raise UserError(f"{path}: not a CIFAR python batch ({type(err).__name__}: {err})") from err
    if len(data) != len(labels):
        raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
    return np.ascontiguousarray(data), labels


class ImageArrays(Dataset):
    """uint8 HWC images and labels; each image goes to `transform` as a PIL image."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _read(root, name):
    folder_name, train_files, test_files, label_key, num_classes = LAYOUT[name]
    if root is None:
        raise UserError(f"{name} needs --data-location (the folder holding {folder_name}/)")
    folder = Path(root) / folder_name
    files = train_files + test_files
    for f in files:
        if not (folder / f).is_file():
            raise UserError(f"{name}: {folder / f} not found; expected the python version of the data set "
                            f"unpacked under --data-location ({folder_name}/{', '.join(files)})")
    parts = {k: [read_batch(folder / f, label_key) for f in files]
             for k, files in (("train", train_files), ("test", test_files))}
    out = {k: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for k, v in parts.items()}
    for k, (_, labels) in out.items():
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"{folder}: {k} labels outside 0..{num_classes - 1}")
    return folder, num_classes, out


def _build(name, root, preprocess, heldout_per_class, heldout_index, seed, test_size, finetune_size,
           train_preprocess):
    check_source(heldout_per_class, heldout_index)
    folder, num_classes, data = _read(root, name)
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    default = max(1, round(HELDOUT_FRACTION * len(train_y) / num_classes))
    mask, split = heldout_split(train_y, default, heldout_per_class, heldout_index, seed,
                                f"the train batches of {folder}")
    held, rest = np.flatnonzero(mask), np.flatnonzero(~mask)
    rest = rest[subsample(len(rest), finetune_size, seed + 1)]
    keep = subsample(len(test_y), test_size, seed + 2)
    split.update(heldout_size=len(held), finetune_size=len(rest), test_size=len(keep), folder=str(folder))
    return DataBundle(
        name=name, num_classes=num_classes,
        finetune=ImageArrays(train_x[rest], train_y[rest], train_preprocess or preprocess),
        heldout=ImageArrays(train_x[held], train_y[held], preprocess),
        test=EvalSet("test", ImageArrays(test_x[keep], test_y[keep], preprocess)),
        shifts=[], split=split)


def build_cifar10(root, preprocess, heldout_per_class=None, heldout_index=None, seed=0, test_size=None,
                  finetune_size=None, train_preprocess=None):
    return _build("CIFAR10", root, preprocess, heldout_per_class, heldout_index, seed, test_size,
                  finetune_size, train_preprocess)


def build_cifar100(root, preprocess, heldout_per_class=None, heldout_index=None, seed=0, test_size=None,
                   finetune_size=None, train_preprocess=None):
    return _build("CIFAR100", root, preprocess, heldout_per_class, heldout_index, seed, test_size,
                  finetune_size, train_preprocess)
