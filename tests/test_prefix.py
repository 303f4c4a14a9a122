"""The frozen prefix run once per data set (utils/run/prefix.py): it stands for the model only when it
computes what the whole model would, and the soups it speeds up are the soups without it."""
import json
import os

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import TensorDataset

import greedy_soup
import learned_soup
import MEHL_soup_layer as mehl
from tests.conftest import torchrun
from tests.helpers import argv
from tests.models import TINY_CNN
from utils.archs import effnet as effnet_arch
from utils.archs import get_arch
from utils.run import inputs, prefix
from utils.run.batchnorm import set_mode
from utils.run.evaluation import accuracy, evaluate_all

ARCH = "efficientnet-lite0"


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(0)
    return get_arch(ARCH).build(10, pretrained=False).eval()


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(24, 3, 32, 32, generator=gen), torch.arange(24) % 10)


def direct_logits(model, data):
    with torch.no_grad():
        return model(data.tensors[0])


def test_outputs_stand_for_the_model_and_are_reused(effnet, images):
    split, h, y = prefix.outputs(effnet, images, torch.device("cpu"), batch_size=8)
    assert torch.equal(y, images.tensors[1])
    with torch.no_grad():
        assert_close(split.tail(h), direct_logits(effnet, images), atol=1e-5, rtol=1e-5)
    # a tensor after the prefix changes: the same outputs are used again
    with torch.no_grad():
        effnet._fc.weight.add_(1.0)
    assert prefix.outputs(effnet, images, torch.device("cpu"), batch_size=8)[1] is h


def test_a_changed_prefix_tensor_computes_them_again(effnet, images):
    _, before, _ = prefix.outputs(effnet, images, torch.device("cpu"), batch_size=8)
    with torch.no_grad():
        effnet._blocks[0]._bn1.running_mean.add_(0.5)  # a buffer of the prefix, not a parameter
    split, after, _ = prefix.outputs(effnet, images, torch.device("cpu"), batch_size=8)
    assert not torch.allclose(after, before)
    with torch.no_grad():
        assert_close(split.tail(after), direct_logits(effnet, images), atol=1e-5, rtol=1e-5)


def test_a_prefix_in_train_mode_or_too_large_is_not_used(effnet, images, monkeypatch):
    set_mode(effnet, frozen_stats=False)  # batch statistics: the prefix is no fixed function
    assert prefix.outputs(effnet, images, torch.device("cpu")) is None
    assert inputs.learning(effnet, images, torch.device("cpu"), 8, 0, (), "fp32").forward is effnet
    effnet.eval()
    monkeypatch.setattr(prefix, "LIMIT_BYTES", 1000)
    other = TensorDataset(*images.tensors)
    assert prefix.outputs(effnet, other, torch.device("cpu"), batch_size=8) is None
    given = inputs.evaluation(effnet, torch.device("cpu"), 8, 0, "fp32")(other)
    assert given.dataset is other and given.forward is effnet  # the whole model, on the images
    logits = direct_logits(effnet, other)
    expected = 100.0 * (logits.argmax(1) == other.tensors[1]).double().mean().item()
    assert accuracy(given.forward, given.dataset, torch.device("cpu"), batch_size=8) == pytest.approx(expected)
    # not bounded (finetune.py holds its fine-tune split whole): computed although above the bound
    assert prefix.outputs(effnet, other, torch.device("cpu"), batch_size=8, bounded=False) is not None


def test_inputs_are_the_prefix_outputs_unless_a_learned_tensor_is_in_the_prefix(effnet, images):
    with torch.no_grad():
        expected = direct_logits(effnet, images)
    given = inputs.learning(effnet, images, torch.device("cpu"), 8, 3, ["_fc.weight"], "fp32")
    assert given.prefixed and given.workers == 0 and given.key_prefix == "model."
    assert torch.equal(given.dataset.tensors[1], images.tensors[1])
    with torch.no_grad():
        assert_close(given.forward(given.dataset.tensors[0]), expected, atol=1e-5, rtol=1e-5)
    assert dict(given.forward.named_parameters())["model._fc.weight"] is effnet._fc.weight
    whole = inputs.learning(effnet, images, torch.device("cpu"), 8, 3, ["_blocks.3._bn1.weight"], "fp32")
    assert not whole.prefixed and whole.dataset is images and whole.forward is effnet and whole.workers == 3
    assert whole.key_prefix == ""


def test_evaluation_takes_what_it_is_given(effnet, images):
    """accuracy and evaluate_all run what the recipe hands them: no prefix is looked for inside."""
    effnet.train()
    inputs_of = inputs.evaluation(effnet, torch.device("cpu"), 8, 0, "fp32")
    given = inputs_of(images, "held-out")
    assert not effnet.training and given.prefixed  # the model put in eval mode first
    calls = []

    def whole(dataset, desc):
        calls.append(desc)
        return inputs.Inputs(dataset, effnet, 0)

    class Bundle:
        heldout, test, shifts = images, type("Test", (), {"dataset": images, "project": None}), []

    with_prefix = evaluate_all(inputs_of, Bundle, torch.device("cpu"), 8, shifts=False)
    without = evaluate_all(whole, Bundle, torch.device("cpu"), 8, shifts=False)
    assert calls == ["held-out", "test"] and with_prefix == without


def test_recipes_of_any_batch_size_share_one_prefix_pass(effnet, images, monkeypatch):
    """Learned-Soup (batch 256) and the other recipes (128) find the same outputs: the prefix runs
    PASS_BATCH images at a time whatever the recipe's batch, so one pass serves them all."""
    effnet.eval()
    prefix._MEMORY.update(key=None, outputs={})
    batches = []
    real = prefix._compute
    monkeypatch.setattr(prefix, "_compute", lambda split, dataset, device, batch_size, *rest:
                        batches.append(batch_size) or real(split, dataset, device, batch_size, *rest))
    for batch in (256, 128, 7):
        assert inputs.evaluation(effnet, torch.device("cpu"), batch, 0, "fp32")(images, "test").prefixed
        assert inputs.learning(effnet, images, torch.device("cpu"), batch, 0, ["_fc.weight"], "fp32").prefixed
    assert batches == [prefix.PASS_BATCH]


def test_no_prefix_for_other_archs(images):
    model = get_arch(TINY_CNN).build(10)
    assert prefix.split_of(model) is None and prefix.outputs(model, images, torch.device("cpu")) is None


@pytest.fixture(scope="module")
def effnet_zoo(tmp_path_factory):
    """Four EfficientNet-Lite0 ingredients laid out like the default zoo: the stem and blocks 0-14
    identical in all, the last block, the conv head and the head fine-tuned (seeded noise)."""
    folder = tmp_path_factory.mktemp("effnet_zoo")
    torch.manual_seed(0)
    base = get_arch(ARCH).build(10, pretrained=False).state_dict()
    frozen = effnet_arch.frozen_prefixes(15)
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        sd = {k: v.clone() if k.startswith(frozen) or not v.is_floating_point() or "running" in k
              else v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        torch.save(sd, folder / f"model_{i}.pt")
    return folder


def without_prefix(monkeypatch):
    monkeypatch.setattr(prefix, "split_of", lambda model: None)


def soup_of(folder, name):
    return torch.load(folder / f"{name}.pt", weights_only=True)


MEHL_FLAGS = ["--model_batch", "2", "--layer-size", "0", "--epochs", "2", "--cosine-lr", "--no-epoch-test"]


def recording(monkeypatch):
    """Every `inputs.learning` a recipe asks for, with the learned tensors it named: [(learned, Inputs)]."""
    asked, real = [], inputs.learning

    def learning(model, dataset, device, batch_size, workers, learned, *rest, **kw):
        asked.append((list(learned), real(model, dataset, device, batch_size, workers, learned, *rest, **kw)))
        return asked[-1][1]
    monkeypatch.setattr(inputs, "learning", learning)
    return asked


@pytest.mark.slow
def test_greedy_and_mehl_on_the_default_arch_are_those_without_the_prefix(tmp_path, effnet_zoo, fmnist_root,
                                                                          monkeypatch):
    common = dict(arch=ARCH, heldout=4, test_size=40, batch_size=16)
    runs, used, real = {}, [], prefix.outputs
    monkeypatch.setattr(prefix, "outputs", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    asked = recording(monkeypatch)
    for tag in ("with", "without"):
        if tag == "without":
            monkeypatch.undo()
            without_prefix(monkeypatch)
        out = tmp_path / tag
        out.mkdir()
        runs[tag] = (greedy_soup.main(argv(effnet_zoo, fmnist_root, out, name="greedy", **common)),
                     mehl.main(argv(effnet_zoo, fmnist_root, out, *MEHL_FLAGS, name="mehl", **common)))
        runs[tag + "_dir"] = out
    (g1, m1), (g2, m2) = runs["with"], runs["without"]
    assert g1["ingredients"] == g2["ingredients"]
    for key in ("heldout", "test", "shifts"):
        assert g1[key] == g2[key], key
    assert sum(u is not None for u in used) >= 3  # held-out, test and shifts, evaluated from it
    learning = [given for learned, given in asked if learned]
    assert learning and all(given.prefixed for given in learning)  # MEHL learned from it too
    a, b = soup_of(runs["with_dir"], "mehl"), soup_of(runs["without_dir"], "mehl")
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert m1["heldout"] == pytest.approx(m2["heldout"], abs=1e-9)


LEARNED_FLAGS = ["--layerwise", "--epochs", "2"]


@pytest.mark.slow
def test_learned_soup_on_the_default_arch_is_the_one_without_the_prefix(tmp_path, effnet_zoo, fmnist_root,
                                                                        monkeypatch):
    common = dict(arch=ARCH, heldout=4, test_size=40, batch_size=16)
    asked = recording(monkeypatch)
    with_prefix = learned_soup.main(argv(effnet_zoo, fmnist_root, tmp_path, *LEARNED_FLAGS, name="with",
                                         **common))
    learning = [given for learned, given in asked if learned]
    assert len(learning) == 2 and all(isinstance(given.forward, prefix.Tail) for given in learning)
    monkeypatch.undo()
    without_prefix(monkeypatch)
    without = learned_soup.main(argv(effnet_zoo, fmnist_root, tmp_path, *LEARNED_FLAGS, name="without",
                                     **common))
    a, b = soup_of(tmp_path, "with"), soup_of(tmp_path, "without")
    assert any(not torch.equal(a[k], soup_of(effnet_zoo, "model_0")[k]) for k in a)  # it learned something
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert with_prefix["temperature"] == pytest.approx(without["temperature"], rel=1e-4)
    assert with_prefix["heldout"] == pytest.approx(without["heldout"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["mehl", "learned"])
def test_two_processes_are_one_process_with_the_prefix(script, tmp_path, effnet_zoo, fmnist_root):
    module, file, flags = {"mehl": (mehl, "MEHL_soup_layer.py", MEHL_FLAGS),
                           "learned": (learned_soup, "learned_soup.py", LEARNED_FLAGS)}[script]
    common = dict(arch=ARCH, heldout=4, test_size=40, batch_size=16)
    one = module.main(argv(effnet_zoo, fmnist_root, tmp_path, *flags, name="one", **common))
    done = torchrun(file, argv(effnet_zoo, fmnist_root, tmp_path, *flags, name="two", **common), nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = soup_of(tmp_path, "one"), soup_of(tmp_path, "two")
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    two = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert two["world_size"] == 2 and two["heldout"] == pytest.approx(one["heldout"], abs=1e-9)


# ------------------------------------------------------------------------- outputs kept on disk
@pytest.fixture
def fm_images():
    """Fashion-MNIST-like uint8 images behind the default arch's transform: a data set that can say
    exactly what its items are (fingerprint, items), as the real splits do."""
    from datasets.fashion_mnist import ImageTensors
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (20, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return ImageTensors(images, (torch.arange(20) % 10).numpy(), get_arch(ARCH).preprocess, cache=True)


class Counting:
    """A data set's items counted as they go through the prefix (a file read calls only `items`)."""

    def __init__(self, dataset):
        self.dataset, self.got, self.fresh = dataset, 0, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.got += 1
        return self.dataset[i]

    def fingerprint(self):
        return self.dataset.fingerprint()

    def items(self, indices):
        self.fresh += len(indices)
        return self.dataset.items(indices)


def fresh_copy(model):
    """The same model in a new object, as in a new process: nothing of the memory cache comes with it."""
    prefix._MEMORY.update(key=None, outputs={})
    torch.manual_seed(0)
    other = get_arch(ARCH).build(10, pretrained=False)
    other.load_state_dict(model.state_dict())
    return other.eval()


def cpu():
    return torch.device("cpu")


def test_a_new_process_reads_the_outputs_from_disk(effnet, fm_images, tmp_path):
    prefix.configure(tmp_path)
    first = Counting(fm_images)
    split, h, y = prefix.outputs(effnet, first, cpu(), batch_size=8)
    assert first.got == len(fm_images) and len(list(tmp_path.glob("*.pt"))) == 1
    again = Counting(fm_images)
    other = fresh_copy(effnet)
    _, h2, y2 = prefix.outputs(other, again, cpu(), batch_size=8)
    assert again.got == 0 and again.fresh == prefix.SPOT_CHECKS  # read, after a few items were checked
    assert torch.equal(h2, h) and torch.equal(y2, y)
    with torch.no_grad():  # and it still stands for the model
        x, _ = fm_images.items(range(len(fm_images)))
        assert_close(split.tail(h2), other(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["prefix tensor", "batch size", "images", "labels", "transform"])
def test_anything_the_outputs_depend_on_names_another_file(change, effnet, fm_images, tmp_path):
    from datasets.fashion_mnist import ImageTensors
    from utils.archs import image_transform
    prefix.configure(tmp_path)
    prefix.outputs(effnet, fm_images, cpu(), batch_size=8)
    model, data, batch = fresh_copy(effnet), fm_images, 8
    if change == "prefix tensor":
        with torch.no_grad():
            model._blocks[3]._bn1.running_var.mul_(1.5)
    elif change == "batch size":
        batch = 4
    elif change == "images":
        images = fm_images.images.clone()
        images[7, 0, 5, 5] ^= 1
        data = ImageTensors(images, fm_images.labels, fm_images.transform, cache=True)
    elif change == "labels":
        labels = fm_images.labels.copy()
        labels[0] = (labels[0] + 1) % 10
        data = ImageTensors(fm_images.images, labels, fm_images.transform, cache=True)
    else:
        data = ImageTensors(fm_images.images, fm_images.labels, image_transform(36), cache=True)
    counted = Counting(data)
    prefix.outputs(model, counted, cpu(), batch_size=batch)
    assert counted.got == len(data) and len(list(tmp_path.glob("*.pt"))) == 2


def written(tmp_path):
    (path,) = tmp_path.glob("*.pt")
    return path


def test_a_damaged_or_stale_file_is_computed_again_and_replaced(effnet, fm_images, tmp_path, caplog):
    prefix.configure(tmp_path)
    _, h, y = prefix.outputs(effnet, fm_images, cpu(), batch_size=8)
    path = written(tmp_path)
    good = path.read_bytes()
    saved = torch.load(path, weights_only=True)
    stale = dict(saved, h=saved["h"] + 0.5)  # the right key and checksum, other numbers
    stale["checksum"] = prefix._checksum(stale["h"], stale["y"])
    truncated, flipped = good[: len(good) // 2], bytearray(good)
    cases = {"truncated": lambda: path.write_bytes(truncated),
             "checksum": lambda: torch.save(dict(saved, h=saved["h"].flip(0)), path),
             "stale": lambda: torch.save(stale, path),
             "other key": lambda: torch.save(dict(saved, key="0" * 64), path),
             "labels": lambda: torch.save(dict(saved, y=(saved["y"] + 1) % 10,
                                               checksum=prefix._checksum(saved["h"], (saved["y"] + 1) % 10)),
                                          path),
             "not a dict": lambda: torch.save([saved["h"]], path),
             "sparse": lambda: torch.save(dict(saved, h=saved["h"].to_sparse()), path),
             "half": lambda: torch.save(dict(saved, h=saved["h"].half(),
                                             checksum=prefix._checksum(saved["h"].half(), saved["y"])), path)}
    flipped[len(flipped) // 2] ^= 0xFF
    cases["bytes flipped"] = lambda: path.write_bytes(bytes(flipped))
    for name, damage in cases.items():
        damage()
        counted = Counting(fm_images)
        caplog.clear()
        _, h2, y2 = prefix.outputs(fresh_copy(effnet), counted, cpu(), batch_size=8)
        assert counted.got == len(fm_images), name  # computed again
        assert torch.equal(h2, h) and torch.equal(y2, y), name
        assert "ignored" in caplog.text, name
        reread = torch.load(path, weights_only=True)  # and replaced by a good file
        assert torch.equal(reread["h"], h), name


class Payload:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['PAYLOAD_MARK'], 'w').write('ran')",))


def test_a_hostile_file_runs_nothing(effnet, fm_images, tmp_path, monkeypatch, caplog):
    prefix.configure(tmp_path / "cache")
    prefix.outputs(effnet, fm_images, cpu(), batch_size=8)
    path = written(tmp_path / "cache")
    mark = tmp_path / "mark"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    torch.save({"format": prefix.FORMAT, "h": Payload()}, path)
    counted = Counting(fm_images)
    prefix.outputs(fresh_copy(effnet), counted, cpu(), batch_size=8)
    assert not mark.exists() and counted.got == len(fm_images) and "unreadable" in caplog.text


def never_loaded(monkeypatch, path):
    """Fail the test if `path` reaches torch.load (any other file loads as usual)."""
    real = torch.load
    monkeypatch.setattr(prefix.torch, "load", lambda f, *a, **k: pytest.fail("loaded") if str(f) == str(path)
                        else real(f, *a, **k))


def test_a_file_too_large_to_have_been_written_is_not_loaded(effnet, fm_images, tmp_path, monkeypatch, caplog):
    prefix.configure(tmp_path)
    prefix.outputs(effnet, fm_images, cpu(), batch_size=8)
    path = written(tmp_path)
    monkeypatch.setattr(prefix, "LIMIT_BYTES", 100_000)
    torch.save({"h": torch.zeros(200_000)}, path)  # 800 KB where at most 100 KB is ever written
    never_loaded(monkeypatch, path)
    counted = Counting(fm_images)
    prefix.outputs(fresh_copy(effnet), counted, cpu(), batch_size=8)
    assert "more than a cache file of 20 items may hold" in caplog.text and counted.got == len(fm_images)


def read_in_thread(model, data, path, fifo):
    """prefix.outputs in a thread; when it has not returned after a while (a FIFO opened for reading
    waits for a writer), a writer that closes at once lets it go on. Returns whether it returned alone."""
    import threading
    thread = threading.Thread(target=prefix.outputs, args=(model, data, cpu()), kwargs={"batch_size": 8},
                              daemon=True)
    thread.start()
    thread.join(timeout=60)  # a hang detector, not a speed limit: the checked read takes milliseconds
    alone = not thread.is_alive()
    if not alone and fifo:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
    return alone


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_cache_entry_that_is_not_a_regular_file_is_never_opened(kind, effnet, fm_images, tmp_path, caplog):
    prefix.configure(tmp_path)
    _, h, _ = prefix.outputs(effnet, fm_images, cpu(), batch_size=8)
    path = written(tmp_path)
    path.unlink()
    {"fifo": lambda: os.mkfifo(path), "device": lambda: path.symlink_to("/dev/zero"),
     "folder": lambda: path.mkdir()}[kind]()
    counted = Counting(fm_images)
    assert read_in_thread(fresh_copy(effnet), counted, path, kind == "fifo")
    assert "not a regular file" in caplog.text and counted.got == len(fm_images)  # computed again
    if kind != "folder":  # replaced by a good file (a folder cannot be: a warning, the run goes on)
        assert path.is_file() and not path.is_symlink()
        assert torch.equal(torch.load(path, weights_only=True)["h"], h)


def test_a_zip_bomb_in_the_cache_is_refused_unread(effnet, fm_images, tmp_path, monkeypatch, caplog):
    """A deflated zip entry inflates inside torch.load: what the entries declare is bounded first, as
    the ingredient loader bounds it (utils/files/state_dicts.check_unpacked_size)."""
    import zipfile
    prefix.configure(tmp_path)
    prefix.outputs(effnet, fm_images, cpu(), batch_size=8)
    path = written(tmp_path)
    monkeypatch.setattr(prefix, "LIMIT_BYTES", 100_000)  # a small bound: the same check as at 512 MiB
    with zipfile.ZipFile(path) as good:
        entries = [(info.filename, good.read(info)) for info in good.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for name, data in entries:
            bomb.writestr(name, data)
        bomb.writestr(entries[0][0].split("/")[0] + "/data/zeros", bytes(20 * 2**20))
    assert path.stat().st_size < 100_000  # small on disk: 20 MiB when inflated
    never_loaded(monkeypatch, path)
    counted = Counting(fm_images)
    prefix.outputs(fresh_copy(effnet), counted, cpu(), batch_size=8)
    assert "zip entries unpack to" in caplog.text and counted.got == len(fm_images)


def test_the_guarantees_say_what_the_cache_trusts():
    """A file edited on purpose (one row changed, its checksum recomputed) passes unless a spot check
    draws that row: the docs say the folder is trusted as the code is, and what the checks catch."""
    from pathlib import Path
    text = " ".join((Path(__file__).parents[1] / "docs" / "GUARANTEES.md").read_text().split())
    assert "trusts its folder as it trusts the code" in text
    assert "a deliberate edit" in text and f"{prefix.SPOT_CHECKS} random items" in text


def test_an_unwritable_folder_costs_a_warning_not_the_run(effnet, fm_images, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder would be")
    prefix.configure(blocker / "cache")
    _, h, _ = prefix.outputs(effnet, fm_images, cpu(), batch_size=8)
    assert "not kept on disk" in caplog.text and h.shape[0] == len(fm_images)


@pytest.mark.slow
def test_soup_runs_read_what_earlier_runs_wrote(tmp_path, effnet_zoo, fmnist_root, monkeypatch, own_cache):
    """Two processes' worth of greedy soup and MEHL-Soup+: the second run of each computes no prefix
    output (every data set comes from disk) and reports exactly what the first did; 'none' writes
    nothing."""
    common = dict(arch=ARCH, heldout=4, test_size=40, batch_size=16)
    cache = tmp_path / "cache"
    flags = ["--prefix-cache", str(cache)]
    first = {"greedy": greedy_soup.main(argv(effnet_zoo, fmnist_root, tmp_path, *flags, name="g1", **common)),
             "mehl": mehl.main(argv(effnet_zoo, fmnist_root, tmp_path, *MEHL_FLAGS, *flags, name="m1",
                                    **common))}
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 8  # held-out, test and six shift sets: one prefix, one set of files
    computed, real = [], prefix._write
    monkeypatch.setattr(prefix, "_write", lambda *a: computed.append(a) or real(*a))
    second = {"greedy": greedy_soup.main(argv(effnet_zoo, fmnist_root, tmp_path, *flags, name="g2", **common)),
              "mehl": mehl.main(argv(effnet_zoo, fmnist_root, tmp_path, *MEHL_FLAGS, *flags, name="m2",
                                     **common))}
    assert computed == [] and sorted(cache.glob("*.pt")) == files
    for name in first:
        for key in ("heldout", "test", "shifts"):
            assert second[name][key] == first[name][key], (name, key)
    a, b = soup_of(tmp_path, "m1"), soup_of(tmp_path, "m2")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: the same outputs, the same learning
    greedy_soup.main(argv(effnet_zoo, fmnist_root, tmp_path, "--prefix-cache", "none", name="g3", **common))
    assert sorted(cache.glob("*.pt")) == files and not any(own_cache.iterdir())  # nor the default folder


def test_an_empty_cache_folder_is_refused(tmp_path, effnet_zoo, fmnist_root, capsys):
    from tests.helpers import nothing_written, refused
    line = refused(capsys, "uniform", argv(effnet_zoo, fmnist_root, tmp_path, "--prefix-cache", " ", arch=ARCH))
    assert "--prefix-cache" in line
    nothing_written(tmp_path)
