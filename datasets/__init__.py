"""Dataset registry: `--datasets NAME` -> builder(root, preprocess, **options) -> DataBundle.

This package is named `datasets` (the user's layout) and so shadows Hugging Face's `datasets` inside
the scripts: nothing here may import the latter.
"""
import importlib
import logging

from datasets.base import DataBundle, EvalSet  # noqa: F401
from datasets.heldout import heldout_split, per_class_split  # noqa: F401
from datasets.images import FINETUNE_SETS, SOUP_SETS, check_images  # noqa: F401
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

# name -> (module, builder function); modules are imported on use so that one family's optional
# dependency never breaks another.
REGISTRY = {
    "FashionMNIST": ("datasets.fashion_mnist", "build_fashion_mnist"),
    "ImageNet": ("datasets.imagenet", "build_imagenet"),
    "CIFAR10": ("datasets.cifar", "build_cifar10"),
    "CIFAR100": ("datasets.cifar", "build_cifar100"),
    "ImageFolder": ("datasets.image_folder", "build_image_folder"),   # the user's own images
}


def build_dataset(name, root, preprocess, sets=SOUP_SETS, skip_bad_images=False, **options):
    """Build the DataBundle of dataset `name`, every image file of its `sets` checked before any work
    (datasets/images.py: a bad one is a UserError naming it, or with `skip_bad_images` dropped with a
    warning and recorded in the split record).

    options (each builder accepts them all; None means the dataset's default):
      heldout_per_class, heldout_index (path of a 0/1 .npy over the sorted train set), seed (of the drawn
      split), test_size (subsample test and each shift to this many images), finetune_size (subsample
      the fine-tune split), train_preprocess (transform for the fine-tune split; default `preprocess`).
    """
    match = {k.lower(): k for k in REGISTRY}.get(name.lower())
    if match is None:
        raise UserError(f"unknown --datasets {name!r}; known: {', '.join(REGISTRY)}")
    module, fn = REGISTRY[match]
    try:
        bundle = getattr(importlib.import_module(module), fn)(root, preprocess, **options)
    except (IndexError, KeyError, ValueError, RuntimeError, OSError) as err:
        # Files that exist but hold something else (swapped or foreign files) fail deep in a builder.
        log.debug("building %s failed", name, exc_info=True)
        raise UserError(f"--datasets {name} at --data-location {root or '(default)'}: the files do not have "
                        f"the expected layout or content ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); see docs/DATA.md") from err
    return check_images(bundle, sets, skip_bad_images)
