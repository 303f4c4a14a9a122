"""Models only the tests use, each an `--arch package.module:factory` (utils/archs/factory.py): the tests
and the processes they start run from the repository's root, where `tests` is importable.

- `tiny_cnn` (`--arch tests.models:tiny_cnn`, `TINY_CNN`): a small conv net with BatchNorm, the arch of
  the tests' zoos, so that every script runs end to end in seconds on any input size.
- `wide_cnn`: the same net 64 times wider, about 4.7 M parameters or 19 MB an ingredient, so that one
  ingredient stands out of the noise of a process's peak resident memory in tests of memory bounds,
  while a forward pass on 16 px images stays cheap."""
from torch import nn

from utils.archs import image_transform
from utils.runtime.errors import UserError

TINY_CNN = "tests.models:tiny_cnn"
WIDE_CNN_WIDTH = 512


class TinyCNN(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def tiny_cnn(num_classes, pretrained=False):
    """Its "pre-trained" start is the fixed random init every build gives (the factory seeds it)."""
    return TinyCNN(num_classes), image_transform(16)


def wide_cnn(num_classes, pretrained=False):
    if pretrained:
        raise UserError("wide_cnn has no pre-trained weights")
    return TinyCNN(num_classes, width=WIDE_CNN_WIDTH), image_transform(16)
