"""`--datasets ImageFolder`: the user's own images, in torchvision's ImageFolder layout.

    <root>/train/<class>/*.jpg        fine-tune + held-out split (class index = sorted folder names)
    <root>/val/<class>/*              test: the same classes as train
    <root>/shifts/<name>/<class>/*    optional shift sets, each reported on its own and in the mean;
                                      a shift may hold fewer classes than train (its logits are then the
                                      model's restricted to its classes, as for ImageNet-R/A)

The held-out split is drawn per class from train with a seed (default: a tenth of the smallest class,
at most ImageNet's 26, at least 1; `--heldout-per-class` to choose), or read from a 0/1 index file over
the sorted ImageFolder of <root>/train (1 = held-out), as for ImageNet. Image files are those
torchvision's ImageFolder takes (by extension), listed in its order. Every check (layout, class names,
empty class folders) fails with one line before any image is opened; then the header of every image
file the run will read is checked (datasets/images.py)."""
import logging
from pathlib import Path

import numpy as np

from datasets.base import DataBundle, EvalSet
from datasets.heldout import check_source, heldout_split, subsample
from datasets.images import ImageFiles, shrink, subset
from datasets.imagenet import IMG_EXTENSIONS, SelectLogits, list_classes, subfolders
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

MAX_HELDOUT_PER_CLASS = 26    # ImageNet's 2 percent
HELDOUT_FRACTION = 0.1        # of the smallest train class, for folders smaller than ImageNet


def _show(names, limit=8):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def class_folders(folder, what):
    """Sorted class folder names of `folder` (a UserError when it is missing or holds none)."""
    if not folder.is_dir():
        raise UserError(f"ImageFolder: {folder} not found; expected {what}/<class>/<images> "
                        "(see README, 'Your own zoo')")
    names = subfolders(folder)
    if not names:
        raise UserError(f"ImageFolder: no class folders in {folder}; expected {what}/<class>/<images>")
    return names


def check_classes(folder, names, train, allow_missing=False):
    """A folder's classes must be train's (a shift's may be fewer): one line naming the missing and the
    extra ones."""
    known, present = set(train), set(names)
    extra = [n for n in names if n not in known]
    missing = [n for n in train if n not in present]
    if extra or (missing and not allow_missing):
        parts = ([f"missing {len(missing)}: {_show(missing)}"] if missing and not allow_missing else []) + \
                ([f"extra {len(extra)}: {_show(extra)}"] if extra else [])
        raise UserError(f"ImageFolder: the classes of {folder} differ from those of train "
                        f"({len(train)} classes): {'; '.join(parts)}")


def list_set(folder, names, labels, desc):
    """Paths and labels of every class folder; an empty class folder is a UserError naming it."""
    paths, out = list_classes(folder, names, labels, desc)
    counts = np.bincount(out, minlength=max(labels, default=-1) + 1) if len(out) else np.zeros(0, int)
    empty = [n for n, c in zip(names, labels) if c >= len(counts) or counts[c] == 0]
    if empty:
        raise UserError(f"ImageFolder: {len(empty)} class folder(s) of {folder} hold no images "
                        f"({', '.join(IMG_EXTENSIONS)}): {_show(empty)}")
    return paths, out


def shift_sets(root, classes, preprocess):
    """Every <root>/shifts/<name>, sorted by name; none when the folder is absent."""
    base = Path(root) / "shifts"
    if not base.is_dir():
        return []
    index = {c: i for i, c in enumerate(classes)}
    shifts = []
    for name in subfolders(base):
        folder = base / name
        names = class_folders(folder, f"shifts/{name}")
        check_classes(folder, names, classes, allow_missing=True)
        paths, labels = list_set(folder, names, range(len(names)), f"shift {name}")
        # Labels are positions among the shift's own classes; its logits are the model's columns of
        # those classes, in that order (the identity when it has them all).
        project = None if names == classes else SelectLogits([index[n] for n in names])
        shifts.append(EvalSet(name, ImageFiles(paths, labels, preprocess), project=project))
    return shifts


def build_image_folder(root, preprocess, heldout_per_class=None, heldout_index=None, seed=0,
                       test_size=None, finetune_size=None, train_preprocess=None):
    if root is None:
        raise UserError("ImageFolder needs --data-location (the folder holding train/<class>/ and "
                        "val/<class>/)")
    check_source(heldout_per_class, heldout_index)
    root = Path(root)
    classes = class_folders(root / "train", "train")
    val_classes = class_folders(root / "val", "val")
    check_classes(root / "val", val_classes, classes)
    train_paths, train_labels = list_set(root / "train", classes, range(len(classes)), "train")
    shifts = shift_sets(root, classes, preprocess)
    val_paths, val_labels = list_set(root / "val", classes, range(len(classes)), "val")

    smallest = int(np.bincount(train_labels).min())
    default = max(1, min(MAX_HELDOUT_PER_CLASS, int(HELDOUT_FRACTION * smallest)))
    mask, split = heldout_split(train_labels, default, heldout_per_class, heldout_index, seed,
                                f"the sorted ImageFolder of {root / 'train'}")
    held, rest = np.flatnonzero(mask), np.flatnonzero(~mask)
    lacking = sorted(set(range(len(classes))) - set(train_labels[rest].tolist()))
    if lacking:
        log.warning("ImageFolder: the held-out split takes every train image of %s: the fine-tune split "
                    "lacks them", _show([classes[c] for c in lacking]))
    rest = rest[subsample(len(rest), finetune_size, seed + 1)]
    keep = subsample(len(val_paths), test_size, seed + 2)
    shifts = [shrink(s, test_size, seed + 3 + k) for k, s in enumerate(shifts)]
    split.update(heldout_size=len(held), finetune_size=len(rest), test_size=len(keep), folder=str(root),
                 classes=len(classes), shifts=[s.name for s in shifts])
    return DataBundle(
        name="ImageFolder", num_classes=len(classes),
        finetune=ImageFiles(*subset(train_paths, train_labels, rest), train_preprocess or preprocess),
        heldout=ImageFiles(*subset(train_paths, train_labels, held), preprocess),
        test=EvalSet("test", ImageFiles(*subset(val_paths, val_labels, keep), preprocess)),
        shifts=shifts, split=split)
