"""EfficientNet-Lite0: strict loading of the shipped ImageNet weights, and the pretrained=False build."""
import pytest
import torch

from utils.archs import effnet
from utils.archs import get_arch


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
    frozen, trainable = effnet.split_frozen(model, 10)
    with torch.no_grad():
        torch.testing.assert_close(trainable(frozen(x[None])), model(x[None]))
    prefixes = effnet.frozen_prefixes(10)
    assert "_blocks.9." in prefixes and "_blocks.10." not in prefixes
