"""Every image file a run will read is checked before any work (datasets/images.py): a regular file,
readable, a header that decodes with at most MAX_PIXELS pixels. A bad one is one line naming it, or, with
--skip-bad-images, dropped with a warning naming it and recorded in the split record. A file whose
header is sound but whose data is not fails when first read: one line naming it, also from a
DataLoader worker process."""
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

import finetune
from datasets import build_dataset, images
from tests.conftest import make_zoo, write_imagenet_tree
from tests.helpers import argv, nothing_written, refused
from tests.test_heldout import within, write_image_folder
from tests.models import TINY_CNN
from utils.runtime.errors import UserError, run_main
from uniform_soup import main as uniform_main

CLASSES = 3


@pytest.fixture
def tree(tmp_path):
    """An ImageNet tree of 3 classes (4 train, 2 val images each) and an ImageNet-Sketch shift."""
    root = write_imagenet_tree(tmp_path / "data", CLASSES, train_per_class=4, val_per_class=2)
    for wnid in sorted(os.listdir(root / "imagenet" / "train")):
        (root / "sketch" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "sketch" / wnid / "s.png")
    return root


def build(root, **options):
    return build_dataset("ImageNet", root, lambda img: img, heldout_per_class=1, **options)


def png_header(path, width, height):
    """A PNG whose header declares width x height pixels, with hardly any data (a decompression bomb's
    header: nothing past it is read by the check)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def spoil(path, case, monkeypatch):
    """Make the image file at `path` bad in the way `case` names; return the phrase its refusal holds."""
    if case == "0-byte":
        path.write_bytes(b"")
        return "is empty (0 bytes)"
    if case == "truncated header":
        path.write_bytes(path.read_bytes()[:12])
        return "has a header that does not decode (OSError: Truncated File Read)"
    if case == "mislabelled":
        path.write_text("this .JPEG is a text file\n")
        return "is not an image file PIL can identify"
    if case == "unreadable":
        path.chmod(0)
        if os.geteuid() == 0:  # root reads a chmod 000 file: the open fails as it would for a user
            real_open = open

            def refusing_open(file, *args, **kwargs):
                if os.fspath(file) == str(path):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(file, *args, **kwargs)
            monkeypatch.setattr(images, "open", refusing_open, raising=False)
        return "cannot be read (Permission denied)"
    if case == "dangling link":
        path.unlink()
        path.symlink_to(path.parent / "gone.JPEG")
        return "is a symbolic link to a missing file"
    if case == "/dev/zero link":
        path.unlink()
        path.symlink_to("/dev/zero")
        return "is a character device (a symbolic link to /dev/zero), not a regular file"
    if case == "FIFO":
        path.unlink()
        os.mkfifo(path)
        return "is a FIFO (named pipe), not a regular file"
    if case == "bomb header":
        png_header(path, 20000, 20000)      # over twice PIL's bound: PIL raises
        return "declares too many pixels (PIL: Image size (400000000 pixels) exceeds limit"
    if case == "big header":
        png_header(path, 10000, 10000)      # over the bound, under twice it: PIL only warns
        return "declares too many pixels (PIL: Image size (100000000 pixels) exceeds limit"
    raise AssertionError(case)


CASES = ("0-byte", "truncated header", "mislabelled", "unreadable", "dangling link", "/dev/zero link", "FIFO",
         "bomb header", "big header")


def a_file(root, where):
    """A file of the set `where` of the tree's bundle (drawn split, seed 0)."""
    b = build(root)
    return {"test": b.test.dataset.paths[1], "heldout": b.heldout.paths[0], "finetune": b.finetune.paths[0],
            "shift": b.shifts[1].dataset.paths[0]}[where]


@pytest.mark.parametrize("case", CASES)
def test_bad_image_is_one_line_naming_it_before_any_work(tree, case, monkeypatch):
    path = a_file(tree, "test")
    phrase = spoil(Path(path), case, monkeypatch)
    err = within(20, lambda: build(tree), fifo=path if case == "FIFO" else None).get("error")
    assert isinstance(err, UserError), repr(err)
    assert str(err).startswith(f"image file {path} {phrase}") and "\n" not in str(err), str(err)
    assert str(err).endswith("remove or replace it, or pass --skip-bad-images to drop bad files with a warning")


@pytest.mark.parametrize("where", ["heldout", "shift"])
def test_every_set_a_soup_reads_is_checked(tree, where, monkeypatch):
    path = a_file(tree, where)
    spoil(Path(path), "mislabelled", monkeypatch)
    with pytest.raises(UserError, match=f"image file {path} is not an image"):
        build(tree)


@pytest.mark.parametrize("where", ["val", "shifts/blurred"])
def test_image_folder_files_are_checked_not_only_their_names(tmp_path, where, monkeypatch):
    root = tmp_path / "own"
    write_image_folder(root)
    (root / "shifts" / "blurred" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "shifts" / "blurred" / "cat" / "00.png")
    path = root / where / "cat" / "00.png"
    phrase = spoil(path, "FIFO", monkeypatch)
    err = within(20, lambda: build_dataset("ImageFolder", root, lambda img: img), fifo=path).get("error")
    assert isinstance(err, UserError) and str(err).startswith(f"image file {path} {phrase}"), repr(err)


def test_the_fine_tune_split_is_checked_when_it_is_read(tree, monkeypatch):
    path = a_file(tree, "finetune")
    spoil(Path(path), "0-byte", monkeypatch)
    assert path in build(tree).finetune.paths          # the soups never read it
    with pytest.raises(UserError, match=f"image file {path} is empty"):
        build(tree, sets=images.FINETUNE_SETS)


def test_skip_drops_bad_files_after_the_index_file_and_records_them(tree, tmp_path, monkeypatch, caplog):
    listing = build(tree).finetune.paths + build(tree).heldout.paths
    listing.sort()
    mask = np.zeros(len(listing), dtype=np.uint8)
    mask[[0, 5, 7]] = 1
    np.save(tmp_path / "index.npy", mask)
    bad_held = listing[5]
    bad_test = a_file(tree, "test")
    spoil(Path(bad_held), "0-byte", monkeypatch)
    spoil(Path(bad_test), "mislabelled", monkeypatch)
    with caplog.at_level(logging.WARNING, logger="datasets.images"):
        b = build_dataset("ImageNet", tree, lambda img: img, heldout_index=str(tmp_path / "index.npy"),
                          skip_bad_images=True)
    # dropped after the mask: index 7 is still listing[7] (dropping first would have shifted it)
    assert b.heldout.paths == [listing[0], listing[7]]
    assert bad_test not in b.test.dataset.paths and len(b.test.dataset) == 2 * CLASSES - 1
    assert b.split["dropped_images"] == {"count": 2, "files": {
        bad_held: "is empty (0 bytes)",
        bad_test: "is not an image file PIL can identify (a truncated header, or another kind of file)"}}
    assert b.split["heldout_size"] == 2 and b.split["test_size"] == 2 * CLASSES - 1
    warned = [r.getMessage() for r in caplog.records]
    assert any(bad_held in m and "dropped (--skip-bad-images)" in m for m in warned), warned
    assert any(bad_test in m for m in warned), warned


def test_several_bad_files_are_counted_and_an_emptied_set_refused(tree, monkeypatch):
    b = build(tree)
    sketch = b.shifts[1].dataset.paths
    for path in sketch:
        spoil(Path(path), "0-byte", monkeypatch)
    checked = len(b.heldout) + len(b.test.dataset) + len(sketch)
    more = rf"\({len(sketch) - 1} more bad files among the {checked} checked\)"
    with pytest.raises(UserError, match=rf"image file {sketch[0]} is empty \(0 bytes\) {more}: remove or replace"):
        build(tree)
    with pytest.raises(UserError, match=f"every image file of the ImageNet-Sketch set is bad \\(the first: "
                                        f"{sketch[0]} is empty"):
        build(tree, skip_bad_images=True)


def truncate_data(path):
    """A JPEG whose header is sound and whose data stops half way (the check passes it)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


READ_ERROR = r"image file {} cannot be decoded \(OSError: image file is truncated.*\); its header passed the " \
             "check before the run: remove or replace the file"


def test_truncated_data_fails_when_read_in_one_line_naming_the_file(tree):
    path = a_file(tree, "test")
    truncate_data(Path(path))
    b = build(tree)
    assert path in b.test.dataset.paths
    with pytest.raises(images.ImageReadError, match=READ_ERROR.format(path)) as err:
        list(DataLoader(b.test.dataset, batch_size=4))
    assert "\n" not in str(err.value)


@pytest.mark.slow  # a DataLoader worker process
def test_truncated_data_read_in_a_worker_process_is_one_line(tree):
    path = a_file(tree, "test")
    truncate_data(Path(path))
    b = build(tree)
    with pytest.raises(images.ImageReadError) as err:
        list(DataLoader(b.test.dataset, batch_size=4, num_workers=1))
    assert str(err.value).startswith(f"image file {path} cannot be decoded (OSError: image file is truncated")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


# ------------------------------------------------------------------------------------ the scripts
@pytest.fixture
def zoo(tmp_path):
    return make_zoo(tmp_path / "zoo", 2, num_classes=CLASSES)


def soup_argv(zoo, tree, out, *extra):
    return argv(zoo, tree, out, "--datasets", "ImageNet", *extra, heldout=1, test_size=None, batch_size=4)


def test_soup_script_refuses_a_bad_image_then_skips_it(zoo, tree, out, capsys, monkeypatch, caplog):
    path = a_file(tree, "test")
    spoil(Path(path), "mislabelled", monkeypatch)
    line = refused(capsys, "uniform", soup_argv(zoo, tree, out))
    assert line.startswith(f"error: image file {path} is not an image file PIL can identify"), line
    nothing_written(out)
    with caplog.at_level(logging.WARNING, logger="datasets.images"):
        uniform_main(soup_argv(zoo, tree, out, "--skip-bad-images"))
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["split"]["dropped_images"]["count"] == 1 and path in record["split"]["dropped_images"]["files"]
    assert any(f"image file {path} is not an image" in r.getMessage() for r in caplog.records)


def test_soup_script_names_a_file_whose_data_fails_mid_run(zoo, tree, out, capsys):
    path = a_file(tree, "test")
    truncate_data(Path(path))
    line = refused(capsys, "uniform", soup_argv(zoo, tree, out))
    assert line.startswith(f"error: image file {path} cannot be decoded (OSError: image file is truncated"), line


def test_finetune_refuses_a_bad_fine_tune_image_before_any_work(tree, tmp_path, monkeypatch):
    path = a_file(tree, "finetune")
    spoil(Path(path), "dangling link", monkeypatch)
    args = ["--arch", TINY_CNN, "--datasets", "ImageNet", "--data-location", str(tree), "--heldout-per-class",
            "1", "--finetune-size", "0", "--test-size", "0", "--out-dir", str(tmp_path / "ft"), "--device", "cpu",
            "--epochs", "1", "--batch-size", "4", "--linear-probe", "--max-steps", "1"]
    with pytest.raises(UserError, match=f"image file {path} is a symbolic link to a missing file"):
        finetune.main(args)
    assert not (tmp_path / "ft" / "model_0.pt").exists()
    record = finetune.main(args + ["--skip-bad-images"])
    assert record["data"]["dropped_images"]["count"] == 1


def test_a_bad_image_through_run_main_is_exit_2(tree, capsys, tmp_path, monkeypatch):
    path = a_file(tree, "heldout")
    spoil(Path(path), "/dev/zero link", monkeypatch)
    with pytest.raises(SystemExit) as done:
        run_main(finetune.main, ["--linear-probe", "--arch", TINY_CNN, "--datasets", "ImageNet",
                                 "--data-location", str(tree), "--heldout-per-class", "1",
                                 "--out-dir", str(tmp_path / "ft"), "--device", "cpu"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: image file {path} is a character device (a symbolic link to /dev/zero), not a regular file: " \
        "remove or replace it, or pass --skip-bad-images to drop bad files with a warning"
