"""CLIP ViT image towers (open_clip QuickGELU configs) in the published model-soups key layout.

The model-soups checkpoints (`model_{i}.pt`) hold an OpenAI CLIP model with its text transformer
removed, under `model.`, plus a linear head: `model.visual.*`, the text-side leftovers
`model.positional_embedding`, `model.text_projection`, `model.logit_scale`, `model.token_embedding.weight`,
`model.ln_final.*`, and `classification_head.weight` / `.bias`. `ClipClassifier` reproduces exactly
that layout, so such a checkpoint loads with `strict=True`.

OpenAI CLIP uses QuickGELU; open_clip's plain `ViT-B-32` config uses exact GELU and would compute
something else with the same weights, hence the `-quickgelu` configs.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from utils.archs import ArchSpec, image_transform, register
from utils.runtime.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A test arch: same code path and key layout as the real towers, a few thousand times smaller.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


class ClipClassifier(nn.Module):
    """CLIP image tower -> L2-normalised features -> linear head (model-soups' ModelWrapper).

    The text-side leftovers stay as parameters because the published checkpoints hold them; they are
    not used in forward and are frozen (requires_grad=False), so they are identical in every ingredient
    and the soup code leaves them out of coefficient problems (utils.run.layout.Layout.identical)."""

    def __init__(self, clip, num_classes):
        super().__init__()
        del clip.transformer  # the text transformer is not in the published checkpoints
        self.model = clip
        self.classification_head = nn.Linear(clip.visual.output_dim, num_classes)
        for name, p in self.model.named_parameters():
            if not name.startswith("visual."):
                p.requires_grad_(False)

    def features(self, images):
        return F.normalize(self.model.visual(images), dim=-1)

    def forward(self, images):
        return self.classification_head(self.features(images))


def _builder(model_name, config=None):
    def build(num_classes, pretrained=False):
        if pretrained:
            raise UserError(f"{model_name}: no pre-trained weights can be downloaded here; the ingredient "
                            "checkpoints supply every weight (build with pretrained=False)")
        import open_clip  # slow to import: only when a CLIP arch is actually built
        from open_clip.model import CLIP
        cfg = config or open_clip.get_model_config(model_name)
        if cfg is None:
            raise UserError(f"open_clip has no model config {model_name!r}")
        # A fixed random start, so two builds agree (as every arch here does); the global RNG
        # of the caller is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = CLIP(**cfg)
            model = ClipClassifier(clip, num_classes)
        return model.float()
    return build


def clip_transform(size):
    return image_transform(size, CLIP_MEAN, CLIP_STD, interpolation=v2.InterpolationMode.BICUBIC)


register(ArchSpec("clip-vit-b32", _builder("ViT-B-32-quickgelu"), clip_transform(224), clip_transform(224),
                  is_vit=True), "clip-vit-b/32", "vit-b/32", "vit-b-32")
register(ArchSpec("clip-vit-l14", _builder("ViT-L-14-quickgelu"), clip_transform(224), clip_transform(224),
                  is_vit=True), "clip-vit-l/14", "vit-l/14")
register(ArchSpec("tiny-clip", _builder("tiny-clip", TINY_CLIP_CONFIG), clip_transform(32), clip_transform(32),
                  is_vit=True))
