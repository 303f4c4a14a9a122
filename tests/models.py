"""Models only the tests use.

`wide_cnn` is `--arch tests.models:wide_cnn` (a factory, utils/archs/factory.py; the tests run from the
repository's root, where `tests` is importable): the tiny-cnn arch (utils.archs.TinyCNN, BatchNorm
included) 64 times wider, about 4.7 M parameters or 19 MB an ingredient, so that one ingredient stands
out of the noise of a process's peak resident memory in tests of memory bounds, while a forward pass on
16 px images stays cheap."""
from utils.archs import TinyCNN, image_transform
from utils.runtime.errors import UserError

WIDE_CNN_WIDTH = 512


def wide_cnn(num_classes, pretrained=False):
    if pretrained:
        raise UserError("wide_cnn has no pre-trained weights")
    return TinyCNN(num_classes, width=WIDE_CNN_WIDTH), image_transform(16)
