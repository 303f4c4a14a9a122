"""Stand-in inputs for the benchmarks (bench_*.py, gpu_check), paper_scale.py and the tests that run the
whole job at the real size when the real inputs are absent:
ingredients of an architecture in its checkpoint layout (its start plus seeded perturbations), an
ImageNet-like tree of random images of the architecture's input size, and an ImageNet-shaped tree of
real JPEG files at ImageNet's size with the five shift folders laid out as `datasets/imagenet.py` reads
them. Nothing is downloaded."""
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils.archs import get_arch
from utils.files.ingredients import available, ingredient_file
from utils.runtime.errors import UserError

# ImageNet's JPEGs: most are 500 x 375 (or 375 x 500), saved at a quality near 90, about 110 KB.
JPEG_SIZE = (500, 375)
JPEG_QUALITY = 90
JPEG_POOL = 64          # distinct images, written round-robin (encoding each file would be the slow part)
JPEG_NOISE = 20         # grain on a smooth colour field: about 100 KB per file, as ImageNet's
SHIFT_DIRS = {"ImageNetV2": "imagenetv2-matched-frequency-format-val", "ImageNet-Sketch": "sketch",
              "ImageNet-R": "imagenet-r", "ImageNet-A": "imagenet-a", "ObjectNet": "objectnet-1.0"}


def input_size(spec, default=224):
    """The side of the arch's eval images (its Resize), for synthetic data."""
    for t in getattr(spec.preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if size:
            return size[0] if isinstance(size, (list, tuple)) else size
    return default


def write_synthetic_zoo(folder, n, arch, num_classes, scale=0.01, device="cpu"):
    """n stand-ins for fine-tuned ingredients in the arch's checkpoint layout: the start plus seeded
    Gaussian perturbations of `scale` times each tensor's standard deviation on every parameter that
    fine-tuning moves (frozen ones, such as CLIP's text leftovers, stay identical, as published). Every
    ingredient has its own perturbation, so no MEHL direction is zero; `device` "cuda" draws them on the
    GPU (72 ViT-B/32 stand-ins in seconds). Refuses a folder that already holds ingredients."""
    folder = Path(folder)
    if available(folder):
        raise UserError(f"--synthetic-zoo: {folder} already holds ingredients")
    folder.mkdir(parents=True, exist_ok=True)
    model = get_arch(arch).build(num_classes, pretrained=False)
    moved = {k for k, p in model.named_parameters() if p.requires_grad}
    base = model.state_dict()
    spreads = {k: _spread(base[k]) for k in moved}
    gen = torch.Generator(device).manual_seed(0)
    for i in tqdm(range(n), desc="writing stand-in ingredients", leave=False):
        sd = {}
        for k, v in base.items():
            if k in moved:
                noise = torch.randn(v.shape, generator=gen, dtype=v.dtype, device=device).cpu()
                sd[k] = v + scale * spreads[k] * noise
            else:
                sd[k] = v.clone()
        torch.save(sd, ingredient_file(folder, i))


def _spread(v):
    spread = float(v.float().std()) if v.numel() > 1 else 0.0
    return spread or float(v.float().abs().mean()) or 1.0


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


# ------------------------------------------------------------------- ImageNet-shaped JPEG tree
def wnid(c):
    return f"n{1440764 + 1009 * c:08d}"  # the shape of a WordNet id (n01440764 is ImageNet's first)


def jpeg_pool(count=JPEG_POOL, size=JPEG_SIZE, quality=JPEG_QUALITY, seed=0):
    """`count` distinct JPEG files' bytes: a smooth random colour field with grain, every fourth one
    portrait (ImageNet holds both)."""
    rng = np.random.default_rng(seed)
    pool = []
    for j in range(count):
        w, h = size if j % 4 else size[::-1]
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        field = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, JPEG_NOISE, size=(h, w, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        pool.append(buffer.getvalue())
    return pool


class _Writer:
    """Writes files of the pool round-robin and counts them."""

    def __init__(self, pool):
        self.pool, self.count, self.bytes = pool, 0, 0

    def images(self, folder, n):
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            data = self.pool[self.count % len(self.pool)]
            (folder / f"img_{k:05d}.JPEG").write_bytes(data)
            self.count += 1
            self.bytes += len(data)


def spread_over(total, parts):
    """`total` items over `parts` folders, as evenly as possible (the first ones take one more)."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def subset_classes(num_classes, every, offset):
    """ImageNet-R and -A cover 200 of the 1000 classes: every `every`-th class from `offset` (at least one)."""
    picked = list(range(offset % num_classes, num_classes, every))
    return picked or [0]


def write_imagenet_tree(root, num_classes, train_per_class, val, shifts, pool=None):
    """An ImageNet-shaped tree of real JPEG files (about 500 x 375, quality 90) under `root`:
    imagenet/train/<wnid> (`train_per_class` each: the held-out split is drawn from them),
    imagenet/val/<wnid> (`val` images in all) and the five shift folders as `datasets/imagenet.py` reads
    them, `shifts[name]` images each (names as in SHIFT_DIRS; 0 leaves a folder out):
    imagenetv2-matched-frequency-format-val/0..C-1, sketch/<wnid>, imagenet-r/<wnid> and imagenet-a/<wnid>
    (a fifth of the classes each, as their 200 of 1000), objectnet-1.0/images/<folder> with the release's
    four mapping files (about 113 mapped folders per 1000 classes, each mapped onto one or two classes,
    and one unmapped folder). Returns {set: images written} and the bytes written."""
    root = Path(root)
    writer = _Writer(pool or jpeg_pool())
    names = [wnid(c) for c in range(num_classes)]
    counts = {}
    for split, per in (("train", [train_per_class] * num_classes), ("val", spread_over(val, num_classes))):
        for name, n in zip(names, per):
            writer.images(root / "imagenet" / split / name, n)
        counts[split] = sum(per)
    if shifts.get("ImageNetV2"):
        for c, n in enumerate(spread_over(shifts["ImageNetV2"], num_classes)):
            writer.images(root / SHIFT_DIRS["ImageNetV2"] / str(c), n)
    if shifts.get("ImageNet-Sketch"):
        for name, n in zip(names, spread_over(shifts["ImageNet-Sketch"], num_classes)):
            writer.images(root / SHIFT_DIRS["ImageNet-Sketch"] / name, n)
    for shift, offset in (("ImageNet-R", 0), ("ImageNet-A", 2)):
        if shifts.get(shift):
            classes = subset_classes(num_classes, 5, offset)
            for c, n in zip(classes, spread_over(shifts[shift], len(classes))):
                writer.images(root / SHIFT_DIRS[shift] / names[c], n)
    if shifts.get("ObjectNet"):
        write_objectnet(root / SHIFT_DIRS["ObjectNet"], num_classes, shifts["ObjectNet"], writer)
    counts.update({k: v for k, v in shifts.items() if v})
    return counts, writer.bytes


def write_objectnet(base, num_classes, total, writer):
    """ObjectNet's images/<folder> and the four mapping files of its release (the layout of
    tests/test_imagenet.py): ILSVRC-2012 ids are a permutation of the class index, as in the real files.
    The mapped folders get the images; one unmapped folder gets one image (the builder skips it)."""
    mapped = max(1, round(113 * num_classes / 1000))
    perm = np.random.default_rng(0).permutation(num_classes)          # class index -> 2012 id
    class_names = [f"imagenet class {c}" for c in range(num_classes)]
    lines = [""] * num_classes
    for c, i in enumerate(perm):
        lines[i] = class_names[c]
    groups = {f"objectnet_{k:03d}": sorted({k % num_classes, (7 * k + 3) % num_classes} if k % 3 == 0
                                           else {k % num_classes}) for k in range(mapped)}
    label = {folder: folder.replace("_", " ").title() for folder in [*groups, "unmapped_thing"]}
    mappings = base / "mappings"
    mappings.mkdir(parents=True, exist_ok=True)
    (mappings / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (mappings / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(c): int(i) for c, i in enumerate(perm)}))
    (mappings / "folder_to_objectnet_label.json").write_text(json.dumps(label))
    (mappings / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {label[f]: "; ".join(class_names[c] for c in g) for f, g in groups.items()}))
    for folder, n in zip(groups, spread_over(total, mapped)):
        writer.images(base / "images" / folder, n)
    writer.images(base / "images" / "unmapped_thing", 1)
