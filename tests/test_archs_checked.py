"""Architectures checked before work (docs/GUARANTEES.md, "Bad arguments and data are one line"): a
user's factory (`--arch package.module:factory`) is run once on one preprocessed image, at the check
and at the run's class count, and anything but logits (1, num_classes) in floating point is one line
saying what came back; a timm size (`timm:<name>@<size>`) is ASCII digits within a stated bound."""
import sys

import pytest
import torch

from tests.helpers import argv, refused
from utils.archs import _DYNAMIC, get_arch
from utils.runtime.errors import UserError

FACTORIES = '''
import torch
from torch import nn
from torchvision.transforms import v2

RGB16 = v2.Compose([v2.ToImage(), v2.Resize(16, antialias=True), v2.CenterCrop(16),
                    v2.ToDtype(torch.float32, scale=True)])
GREY16 = v2.Compose([v2.Grayscale(1), RGB16])


def net(outputs, channels=3):
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, outputs))


class Pair(nn.Module):
    def __init__(self, num_classes, as_dict=False):
        super().__init__()
        self.body, self.as_dict = net(num_classes), as_dict

    def forward(self, x):
        logits = self.body(x)
        return {"logits": logits, "features": x.mean()} if self.as_dict else (logits, x.mean())


class Ints(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = net(num_classes)

    def forward(self, x):
        return self.body(x).round().long()


def good(num_classes, pretrained=False):
    return net(num_classes), RGB16


def five(num_classes, pretrained=False):
    return net(5), RGB16


def two(num_classes, pretrained=False):
    """A head fixed at 2: right at the probe's 2 classes, wrong for any run with more."""
    return net(2), RGB16


def five_for_more_than_two(num_classes, pretrained=False):
    """Right at the probe's 2 classes, a head fixed at 5 for any run with more."""
    return net(num_classes if num_classes <= 2 else 5), RGB16


def one_channel_preprocess(num_classes, pretrained=False):
    return net(num_classes, channels=1), GREY16


def one_channel_model(num_classes, pretrained=False):
    return net(num_classes, channels=1), RGB16


def half(num_classes, pretrained=False):
    return net(num_classes).half(), RGB16


def pair(num_classes, pretrained=False):
    return Pair(num_classes), RGB16


def as_dict(num_classes, pretrained=False):
    return Pair(num_classes, as_dict=True), RGB16


def ints(num_classes, pretrained=False):
    return Ints(num_classes), RGB16
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    where = tmp_path_factory.mktemp("user_code")
    (where / "checked_factories.py").write_text(FACTORIES)
    sys.path.insert(0, str(where))
    yield "checked_factories"
    sys.path.remove(str(where))
    sys.modules.pop("checked_factories", None)
    for name in [n for n in _DYNAMIC if n.startswith("checked_factories:")]:
        del _DYNAMIC[name]


@pytest.mark.parametrize("name, expected", [
    ("five", "the model must map one preprocessed image (a batch of shape (1, 3, 16, 16)) to logits, a "
             "float tensor of shape (1, 2) for num_classes=2; it returned a float32 tensor of shape (1, 5)"),
    ("one_channel_preprocess", "the factory's preprocess must return a float tensor (3, H, W) (3 channels: "
                               "RGB) for a PIL image; it returned a float32 tensor of shape (1, 16, 16)"),
    ("one_channel_model", "the model fails on one preprocessed image (a float32 batch of shape (1, 3, 16, "
                          "16)): RuntimeError: "),
    ("half", "the model's parameters are float16, the preprocessed images float32: build the model in "
             "float32"),
    ("pair", "; it returned a tuple of 2 (Tensor, Tensor)"),
    ("as_dict", "; it returned a dict (keys: logits, features)"),
    ("ints", "; it returned an int64 tensor of shape (1, 2)"),
])
def test_factory_model_is_run_on_one_image_at_the_check(factories, name, expected):
    arch = f"{factories}:{name}"
    with pytest.raises(UserError) as err:
        get_arch(arch)
    message = str(err.value)
    assert message.startswith(f"--arch {arch}: ") and expected in message, message
    assert "\n" not in message


@pytest.mark.parametrize("name, outputs", [("two", 2), ("five_for_more_than_two", 5)])
def test_factory_is_checked_at_the_runs_class_count(capsys, factories, zoo, out, fmnist_root, name, outputs):
    """Fashion-MNIST has 10 classes: a head of 5 would be scored on a 5-way argmax, one of 2 fail on the
    labels. Refused when the model is built for the run, before the ingredients are read (they are not
    even this model's)."""
    arch = f"{factories}:{name}"
    spec = get_arch(arch)  # the probe at 2 classes passes
    assert spec.build(2)(torch.zeros(1, 3, 16, 16)).shape == (1, 2)
    line = refused(capsys, "uniform", argv(zoo, fmnist_root, out, arch=arch))
    assert line == (f"error: --arch {arch}: the model must map one preprocessed image (a batch of shape "
                    "(1, 3, 16, 16)) to logits, a float tensor of shape (1, 10) for num_classes=10; it "
                    f"returned a float32 tensor of shape (1, {outputs})")
    assert not (out / "results.jsonl").exists() and not (out / "soup.pt").exists()


def test_a_good_factory_is_built_as_it_was(factories):
    """The check leaves the model as the factory made it: weights, train mode, the caller's RNG."""
    spec = get_arch(f"{factories}:good")
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    model = spec.build(10)
    assert torch.equal(torch.rand(3), expected_draw)
    assert model.training and all(m.training for m in model.modules())
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    again = spec.build(10)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("size", ["²", "٣", "１６", "40000", "4097", "0", "", "-1", "64px", " 64"])
def test_timm_size_is_ascii_digits_within_the_bound(size):
    arch = f"timm:resnet18@{size}"
    with pytest.raises(UserError) as err:
        get_arch(arch)
    assert str(err.value) == (f"--arch {arch}: the input size after '@' must be a whole number of pixels "
                              f"from 1 to 4096 (ASCII digits), got {size!r}")


def test_timm_size_bound_is_in_the_help(capsys):
    import uniform_soup
    with pytest.raises(SystemExit):
        uniform_soup.parse_args(["--help"])
    assert "1 to 4096 pixels" in " ".join(capsys.readouterr().out.split())
