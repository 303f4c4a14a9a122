"""The held-out split is one function (datasets/heldout.py) that all four families call: drawn per class
with a seed, or the user's 0/1 .npy index file over the train set (its sha256 recorded), never both;
an index file in another format, or a path that is not a regular file, is one line before any work."""
import hashlib
import os
import pickle
import threading

import numpy as np
from numpy.lib import format as npy_format
import pytest
from PIL import Image

from datasets import build_dataset, per_class_split
from tests.conftest import make_fmnist, write_imagenet_tree
from tests.helpers import argv, nothing_written, refused
from utils.runtime.errors import UserError


def write_cifar10(root, per_batch=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.arange(per_batch) % 10
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"labels": labels.tolist(), b"data": data}, f, protocol=2)
    return np.tile(labels, 5)


def write_image_folder(root, classes=("cat", "dog", "fox"), train=4, val=1):
    for c, name in enumerate(classes):
        for part, n in (("train", train), ("val", val)):
            (root / part / name).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (8, 8), (60 * c, 20 * k, 90)).save(root / part / name / f"{k:02d}.png")
    return np.repeat(np.arange(len(classes)), train)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (data root, train labels in the order an index file indexes)."""
    base = tmp_path_factory.mktemp("families")
    fmnist = make_fmnist(base / "fmnist", n_train=100, n_test=20)
    from datasets.fashion_mnist import read_idx
    fmnist_labels = read_idx(fmnist / "train-labels-idx1-ubyte.gz").astype(np.int64)
    cifar_labels = write_cifar10(base / "cifar")
    write_imagenet_tree(base / "imagenet", num_classes=3, train_per_class=4, val_per_class=1)
    folder_labels = write_image_folder(base / "folder")
    return {"FashionMNIST": (fmnist, fmnist_labels), "CIFAR10": (base / "cifar", cifar_labels),
            "ImageNet": (base / "imagenet", np.repeat(np.arange(3), 4)),
            "ImageFolder": (base / "folder", folder_labels)}


FAMILIES = ("FashionMNIST", "CIFAR10", "ImageNet", "ImageFolder")


def build(families, name, **options):
    return build_dataset(name, families[name][0], lambda img: img, **options)


@pytest.mark.parametrize("name", FAMILIES)
def test_drawn_split_is_the_same_draw_in_every_family(families, name):
    labels = families[name][1]
    b = build(families, name, heldout_per_class=2, seed=5)
    assert {k: b.split[k] for k in ("heldout", "per_class", "seed")} == {"heldout": "drawn", "per_class": 2,
                                                                         "seed": 5}
    mask = per_class_split(labels, 2, 5)
    assert np.array_equal(np.asarray(b.heldout.labels), labels[mask])
    assert b.split["heldout_size"] == len(b.heldout) == mask.sum()
    assert len(b.finetune) == len(labels) - mask.sum()
    assert "sha256" not in b.split and "path" not in b.split


@pytest.mark.parametrize("name", FAMILIES)
def test_index_file_gives_that_split_and_records_its_sha256(families, name, tmp_path):
    labels = families[name][1]
    mask = np.zeros(len(labels), dtype=np.uint8)
    mask[[0, 3, len(labels) - 1]] = 1
    index = tmp_path / "index.npy"
    np.save(index, mask)
    b = build(families, name, heldout_index=str(index), seed=9)
    assert np.array_equal(np.asarray(b.heldout.labels), labels[mask.astype(bool)])
    assert len(b.finetune) == len(labels) - 3
    assert b.split["heldout"] == "index file" and b.split["path"] == str(index)
    assert b.split["sha256"] == hashlib.sha256(index.read_bytes()).hexdigest()
    assert b.split["heldout_size"] == 3 and "seed" not in b.split and "per_class" not in b.split


@pytest.mark.parametrize("name", FAMILIES)
def test_both_sources_are_refused(families, name, tmp_path):
    np.save(tmp_path / "index.npy", np.zeros(len(families[name][1]), dtype=np.uint8))
    with pytest.raises(UserError, match="give either --heldout-index or --heldout-per-class, not both"):
        build(families, name, heldout_index=str(tmp_path / "index.npy"), heldout_per_class=2)


def make_index(path, case, n):
    """Write the bad index file `case` at `path`; return the phrase its refusal must hold."""
    mask = np.zeros(n, dtype=np.uint8)
    mask[0] = 1
    if case == "npz":
        np.savez(path, mask=mask)
        os.replace(str(path) + ".npz", path)
        return "is a zip archive (a .npz of several arrays?), not a .npy file"
    if case == "text":
        path.write_text("\n".join(map(str, mask)))
        return "is text or another format, not a .npy file"
    if case == "pickle":
        path.write_bytes(pickle.dumps(mask.tolist(), protocol=4))
        return "is a Python pickle, not a .npy file"
    if case == "empty":
        path.write_bytes(b"")
        return "is empty, not a .npy file"
    if case == "object array":
        np.save(path, np.array([0, 1] * (n // 2) + [0] * (n % 2), dtype=object), allow_pickle=True)
        return "holds object values; expected a 0/1 array"
    if case == "header of a huge array":   # refused from its header: numpy allocates first, then reads
        with open(path, "wb") as f:
            npy_format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**12,)})
            f.write(mask.tobytes())
        return f"got shape ({10**12},)"
    if case == "2-D":
        np.save(path, mask[:, None])
        return f"expected a 0/1 array of length {n}"
    if case == "truncated":
        np.save(path, mask)
        path.write_bytes(path.read_bytes()[:-4])
        return "not a readable .npy file"
    if case == "not 0/1":
        np.save(path, mask.astype(np.float32) * 0.5)
        return "expected only 0 and 1"
    if case == "folder":
        path.mkdir()
        return "is a folder, not a regular file"
    if case == "fifo":
        os.mkfifo(path)
        return "is a FIFO (named pipe), not a regular file"
    if case == "/dev/zero":
        os.symlink("/dev/zero", path)
        return "is a character device (a symbolic link to /dev/zero), not a regular file"
    if case == "dangling link":
        os.symlink(path.parent / "gone.npy", path)
        return "is a symbolic link to a missing file"
    raise AssertionError(case)


def within(seconds, fn, fifo=None):
    """{"value": ...} or {"error": ...} of `fn()`, within `seconds`. A FIFO opened for reading blocks
    until a writer comes: after the timeout one opens it, so the test fails instead of hanging."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"still running after {seconds} s (blocked reading {fifo})")
    return outcome


BAD = ("npz", "text", "pickle", "empty", "object array", "header of a huge array", "2-D", "truncated", "not 0/1",
       "folder", "fifo", "/dev/zero", "dangling link")


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("name", FAMILIES)
def test_index_file_other_than_a_npy_array_is_one_line(families, name, case, tmp_path):
    index = tmp_path / "index.npy"
    phrase = make_index(index, case, len(families[name][1]))
    err = within(20, lambda: build(families, name, heldout_index=str(index)),
                 fifo=index if case == "fifo" else None).get("error")
    assert isinstance(err, UserError), repr(err)
    assert str(err).startswith(f"--heldout-index {index}") and phrase in str(err), str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize("case", ["npz", "fifo"])
def test_soup_script_refuses_a_bad_index_file_in_one_line(case, capsys, zoo, out, fmnist_root, tmp_path):
    index = tmp_path / "index.npy"
    phrase = make_index(index, case, 600)
    outcome = within(60, lambda: refused(capsys, "uniform", argv(zoo, fmnist_root, out, "--heldout-index",
                                                                  index, heldout=None)),
                     fifo=index if case == "fifo" else None)
    advice = "give a 0/1 numpy .npy file" if case == "fifo" else "save the 0/1 array with numpy.save(path, mask)"
    assert outcome.get("value") == f"error: --heldout-index {index}{' ' if case == 'fifo' else ': '}{phrase}: " \
        f"{advice}", outcome
    nothing_written(out)
