"""EfficientNet-Lite0: strict loading of the shipped ImageNet weights, the pretrained=False build, and the
frozen prefix it declares in the architectures layer."""
import ast
from pathlib import Path

import pytest
import torch

from tests.models import TINY_CNN
from utils.archs import effnet
from utils.archs import get_arch, split_of
from utils.runtime.errors import UserError


@pytest.fixture(scope="module")
def shipped():
    return torch.load(effnet.weights_path(), map_location="cpu", weights_only=True)


def test_pretrained_loads_every_key_but_the_head(shipped):
    model = get_arch("efficientnet-lite0").build(10, pretrained=True)
    sd = model.state_dict()
    assert set(shipped) - set(sd) == set()
    assert sd["_fc.weight"].shape == (10, 1280) and shipped["_fc.weight"].shape == (1000, 1280)
    for k, v in shipped.items():
        if k not in effnet.HEAD_KEYS:
            assert torch.equal(sd[k], v), k
    assert torch.count_nonzero(sd["_fc.weight"]) == 0  # new head starts at zero


def test_strict_load_refuses_a_corrupted_key_name(shipped):
    model = get_arch("efficientnet-lite0").build(10, pretrained=False)
    bad = dict(shipped)
    bad["_blocks.3._bn1.weight_renamed"] = bad.pop("_blocks.3._bn1.weight")
    with pytest.raises(RuntimeError, match="_blocks.3._bn1.weight"):
        effnet.strict_load(model, bad)
    missing = {k: v for k, v in shipped.items() if k != "_conv_head.weight"}
    with pytest.raises(RuntimeError, match="_conv_head.weight"):
        effnet.strict_load(model, missing)


def test_unpretrained_build_has_same_keys_and_shapes_without_the_weights(shipped):
    a = get_arch("efficientnet-lite0").build(10, pretrained=True).state_dict()
    b = get_arch("efficientnet_lite0").build(10, pretrained=False).state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert not torch.equal(b["_conv_stem.weight"], shipped["_conv_stem.weight"])


def test_frozen_split_reproduces_the_eval_forward():
    model = get_arch("efficientnet-lite0").build(10, pretrained=True).eval()
    torch.nn.init.normal_(model._fc.weight)
    x = get_arch("efficientnet-lite0").preprocess(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8))
    assert x.shape == (3, effnet.IMAGE_SIZE, effnet.IMAGE_SIZE)
    split = split_of(model, 10)
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.head(x[None])), model(x[None]))
    assert "_blocks.9._project_conv.weight" in split.keys and "_conv_stem.weight" in split.keys
    assert not any(k.startswith("_blocks.10.") for k in split.keys)
    names = {n for n, m in model.named_modules() if any(m is f for f in split.modules)}
    assert {"_conv_stem", "_bn0", "_blocks.9", "_blocks.9._bn2"} <= names
    assert not any(n.startswith(("_blocks.10", "_conv_head", "_fc")) for n in names)


def test_the_declared_prefix_is_every_block_but_the_last_and_depths_are_bounded():
    model = get_arch("efficientnet-lite0").build(10, pretrained=False).eval()
    declared, fifteen = split_of(model), split_of(model, 15)
    assert declared.keys == fifteen.keys and any(k.startswith("_blocks.14.") for k in declared.keys)
    assert not any(k.startswith(("_blocks.15.", "_conv_head", "_fc")) for k in declared.keys)
    assert split_of(model, 0).keys == tuple(k for k in model.state_dict() if k.startswith(("_conv_stem.", "_bn0.")))
    with pytest.raises(UserError, match=r"--frozen-blocks must be in \[0, 16\], got 17"):
        split_of(model, 17)
    assert split_of(get_arch(TINY_CNN).build(10)) is None  # an arch that declares no prefix


def test_the_architectures_layer_imports_nothing_above_it():
    """effnet declares its prefix in utils/archs (Split, register_split), not by importing utils.run."""
    for path in Path(effnet.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m == "utils.run" or m.startswith("utils.run.")], path
