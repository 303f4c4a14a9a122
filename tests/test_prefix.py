"""The frozen prefix run once per data set (utils/prefix.py): it stands for the model only when it
computes what the whole model would, and the soups it speeds up are the soups without it."""
import json

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import TensorDataset

import greedy_soup
import learned_soup
import MEHL_soup_layer as mehl
from tests.conftest import torchrun
from tests.helpers import argv
from utils import arch_effnet, prefix
from utils.archs import get_arch
from utils.batchnorm import set_mode
from utils.evaluation import accuracy

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
    effnet.eval()
    monkeypatch.setattr(prefix, "LIMIT_BYTES", 1000)
    other = TensorDataset(*images.tensors)
    assert prefix.outputs(effnet, other, torch.device("cpu"), batch_size=8) is None
    logits = direct_logits(effnet, other)
    expected = 100.0 * (logits.argmax(1) == other.tensors[1]).double().mean().item()
    assert accuracy(effnet, other, torch.device("cpu"), batch_size=8) == pytest.approx(expected)


def test_no_prefix_for_other_archs(images):
    model = get_arch("tiny-cnn").build(10)
    assert prefix.split_of(model) is None and prefix.outputs(model, images, torch.device("cpu")) is None


@pytest.fixture(scope="module")
def effnet_zoo(tmp_path_factory):
    """Four EfficientNet-Lite0 ingredients laid out like the default zoo: the stem and blocks 0-14
    identical in all, the last block, the conv head and the head fine-tuned (seeded noise)."""
    folder = tmp_path_factory.mktemp("effnet_zoo")
    torch.manual_seed(0)
    base = get_arch(ARCH).build(10, pretrained=False).state_dict()
    frozen = arch_effnet.frozen_prefixes(15)
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


def test_greedy_and_mehl_on_the_default_arch_are_those_without_the_prefix(tmp_path, effnet_zoo, fmnist_root,
                                                                          monkeypatch):
    common = dict(arch=ARCH, heldout=4, test_size=40, batch_size=16)
    runs, used, real, inputs, real_inputs = {}, [], prefix.outputs, [], mehl.heldout_inputs
    monkeypatch.setattr(prefix, "outputs", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    monkeypatch.setattr(mehl, "heldout_inputs", lambda run: inputs.append(real_inputs(run)) or inputs[-1])
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
    assert inputs and not any(isinstance(forward, torch.nn.Module) for _, forward, _ in inputs)  # learned too
    a, b = soup_of(runs["with_dir"], "mehl"), soup_of(runs["without_dir"], "mehl")
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert m1["heldout"] == pytest.approx(m2["heldout"], abs=1e-9)


LEARNED_FLAGS = ["--layerwise", "--epochs", "2"]


def test_learned_soup_on_the_default_arch_is_the_one_without_the_prefix(tmp_path, effnet_zoo, fmnist_root,
                                                                        monkeypatch):
    common = dict(arch=ARCH, heldout=4, test_size=40, batch_size=16)
    inputs, real_inputs = [], learned_soup.heldout_inputs
    monkeypatch.setattr(learned_soup, "heldout_inputs",
                        lambda *a: inputs.append(real_inputs(*a)) or inputs[-1])
    with_prefix = learned_soup.main(argv(effnet_zoo, fmnist_root, tmp_path, *LEARNED_FLAGS, name="with",
                                         **common))
    assert len(inputs) == 2 and all(isinstance(forward, learned_soup.Tail) for _, forward, _, _ in inputs)
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
