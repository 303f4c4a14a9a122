"""CLIP ViT image towers (open_clip QuickGELU configs) in the published model-soups key layout."""
from utils.archs import ArchSpec, register  # noqa: F401
