"""ImageNet builder on a tiny tree laid out like the real folders: 11 fake wnids (so that ImageNetV2's
folder "10" would sort wrongly as a string), small solid-grey images whose grey level encodes the
ImageNet class, and a fake model that reads the class back from the pixels."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from datasets import build_dataset
from datasets.imagenet import build_imagenet, list_images
from utils.run import inputs
from utils.run.evaluation import accuracy, evaluate_all
from utils.runtime.errors import UserError

WNIDS = [f"n{1000 + 7 * i:08d}" for i in range(11)]
R_WNIDS = [WNIDS[1], WNIDS[4], WNIDS[10]]
TO_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def grey(c):
    return 10 + 20 * c


def write_images(folder, n, c, size=8, border=0, ext="JPEG"):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = Image.new("RGB", (size + 2 * border, size + 2 * border), (255, 255, 255))
        img.paste((grey(c),) * 3, (border, border, border + size, border + size))
        img.save(folder / f"img_{k:03d}.{ext}")


# The ObjectNet release's mapping files, for three ObjectNet classes; one folder maps to nothing.
# ILSVRC-2012 ids are a permutation of the class index (sorted wnids), as in the real files.
OBJECTNET_GROUPS = {"alarm_clock": [2, 7], "banana": [5], "unmapped_thing": None}


def write_objectnet(root):
    base = root / "objectnet-1.0"
    perm = np.random.default_rng(0).permutation(len(WNIDS))       # class index -> 2012 id
    names = [f"imagenet class {c}" for c in range(len(WNIDS))]
    lines = [""] * len(WNIDS)
    for c, i in enumerate(perm):
        lines[i] = names[c]
    (base / "mappings").mkdir(parents=True)
    (base / "mappings" / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (base / "mappings" / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(c): int(i) for c, i in enumerate(perm)}))
    (base / "mappings" / "folder_to_objectnet_label.json").write_text(
        json.dumps({f: f.replace("_", " ").title() for f in OBJECTNET_GROUPS}))
    (base / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {f.replace("_", " ").title(): "; ".join(names[c] for c in g) for f, g in OBJECTNET_GROUPS.items() if g}))
    for f, g in OBJECTNET_GROUPS.items():
        # A white 2-pixel border around an inner grey of the class's last mapped ImageNet class.
        write_images(base / "images" / f, 2, g[-1] if g else 0, border=2, ext="png")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for c, w in enumerate(WNIDS):
        write_images(root / "imagenet" / "train" / w, 6, c)
        write_images(root / "imagenet" / "val" / w, 2, c)
        write_images(root / "sketch" / w, 1, c)
    for c in (0, 1, 2, 10):
        write_images(root / "imagenetv2-matched-frequency-format-val" / str(c), 2, c)
    for w in R_WNIDS:
        write_images(root / "imagenet-r" / w, 2, WNIDS.index(w))
    write_objectnet(root)
    return root                          # imagenet-a is absent on purpose


class ColourModel(nn.Module):
    """One-hot logits at the ImageNet class encoded by the image's mean grey level."""

    def forward(self, x):
        c = ((x[:, 0].mean((1, 2)) * 255 - 10) / 20).round().long().clamp(0, len(WNIDS) - 1)
        return nn.functional.one_hot(c, len(WNIDS)).float()


def shift(bundle, name):
    return next(s for s in bundle.shifts if s.name == name)


def test_classes_and_test_set(root):
    b = build_dataset("imagenet", root, TO_TENSOR)
    assert b.num_classes == 11
    assert len(b.test.dataset) == 22
    for path, label in zip(b.test.dataset.paths, b.test.dataset.labels):
        assert f"/{WNIDS[label]}/" in path
    assert accuracy(ColourModel(), b.test.dataset, "cpu", batch_size=8) == 100.0


def test_listing_matches_imagefolder_order(root):
    (root / "imagenet" / "train" / WNIDS[0] / "not_an_image.txt").write_text("x")
    ours = [p for w in WNIDS for p in list_images(root / "imagenet" / "train" / w)]
    assert ours == [p for p, _ in ImageFolder(str(root / "imagenet" / "train")).samples]


def test_drawn_heldout_split(root):
    b = build_imagenet(root, TO_TENSOR, heldout_per_class=2, seed=3)
    held, fine = b.heldout, b.finetune
    assert np.bincount(held.labels, minlength=11).tolist() == [2] * 11
    assert not set(held.paths) & set(fine.paths)
    assert len(held) + len(fine) == 66
    assert b.split == {**b.split, "heldout": "drawn", "per_class": 2, "seed": 3, "heldout_size": 22}
    assert build_imagenet(root, TO_TENSOR, heldout_per_class=2, seed=3).heldout.paths == held.paths
    assert build_imagenet(root, TO_TENSOR, heldout_per_class=2, seed=4).heldout.paths != held.paths
    assert build_imagenet(root, TO_TENSOR).split["per_class"] == 26   # the paper's default


def test_heldout_index_file(root, tmp_path):
    samples = [p for p, _ in ImageFolder(str(root / "imagenet" / "train")).samples]
    mask = np.zeros(len(samples), dtype=np.int64)
    mask[np.random.default_rng(1).choice(len(samples), 9, replace=False)] = 1
    np.save(tmp_path / "idx.npy", mask)
    b = build_imagenet(root, TO_TENSOR, heldout_index=tmp_path / "idx.npy")
    assert b.heldout.paths == [samples[i] for i in np.flatnonzero(mask)]
    assert set(b.finetune.paths) == set(samples) - set(b.heldout.paths)
    assert b.split["heldout"] == "index file" and len(b.split["sha256"]) == 64
    again = build_imagenet(root, TO_TENSOR, heldout_index=tmp_path / "idx.npy", seed=7)
    assert again.heldout.paths == b.heldout.paths

    np.save(tmp_path / "short.npy", mask[:-1])
    with pytest.raises(UserError, match=r"length 66 .*got shape \(65,\)"):
        build_imagenet(root, TO_TENSOR, heldout_index=tmp_path / "short.npy")


def test_v2_labels_are_integers(root):
    v2set = shift(build_imagenet(root, TO_TENSOR), "ImageNetV2")
    by_folder = {p.split("/")[-2]: int(label) for p, label in zip(v2set.dataset.paths, v2set.dataset.labels)}
    assert by_folder == {"0": 0, "1": 1, "2": 2, "10": 10}
    assert v2set.project is None
    assert accuracy(ColourModel(), v2set.dataset, "cpu", batch_size=8) == 100.0


def test_sketch(root):
    sketch = shift(build_imagenet(root, TO_TENSOR), "ImageNet-Sketch")
    assert sorted(sketch.dataset.labels.tolist()) == list(range(11))
    assert accuracy(ColourModel(), sketch.dataset, "cpu", batch_size=8) == 100.0


def test_imagenet_r_mask(root):
    r = shift(build_imagenet(root, TO_TENSOR), "ImageNet-R")
    assert sorted(set(r.dataset.labels.tolist())) == [0, 1, 2]     # position among R's sorted wnids
    logits = torch.arange(11.0).repeat(2, 1)
    assert r.project(logits).tolist() == [[1.0, 4.0, 10.0]] * 2
    assert accuracy(ColourModel(), r.dataset, "cpu", batch_size=8, project=r.project) == 100.0
    assert accuracy(ColourModel(), r.dataset, "cpu", batch_size=8) < 100.0   # unprojected: wrong


def test_objectnet_mapping_and_crop(root):
    obj = shift(build_imagenet(root, TO_TENSOR), "ObjectNet")
    folders = {p.split("/")[-2] for p in obj.dataset.paths}
    assert folders == {"alarm_clock", "banana"}                       # the unmapped folder is left out
    x, _ = obj.dataset[0]
    assert x.shape == (3, 8, 8)                                       # 12 px minus 2 px each side
    assert (x * 255 - grey(OBJECTNET_GROUPS["alarm_clock"][-1])).abs().max() < 1  # no white border left
    logits = torch.zeros(1, 11)
    logits[0, 7], logits[0, 5] = 3.0, 2.0                             # alarm_clock = max(2, 7)
    assert obj.project(logits).tolist() == [[3.0, 2.0]]
    assert accuracy(ColourModel(), obj.dataset, "cpu", batch_size=8, project=obj.project) == 100.0


def test_missing_shift_is_listed(root, caplog):
    with caplog.at_level(logging.WARNING):
        b = build_imagenet(root, TO_TENSOR)
    a = shift(b, "ImageNet-A")
    assert a.dataset is None and "imagenet-a" in a.missing
    assert [r for r in caplog.records if "ImageNet-A" in r.getMessage()].__len__() == 1
    assert b.split["missing_shifts"] == ["ImageNet-A"]
    out = evaluate_all(inputs.evaluation(ColourModel(), "cpu", 8, 0, "fp32"), b, "cpu", batch_size=8)
    assert out["shifts"]["ImageNet-A"] is None and out["missing_shifts"] == ["ImageNet-A"]
    assert out["shift_mean"] == 100.0 and out["test"] == 100.0


def test_test_size_subsamples_every_set(root):
    b = build_imagenet(root, TO_TENSOR, heldout_per_class=2, test_size=3, finetune_size=10, seed=5)
    assert len(b.test.dataset) == 3 and len(b.finetune) == 10
    assert all(len(s.dataset) == 3 for s in b.shifts if s.dataset is not None)
    again = build_imagenet(root, TO_TENSOR, heldout_per_class=2, test_size=3, finetune_size=10, seed=5)
    assert again.test.dataset.paths == b.test.dataset.paths


def test_wrong_layout(tmp_path):
    with pytest.raises(UserError, match="imagenet/train not found"):
        build_imagenet(tmp_path, TO_TENSOR)
    write_images(tmp_path / "imagenet" / "train" / WNIDS[0], 1, 0)
    write_images(tmp_path / "imagenet" / "train" / WNIDS[1], 1, 1)
    write_images(tmp_path / "imagenet" / "val" / WNIDS[0], 1, 0)
    with pytest.raises(UserError, match="same 2 wnid folders"):
        build_imagenet(tmp_path, TO_TENSOR)
