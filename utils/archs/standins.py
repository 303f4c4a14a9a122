"""Stand-in inputs for benchmarks at the real size when the real ones are absent: ingredients of an
architecture in its checkpoint layout (its start plus seeded perturbations) and an ImageNet-like tree
of random images of the architecture's input size. Nothing is downloaded."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.archs import get_arch
from utils.files.ingredients import available
from utils.runtime.errors import UserError


def input_size(spec, default=224):
    """The side of the arch's eval images (its Resize), for synthetic data."""
    for t in getattr(spec.preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size:
            return size[0] if isinstance(size, (list, tuple)) else size
    return default


def write_synthetic_zoo(folder, n, arch, num_classes, scale=0.01):
    """n stand-ins for fine-tuned ingredients in the arch's checkpoint layout: the start plus seeded
    Gaussian perturbations of `scale` times each tensor's standard deviation on every parameter that
    fine-tuning moves (frozen ones, such as CLIP's text leftovers, stay identical, as published).
    Refuses a folder that already holds ingredients."""
    folder = Path(folder)
    if available(folder):
        raise UserError(f"--synthetic-zoo: {folder} already holds ingredients")
    folder.mkdir(parents=True, exist_ok=True)
    model = get_arch(arch).build(num_classes, pretrained=False)
    moved = {k for k, p in model.named_parameters() if p.requires_grad}
    base = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if k in moved:
                spread = float(v.float().std()) if v.numel() > 1 else 0.0
                spread = spread or float(v.float().abs().mean()) or 1.0
                sd[k] = v + scale * spread * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            else:
                sd[k] = v.clone()
        torch.save(sd, folder / f"model_{i}.pt")


def write_synthetic_imagenet(root, num_classes, per_class, size):
    """An ImageNet-like tree (imagenet/train and imagenet/val, wnid folders) of random RGB images."""
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        wnid = f"n{c:08d}"
        for split, count in (("train", per_class), ("val", 1)):
            folder = Path(root) / "imagenet" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{j}.png")
