"""Images decoded once (utils/run/decoded.py): the transform's split gives its numbers bit for bit, a
second pass over a held-out split of 500 x 375 JPEGs at 224 px costs at most a tenth of the first and
opens no image file, the files on disk are checked before use, and every recipe gives the same numbers
with and without the cache (also on two processes)."""
import logging
import os
import re
import shutil
import time

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms import v2

from datasets.imagenet import build_imagenet
from tests.conftest import make_zoo, torchrun, write_imagenet_tree
from tests.helpers import SCRIPTS, argv
from utils.archs import get_arch, image_transform, pil_rgb_then
from utils.archs.clip import clip_transform
from utils.run import decoded
from utils.run.evaluation import close_loaders, make_loader

CPU = torch.device("cpu")
PHOTO = (500, 375)   # ImageNet's typical photo
N_HELDOUT = 40       # 4 classes x 10


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = write_imagenet_tree(tmp_path_factory.mktemp("jpeg"), num_classes=4, train_per_class=12,
                               val_per_class=3, size=PHOTO)
    shutil.copytree(root / "imagenet" / "val", root / "sketch")  # one shift set
    return root


def bundle(tree, arch="clip-vit-b32"):
    """The tree's sets with `arch`'s eval transform (no model is built)."""
    return build_imagenet(tree, get_arch(arch).preprocess, heldout_per_class=10)


@pytest.fixture
def opens(monkeypatch):
    """Counts the image files opened (PIL.Image.open)."""
    count = {"n": 0}
    real = PIL.Image.open

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(PIL.Image, "open", counting)
    return count


def batches(dataset, batch_size=128):
    """The float batches a run's loader yields (the scripts' default --batch-size), on the CPU."""
    return [x for x, _ in make_loader(dataset, batch_size, 0, device=CPU)]


def uncached(dataset):
    """The transform's own output, item by item, stacked."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


# ------------------------------------------------------------------------------- the split
def photos():
    rng = np.random.default_rng(1)
    sizes = [(500, 375), (375, 500), (200, 150), (224, 224)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def timm_eval(name="resnet10t"):
    """timm's eval transform of `name` as `--arch timm:<name>` uses it: a v1 Compose in pil_rgb_then."""
    return get_arch(f"timm:{name}").preprocess


V1_IMAGENET = v1.Compose([v1.Resize(18, interpolation=v1.InterpolationMode.BICUBIC), v1.CenterCrop(16),
                          v1.ToTensor(), v1.Normalize((0.48, 0.45, 0.40), (0.22, 0.22, 0.22))])


@pytest.mark.parametrize("transform", [clip_transform(224), image_transform(224), image_transform(16),
                                       v2.Compose([v2.ToImage(), v2.Resize((60, 80)), v2.ToDtype(torch.float32,
                                                                                                 scale=True)]),
                                       pil_rgb_then(image_transform(16)), V1_IMAGENET, pil_rgb_then(V1_IMAGENET),
                                       v1.Compose([v1.Resize((60, 80)), v1.ToTensor()]), "timm"],
                         ids=["clip-224", "imagenet-224", "tiny-16", "resize-to-hw", "factory-v2", "torchvision-v1",
                              "factory-v1", "v1-resize-to-hw", "timm-resnet10t"])
def test_the_split_is_the_transform_bit_for_bit(transform):
    transform = timm_eval() if transform == "timm" else transform
    plan = decoded.stages(transform)
    assert plan is not None
    x = torch.stack([plan.geometric(img).as_subclass(torch.Tensor) for img in photos()])
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == plan.shape
    assert torch.equal(plan.to_float(x), torch.stack([transform(img) for img in photos()]))


def test_v1_and_v2_steps_of_the_same_settings_name_different_files():
    """PIL's resize and the tensor's give other pixels: the key's description tells them apart."""
    a = decoded.stages(v1.Compose([v1.Resize(16), v1.CenterCrop(16), v1.ToTensor()]))
    b = decoded.stages(image_transform(16, mean=(0, 0, 0), std=(1, 1, 1)))
    assert a.description != b.description and a.v1 and not b.v1


@pytest.mark.parametrize("transform", [
    image_transform(16, crop=False),                                       # images of varying shape
    v2.Compose([v2.Lambda(lambda img: img), *image_transform(16).transforms]),   # a Lambda not known
    v1.Compose([v1.Resize(16), v1.ToTensor()]),                            # v1: images of varying shape
    v1.Compose([v1.Resize(16), v1.CenterCrop(16), v1.RandomHorizontalFlip(), v1.ToTensor()]),  # v1: unknown
    v1.Compose([v1.Resize(16), v1.CenterCrop(16), v1.ToTensor(), v1.Normalize((0.5,), (0.5,)),
                v1.RandomErasing()]),                                      # v1: unknown step on floats
    v2.Compose([*image_transform(16).transforms[:-2], v2.RandomHorizontalFlip(),
                *image_transform(16).transforms[-2:]]),                    # an unknown step
    v2.Compose([*image_transform(16).transforms[:-2], v2.ToDtype(torch.float16, scale=True)]),
    v2.Compose([v2.ToImage(), v2.CenterCrop(16), v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise()]),
], ids=["no-crop", "unknown-lambda", "v1-no-crop", "v1-unknown-step", "v1-after-totensor", "unknown-step",
        "float16", "after-todtype"])
def test_a_transform_that_cannot_be_split_is_not_kept(transform, tree):
    assert decoded.stages(transform) is None
    ds = bundle(tree).heldout
    ds.transform = transform
    assert decoded.images(ds) is None


# ----------------------------------------------------------------------- decode once, measured
@pytest.mark.parametrize("where", ["memory", "folder"])
def test_a_later_pass_costs_a_tenth_of_the_first_and_opens_no_file(where, tree, tmp_path, opens):
    """The data side only: the float batches the loader yields, no model; CPU time of this process. A
    later pass is the median of three (the machine is shared: one pass can be slowed by others)."""
    decoded.configure("none")
    expected = uncached(bundle(tree).heldout)
    decoded.configure("memory" if where == "memory" else str(tmp_path / "cache"))
    heldout = bundle(tree).heldout
    opens["n"] = 0
    seconds, same, opened = [], [], []
    for _ in range(4):
        start = time.process_time()
        output = batches(heldout)
        seconds.append(time.process_time() - start)
        opened.append(opens["n"])
        same.append(torch.equal(torch.cat(output), expected))
        del output  # as a run drops its batches
    later = sorted(seconds[1:])[1]
    print(f"\n{where}: {N_HELDOUT} JPEGs {PHOTO[0]}x{PHOTO[1]} at 224 px, CPU seconds per pass: "
          f"{', '.join(f'{s:.4f}' for s in seconds)}; later / first {later / seconds[0]:.3f}")
    assert len(heldout) == N_HELDOUT
    assert opened == [N_HELDOUT] * 4            # every file once, none in a later pass
    assert all(same)
    assert later <= 0.10 * seconds[0]


def test_without_the_cache_every_pass_decodes(tree, opens):
    decoded.configure("none")
    heldout = bundle(tree).heldout
    batches(heldout)
    batches(heldout)
    assert opens["n"] == 2 * N_HELDOUT


def test_shards_and_the_whole_set_give_the_same_items(tree, monkeypatch):
    """A rank's strided share (what make_loader gives under torchrun) of the kept images."""
    decoded.configure("memory")
    heldout = bundle(tree).heldout
    expected = uncached(heldout)
    for world in (2, 3):
        for rank in range(world):
            monkeypatch.setattr("utils.runtime.distributed.rank", lambda r=rank: r)
            monkeypatch.setattr("utils.runtime.distributed.world_size", lambda w=world: w)
            assert torch.equal(torch.cat(batches(heldout, 7)), expected[rank::world])


# --------------------------------------------------------------------------------- on disk
def test_a_new_process_reads_the_file_and_checks_a_few_items(tree, tmp_path, opens):
    folder = tmp_path / "cache"
    decoded.configure(str(folder))
    first = torch.cat(batches(bundle(tree).heldout))
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".npy"]
    opens["n"] = 0
    decoded.configure(str(folder))             # a new run: new data set objects
    again = torch.cat(batches(bundle(tree).heldout))
    assert torch.equal(again, first)
    assert opens["n"] == decoded.SPOT_CHECKS     # the spot checks, nothing else


def _damage(kind, folder):
    data, = folder.glob("*.npy")
    header, = folder.glob("*.json")
    if kind == "flipped byte":
        with open(data, "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif kind == "truncated":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) - 100)
    elif kind == "stale images, right checksum":   # e.g. written by a decoder that computes otherwise
        array = decoded._open(data, tuple(np.load(data, mmap_mode="r").shape), "r+")
        array[:] = 255 - array
        array.flush()
        text = header.read_text()
        header.write_text(re.sub(r'"crc32": \d+', f'"crc32": {decoded._crc(array)}', text))
    elif kind == "header is a device":
        header.unlink()
        header.symlink_to("/dev/zero")
    elif kind == "header too large":
        header.write_text(" " * (decoded.HEADER_LIMIT + 10) + "{}")
    elif kind == "other shape":
        shape = tuple(np.load(data, mmap_mode="r").shape)
        np.save(data, np.zeros((shape[0], 3, 8, 8), dtype=np.uint8))
    return data


@pytest.mark.parametrize("kind", ["flipped byte", "truncated", "stale images, right checksum", "header is a device",
                                  "header too large", "other shape"])
def test_a_damaged_or_stale_file_is_decoded_again_and_replaced(kind, tree, tmp_path, caplog):
    folder = tmp_path / "cache"
    decoded.configure(str(folder))
    expected = torch.cat(batches(bundle(tree).heldout))
    data = _damage(kind, folder)
    decoded.configure(str(folder))
    with caplog.at_level(logging.WARNING, logger="utils.run.decoded"):
        assert torch.equal(torch.cat(batches(bundle(tree).heldout)), expected)
    assert "ignored" in caplog.text, caplog.text
    decoded.configure(str(folder))   # replaced: the next run reads it without a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.run.decoded"):
        assert torch.equal(torch.cat(batches(bundle(tree).heldout)), expected)
    assert "ignored" not in caplog.text and data.is_file()


def test_a_changed_image_file_names_another_file(tree, tmp_path):
    folder = tmp_path / "cache"
    decoded.configure(str(folder))
    heldout = bundle(tree).heldout
    batches(heldout)
    victim = heldout.paths[3]
    Image.open(victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(victim)  # same size on disk, maybe not
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    decoded.configure(str(folder))
    again = bundle(tree).heldout
    assert torch.equal(torch.cat(batches(again)), uncached(again))
    assert len(list(folder.glob("*.npy"))) == 2


def test_two_images_swapped_in_place_with_their_times_set_back_name_another_file(tree, tmp_path):
    """Issue 31.1: same-size files of two classes swapped by writing in place, their modification times
    restored: the key (inode, status-change time, size, mtime) still changes, so the warm cache is not
    used for them (the spot checks alone missed this in 5 of 5 tries)."""
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    heldout = bundle(root).heldout
    a = heldout.paths[0]
    b = next(p for p, y in zip(heldout.paths, heldout.labels) if y != heldout.labels[0])
    data = {p: open(p, "rb").read() for p in (a, b)}
    size = max(map(len, data.values()))
    for p in (a, b):  # the same size on disk (a JPEG ignores bytes after its end)
        with open(p, "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * (size - len(data[p])))
    folder = tmp_path / "cache"
    decoded.configure(str(folder))
    batches(bundle(root).heldout)
    times = {p: os.stat(p) for p in (a, b)}
    for p, q in ((a, b), (b, a)):
        with open(p, "r+b") as f:
            f.write(data[q].ljust(size, b"\0"))
        os.utime(p, ns=(times[p].st_atime_ns, times[p].st_mtime_ns))
    assert all(os.stat(p).st_size == times[p].st_size and os.stat(p).st_mtime_ns == times[p].st_mtime_ns
               for p in (a, b))
    decoded.configure(str(folder))
    again = bundle(root).heldout
    assert torch.equal(torch.cat(batches(again)), uncached(again))
    assert len(list(folder.glob("*.npy"))) == 2


def test_a_file_name_that_is_not_utf8_is_cached_and_read_back(tree, tmp_path):
    """Issue 31.3: an image named with a byte that is not UTF-8 (img_\\xe9.JPEG) is kept like any other."""
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    first = bundle(root).heldout.paths[0]
    os.rename(first, os.path.join(os.path.dirname(first), os.fsdecode(b"img_\xe9.JPEG")))
    heldout = bundle(root).heldout
    assert any(os.fsencode(p).endswith(b"img_\xe9.JPEG") for p in heldout.paths)
    decoded.configure(str(tmp_path / "cache"))
    assert torch.equal(torch.cat(batches(heldout)), uncached(heldout))
    decoded.configure(str(tmp_path / "cache"))
    again = bundle(root).heldout
    assert torch.equal(torch.cat(batches(again)), uncached(again))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_an_unwritable_folder_costs_a_warning_and_keeps_them_in_memory(tree, tmp_path, caplog, opens):
    (tmp_path / "a-file").write_text("")
    decoded.configure(str(tmp_path / "a-file" / "cache"))
    heldout = bundle(tree).heldout
    with caplog.at_level(logging.WARNING, logger="utils.run.decoded"):
        first = torch.cat(batches(heldout))
    assert "not kept on disk" in caplog.text
    assert torch.equal(torch.cat(batches(heldout)), first) and opens["n"] == N_HELDOUT


def test_a_full_disk_is_never_filled(tree, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(decoded, "MARGIN_BYTES", 2**62)
    decoded.configure(str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="utils.run.decoded"):
        batches(bundle(tree).heldout)
    assert "GiB free" in caplog.text and not list((tmp_path / "cache").glob("*.npy"))


def test_the_flag(tmp_path):
    with pytest.raises(Exception, match="--decode-cache"):
        decoded.configure(" ")
    assert decoded.configure(None) == decoded.default_folder()
    assert decoded.configure("none") is None and decoded.configure("Memory") == "memory"
    assert decoded.configure(str(tmp_path)) == tmp_path


# ---------------------------------------------------------------------- every recipe, same numbers
@pytest.fixture(scope="module")
def clip_zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("zoo"), 3, num_classes=4, arch="tiny-clip", noise=0.02)


SCORES = ("heldout", "test", "shifts", "shift_mean")
FLAGS = {"greedy": [], "uniform": [], "mehl": ["--epochs", "2", "--model_batch", "2"],
         "learned": ["--epochs", "2", "--layerwise"]}


@pytest.mark.parametrize("script", ["greedy", "mehl", "learned"])
def test_every_recipe_gives_the_same_numbers_with_and_without_the_cache(script, tree, clip_zoo, tmp_path):
    records, soups = {}, {}
    for where in ("none", "memory", str(tmp_path / "cache"), str(tmp_path / "cache")):  # last: read back
        out = tmp_path / f"run{len(records)}"
        out.mkdir()
        args = argv(clip_zoo, tree, out, "--decode-cache", where, first=FLAGS[script], arch="tiny-clip",
                    datasets="ImageNet", heldout=10, test_size=None, batch_size=16)
        records[len(records)] = SCRIPTS[script].main(args)
        soups[len(soups)] = torch.load(out / "soup.pt", weights_only=True)
    for k in range(1, len(records)):
        assert {s: records[k][s] for s in SCORES} == {s: records[0][s] for s in SCORES}
        assert records[k].get("heldout_steps") == records[0].get("heldout_steps")
        assert all(torch.equal(soups[k][n], soups[0][n]) for n in soups[0])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3   # held-out, test, the shift


# ------------------------------------------------------------------------- loaders and ranks
@pytest.mark.slow
def test_workers_persist_across_evaluations_until_closed(tree):
    decoded.configure("none")
    heldout = bundle(tree, "tiny-clip").heldout
    loader = make_loader(heldout, 16, 1)
    first = [x for x, _ in loader]
    workers = list(loader._iterator._workers)
    assert make_loader(heldout, 16, 1) is loader
    second = [x for x, _ in loader]
    assert list(loader._iterator._workers) == workers and all(w.is_alive() for w in workers)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    close_loaders()
    assert not any(w.is_alive() for w in workers)
    assert make_loader(heldout, 16, 1) is not loader
    close_loaders()


@pytest.mark.slow
def test_two_processes_share_the_decoding_and_give_one_process_numbers(tree, clip_zoo, tmp_path):
    folder = tmp_path / "cache"
    common = dict(arch="tiny-clip", datasets="ImageNet", heldout=10, test_size=None, batch_size=16)
    one = SCRIPTS["uniform"].main(argv(clip_zoo, tree, tmp_path / "one", "--decode-cache", "none", **common))
    done = torchrun("uniform_soup.py", argv(clip_zoo, tree, tmp_path / "two", "--decode-cache", folder, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    # each rank decoded its strided half of every set into the one shared file
    shares = re.findall(r"(\d+) images decoded once \(per rank: (\d+), (\d+)\)", done.stderr)
    assert sorted(int(n) for n, _, _ in shares) == [12, 12, N_HELDOUT], done.stderr[-3000:]
    assert all(int(a) + int(b) == int(n) and abs(int(a) - int(b)) <= 1 for n, a, b in shares)
    again = torchrun("uniform_soup.py", argv(clip_zoo, tree, tmp_path / "again", "--decode-cache", folder,
                                             **common))
    assert again.returncode == 0 and "decoded once" not in again.stderr, again.stderr[-3000:]
    from utils.files import results
    for out in ("two", "again"):
        line, = results.read(tmp_path / out / "results.jsonl")
        assert {s: line[s] for s in SCORES} == {s: one[s] for s in SCORES}


def test_a_soup_run_over_images_whose_names_are_not_utf8_under_the_default_cache(tree, clip_zoo, tmp_path):
    """Issue 31.3 as it was met: `img_\\xe9.JPEG` in the held-out and the test split crashed every soup
    run under the default cache (UnicodeEncodeError); now the run gives the numbers of --decode-cache none."""
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    for split in ("train", "val"):
        first = sorted((root / "imagenet" / split).glob("*/*.JPEG"))[0]
        os.rename(first, first.with_name(os.fsdecode(b"img_\xe9.JPEG")))
    records = []
    for k, extra in enumerate(([], ["--decode-cache", "none"])):  # first: the default folder
        out = tmp_path / f"run{k}"
        out.mkdir()
        records.append(SCRIPTS["greedy"].main(argv(clip_zoo, root, out, *extra, arch="tiny-clip", datasets="ImageNet",
                                                    heldout=10, test_size=None, batch_size=16)))
    assert {s: records[0][s] for s in SCORES} == {s: records[1][s] for s in SCORES}
    assert len(list(decoded.default_folder().glob("*.npy"))) == 3
