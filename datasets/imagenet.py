"""ImageNet (ILSVRC-2012) and its five distribution shifts, from local folders (layout: docs/DATA.md).

    <root>/imagenet/train/<wnid>/*.JPEG      fine-tune + held-out split (class index = sorted wnid order)
    <root>/imagenet/val/<wnid>/*             test
    <root>/imagenetv2-matched-frequency-format-val/<0..999>/*
    <root>/sketch/<wnid>/*
    <root>/imagenet-r/<wnid>/*   <root>/imagenet-a/<wnid>/*          (200 classes each)
    <root>/objectnet-1.0/images/<folder>/*  + objectnet-1.0/mappings/*  (113 classes mapped to ImageNet)

The held-out split is 26 train images per class (the paper's "2 percent"), drawn with a seed, or read
from the user's 0/1 index file over the sorted ImageFolder of train (1 = held-out) to get the exact
published split. A shift whose folder is absent is skipped with one warning and reported as missing.
Files are listed with os.scandir (ImageNet train holds 1.28M files) in ImageFolder's order.
"""
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.base import DataBundle, EvalSet
from datasets.heldout import check_source, heldout_split, subsample
from datasets.images import ImageFiles, shrink, subset
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_HELDOUT_PER_CLASS = 26
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
V2_DIR = "imagenetv2-matched-frequency-format-val"
OBJECTNET_DIR = "objectnet-1.0"
OBJECTNET_BORDER = 2  # ObjectNet images carry a 1-2 pixel border; the reference evaluation crops 2
OBJECTNET_MAPPINGS = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                      "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")


# ------------------------------------------------------------------------------------- listing
def subfolders(folder):
    """Sorted names of the sub-folders of `folder` (symlinks followed, as ImageFolder does)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir())


def list_images(folder):
    """Image files under `folder`, recursively, in ImageFolder's order (directories by path, files by
    name), so that an index file over torchvision's ImageFolder lines up with this list."""
    found, stack = [], [str(folder)]
    while stack:
        d = stack.pop()
        files = []
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir():
                    stack.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    files.append(e.name)
        found.append((d, sorted(files)))
    return [os.path.join(d, f) for d, files in sorted(found) for f in files]


def list_classes(folder, names, labels, desc):
    """Paths and labels of the images under folder/<name> for each name (labels[i] for names[i])."""
    paths, out = [], []
    for name, label in tqdm(list(zip(names, labels)), desc=f"listing {desc}", leave=False):
        files = list_images(os.path.join(folder, name))
        paths += files
        out += [label] * len(files)
    return paths, np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------- projections
class SelectLogits:
    """Keep the logit columns `columns` (the 1000-way logits restricted to a 200-class shift)."""

    def __init__(self, columns):
        self.columns = torch.as_tensor(columns, dtype=torch.long)

    def __call__(self, logits):
        return logits[:, self.columns.to(logits.device)]


class MaxOverLogits:
    """Class k's logit is the max over the logits of groups[k] (ObjectNet: one class, several
    ImageNet classes)."""

    def __init__(self, groups):
        self.groups = [torch.as_tensor(g, dtype=torch.long) for g in groups]

    def __call__(self, logits):
        return torch.stack([logits[:, g.to(logits.device)].max(1).values for g in self.groups], 1)


# -------------------------------------------------------------------------------------- helpers
def _missing(name, reason):
    log.warning("shift %s skipped: %s", name, reason)
    return EvalSet(name, None, missing=reason)


def _wnid_labels(folder, wnids, name):
    """Labels of a shift's wnid folders in the ImageNet class index; a foreign folder is an error."""
    index = {w: i for i, w in enumerate(wnids)}
    names = subfolders(folder)
    unknown = [n for n in names if n not in index]
    if unknown:
        raise UserError(f"{folder}: {name} folders must be ImageNet wnids of {name}'s classes; not in "
                        f"ImageNet train: {', '.join(unknown[:5])}")
    return names, [index[n] for n in names]


# ------------------------------------------------------------------------------------- the shifts
def imagenet_v2(root, wnids, preprocess):
    folder = Path(root) / V2_DIR
    if not folder.is_dir():
        return _missing("ImageNetV2", f"{folder} not found")
    names = subfolders(folder)
    # Folders are named by class index; an ImageFolder would sort them as strings ("10" < "2").
    bad = [n for n in names if not n.isdigit() or int(n) >= len(wnids)]
    if bad:
        raise UserError(f"{folder}: expected class folders 0..{len(wnids) - 1}, found {', '.join(bad[:5])}")
    paths, labels = list_classes(folder, names, [int(n) for n in names], "ImageNetV2")
    return EvalSet("ImageNetV2", ImageFiles(paths, labels, preprocess))


def imagenet_sketch(root, wnids, preprocess):
    folder = Path(root) / "sketch"
    if not folder.is_dir():
        return _missing("ImageNet-Sketch", f"{folder} not found")
    names, labels = _wnid_labels(folder, wnids, "ImageNet-Sketch")
    paths, labels = list_classes(folder, names, labels, "ImageNet-Sketch")
    return EvalSet("ImageNet-Sketch", ImageFiles(paths, labels, preprocess))


def imagenetsubset(root, wnids, preprocess, name, dirname):
    """ImageNet-R / ImageNet-A: a subset of the wnids; label = position among the set's sorted wnids,
    logits = the 1000-way logits restricted to those classes (in the same order)."""
    folder = Path(root) / dirname
    if not folder.is_dir():
        return _missing(name, f"{folder} not found")
    names, columns = _wnid_labels(folder, wnids, name)
    paths, labels = list_classes(folder, names, range(len(names)), name)
    return EvalSet(name, ImageFiles(paths, labels, preprocess), project=SelectLogits(columns))


def objectnet_classes(mappings, num_classes):
    """From the release's mapping files: {image folder: [ImageNet class indices]} for the ObjectNet
    classes that map onto ImageNet.

    folder_to_objectnet_label.json   folder -> ObjectNet class name
    objectnet_to_imagenet_1k.json    ObjectNet class name -> ImageNet class names joined by '; '
    imagenet_to_label_2012_v2        line i: the name of ILSVRC-2012 id i
    pytorch_to_imagenet_2012_id.json class index (sorted wnid order) -> ILSVRC-2012 id
    """
    mappings = Path(mappings)
    try:
        folder_of = {label: folder for folder, label in
                     json.loads((mappings / OBJECTNET_MAPPINGS[0]).read_text()).items()}
        to_imagenet = json.loads((mappings / OBJECTNET_MAPPINGS[1]).read_text())
        pytorch_to_id = json.loads((mappings / OBJECTNET_MAPPINGS[2]).read_text())
        index_of_id = {int(v): int(k) for k, v in pytorch_to_id.items()}
        lines = (mappings / OBJECTNET_MAPPINGS[3]).read_text().splitlines()
        # As in the reference evaluation, a repeated ImageNet name resolves to its last id.
        index_of_name = {name.strip(): index_of_id[i] for i, name in enumerate(lines) if name.strip()}
        groups = {}
        for objectnet_name, imagenet_names in to_imagenet.items():
            ids = [index_of_name[n.strip()] for n in imagenet_names.split("; ")]
            groups[folder_of[objectnet_name]] = sorted(ids)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{mappings}: the ObjectNet mapping files do not fit together ({type(err).__name__}: "
                        f"{err})") from err
    too_big = [f for f, g in groups.items() if max(g) >= num_classes]
    if too_big:
        raise UserError(f"{mappings}: ObjectNet classes {', '.join(too_big[:5])} map beyond the "
                        f"{num_classes} ImageNet classes")
    return groups


def objectnet(root, wnids, preprocess):
    folder = Path(root) / OBJECTNET_DIR
    if not (folder / "images").is_dir():
        return _missing("ObjectNet", f"{folder / 'images'} not found")
    absent = [m for m in OBJECTNET_MAPPINGS if not (folder / "mappings" / m).is_file()]
    if absent:
        return _missing("ObjectNet", f"mapping files not found in {folder / 'mappings'}: {', '.join(absent)}")
    groups = objectnet_classes(folder / "mappings", len(wnids))
    names = sorted(groups)
    present = [n for n in names if (folder / "images" / n).is_dir()]
    if len(present) < len(names):
        log.warning("ObjectNet: %d of %d mapped class folders absent under %s", len(names) - len(present),
                    len(names), folder / "images")
    paths, labels = list_classes(folder / "images", present, [names.index(n) for n in present], "ObjectNet")
    return EvalSet("ObjectNet", ImageFiles(paths, labels, preprocess, border=OBJECTNET_BORDER),
                   project=MaxOverLogits([groups[n] for n in names]))


# ----------------------------------------------------------------------------------------- bundle
def _check_layout(root):
    base = Path(root) / "imagenet"
    for part in ("train", "val"):
        if not (base / part).is_dir():
            raise UserError(f"ImageNet: {base / part} not found; expected {base}/train/<wnid>/*.JPEG and "
                            f"{base}/val/<wnid>/* (val sorted into class folders; see docs/DATA.md)")
    wnids = subfolders(base / "train")
    if not wnids:
        raise UserError(f"ImageNet: no class folders in {base / 'train'}; expected train/<wnid>/*.JPEG")
    val = subfolders(base / "val")
    if val != wnids:
        diff = sorted(set(val) ^ set(wnids))
        raise UserError(f"ImageNet: {base / 'val'} must hold the same {len(wnids)} wnid folders as train "
                        f"(val unsorted into class folders?); differing: {', '.join(diff[:5]) or 'none'}"
                        f" ({len(val)} folders in val)")
    return base, wnids


def build_imagenet(root, preprocess, heldout_per_class=None, heldout_index=None, seed=0, test_size=None,
                   finetune_size=None, train_preprocess=None):
    if root is None:
        raise UserError("ImageNet needs --data-location (the folder holding imagenet/train and imagenet/val)")
    check_source(heldout_per_class, heldout_index)   # before listing 1.28M files
    base, wnids = _check_layout(root)
    train_paths, train_labels = list_classes(base / "train", wnids, range(len(wnids)), "ImageNet train")
    if len(train_paths) == 0:
        raise UserError(f"ImageNet: no images under {base / 'train'} (extensions {', '.join(IMG_EXTENSIONS)})")

    mask, split = heldout_split(train_labels, DEFAULT_HELDOUT_PER_CLASS, heldout_per_class, heldout_index, seed,
                                f"the sorted ImageFolder of {base / 'train'}")
    held, rest = np.flatnonzero(mask), np.flatnonzero(~mask)
    if len(np.unique(train_labels[rest])) < len(wnids):
        log.warning("ImageNet: the held-out split takes every train image of some classes; the fine-tune "
                    "split lacks them")
    rest = rest[subsample(len(rest), finetune_size, seed + 1)]

    val_paths, val_labels = list_classes(base / "val", wnids, range(len(wnids)), "ImageNet val")
    keep = subsample(len(val_paths), test_size, seed + 2)
    test = EvalSet("test", ImageFiles(*subset(val_paths, val_labels, keep), preprocess))

    shifts = [imagenet_v2(root, wnids, preprocess), imagenet_sketch(root, wnids, preprocess),
              imagenetsubset(root, wnids, preprocess, "ImageNet-R", "imagenet-r"),
              objectnet(root, wnids, preprocess),
              imagenetsubset(root, wnids, preprocess, "ImageNet-A", "imagenet-a")]
    shifts = [shrink(s, test_size, seed + 3 + k) for k, s in enumerate(shifts)]
    split.update(heldout_size=len(held), finetune_size=len(rest), test_size=len(keep), folder=str(base),
                 missing_shifts=[s.name for s in shifts if s.dataset is None])
    return DataBundle(
        name="ImageNet", num_classes=len(wnids),
        finetune=ImageFiles(*subset(train_paths, train_labels, rest), train_preprocess or preprocess),
        heldout=ImageFiles(*subset(train_paths, train_labels, held), preprocess),
        test=test, shifts=shifts, split=split)
