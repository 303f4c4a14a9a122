"""Architecture registry: `--arch NAME` -> ArchSpec (how to build the model, how to preprocess).

Every builder takes (num_classes, pretrained). Soup scripts build with pretrained=False: the
ingredients supply every weight.

Besides the registered names, `--arch` takes any timm model as `timm:<name>[@<size>]`
(utils/archs/timm_models.py) and the user's own model as `package.module:factory` (utils/archs/factory.py).

An architecture may also declare where a frozen prefix of its network ends (`register_split`): the soups
run such a prefix once per data set (utils/run/prefix.py) and finetune.py freezes one."""
from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.transforms import v2

from utils.runtime.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ArchSpec:
    name: str
    build: Callable            # (num_classes, pretrained) -> nn.Module
    preprocess: Callable       # per-sample eval transform: PIL image or uint8 tensor -> float tensor
    train_preprocess: Callable # per-sample transform for fine-tuning before augmentation is added
    is_vit: bool = False       # MEHL clips the gradient norm to 1 for ViTs, as released
    frozen_blocks: int = 0     # blocks finetune.py freezes by default (a split at this depth, below)


def to_rgb(img):
    """Grey images (1 channel) become 3-channel, so every arch sees RGB."""
    if isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == 1:
        return img.expand(3, -1, -1)
    return img


def pil_rgb(img):
    """A PIL RGB image from a PIL image or an image tensor (grey or RGB, uint8 or float in [0, 1])."""
    from PIL import Image
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    return v2.functional.to_pil_image(to_rgb(img))


def pil_rgb_then(transform):
    """`transform` (written for PIL RGB images, as timm's and most users' are) on any image the
    datasets give: PIL images, or uint8 tensors such as Fashion-MNIST's grey ones."""
    return v2.Compose([v2.Lambda(pil_rgb), transform])


def image_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=v2.InterpolationMode.BILINEAR,
                    crop=True):
    steps = [v2.ToImage(), v2.Lambda(to_rgb), v2.RGB(),
             v2.Resize(size, interpolation=interpolation, antialias=True)]
    if crop:
        steps.append(v2.CenterCrop(size))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


ARCHS = {}  # name -> ArchSpec, filled by `register` (the modules imported at the end of this file)
ALIASES = {}


def register(spec, *aliases):
    ARCHS[spec.name] = spec
    for a in aliases:
        ALIASES[a] = spec.name


_DYNAMIC = {}  # timm:<name> and package.module:factory specs, made once per process


def get_arch(name):
    if name.lower().startswith("timm:") or ":" in name:
        if name not in _DYNAMIC:
            if name.lower().startswith("timm:"):
                from utils.archs import timm_models
                _DYNAMIC[name] = timm_models.spec("timm:" + name[len("timm:"):])
            else:
                from utils.archs import factory
                _DYNAMIC[name] = factory.spec(name)
        return _DYNAMIC[name]
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ARCHS:
        known = sorted(ARCHS) + sorted(ALIASES)
        raise UserError(f"unknown --arch {name!r}; known: {', '.join(known)}, timm:<name>, "
                        "package.module:factory")
    return ARCHS[key]


# ------------------------------------------------------------------- where a frozen prefix ends
@dataclass(frozen=True)
class Split:
    """A model cut in two: head(x) -> tail gives model(x) when every module of the prefix is in eval mode."""
    keys: tuple        # the prefix's state-dict keys (parameters and buffers)
    modules: tuple     # its modules: every one must be in eval mode for head to be a fixed function
    head: Callable     # images -> the prefix's output
    tail: Callable     # the prefix's output -> logits (the rest of the model)


_SPLITS = {}  # model class -> make(model, blocks) -> Split


def register_split(model_class, make):
    """`make(model, blocks)` gives the Split of a model of exactly `model_class` after its first `blocks`
    blocks (blocks=None: the prefix the default zoo leaves frozen, which the soups run once)."""
    _SPLITS[model_class] = make


def split_of(model, blocks=None):
    """The Split `model`'s architecture declares (at `blocks`, see `register_split`), or None."""
    make = _SPLITS.get(type(model))
    return None if make is None else make(model, blocks)


# The families register themselves on import (after ArchSpec / register exist above).
from utils.archs import clip, effnet  # noqa: E402,F401
