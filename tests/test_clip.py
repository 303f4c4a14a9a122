"""CLIP archs: the published model-soups key layout, strict loading, the forward, the real B/32 tower."""
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from utils.archs import get_arch
from utils.archs.clip import CLIP_MEAN, CLIP_STD
from utils.files.state_dicts import check_state_dict, load_state_dict, save_state_dict
from utils.runtime.errors import UserError

TEXT_LEFTOVERS = {"model.positional_embedding", "model.text_projection", "model.logit_scale",
                  "model.token_embedding.weight", "model.ln_final.weight", "model.ln_final.bias"}


@pytest.fixture(scope="module")
def tiny():
    return get_arch("tiny-clip").build(7, pretrained=False)


def test_tiny_clip_key_layout(tiny):
    keys = list(tiny.state_dict())
    assert all(k.startswith(("model.", "classification_head.")) for k in keys)
    assert not [k for k in keys if k.startswith("model.transformer.")]
    assert {"classification_head.weight", "classification_head.bias"} <= set(keys)
    assert "model.visual.conv1.weight" in keys and "model.visual.proj" in keys
    rest = {k for k in keys if not k.startswith(("model.visual.", "classification_head."))}
    assert rest == TEXT_LEFTOVERS
    assert tiny.classification_head.weight.shape == (7, 16)
    # the leftovers are parameters (published checkpoints hold them), frozen and unused in forward
    params = dict(tiny.named_parameters())
    assert TEXT_LEFTOVERS <= set(params) and not any(params[k].requires_grad for k in TEXT_LEFTOVERS)


def test_tiny_clip_save_and_strict_reload(tiny, tmp_path):
    path = save_state_dict(tiny.state_dict(), tmp_path / "model_0.pt")
    fresh = get_arch("tiny-clip").build(7)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(load_state_dict(path), strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), tiny.eval()(x))


def test_tiny_clip_forward_normalised_features_into_head(tiny):
    x = torch.randn(4, 3, 32, 32)
    tiny.eval()
    feats = tiny.features(x)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4))
    raw = tiny.model.visual(x)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(tiny(x), tiny.classification_head(raw / raw.norm(dim=-1, keepdim=True)))
    assert tiny(x).dtype == torch.float32
    tiny.train()
    tiny(x).sum().backward()
    assert tiny.model.visual.conv1.weight.grad is not None
    assert tiny.model.token_embedding.weight.grad is None
    tiny.zero_grad()


def test_check_state_dict_names_the_bad_key(tiny):
    ref = tiny.state_dict()
    missing = {k: v for k, v in ref.items() if k != "model.visual.proj"}
    with pytest.raises(UserError, match=r"missing keys: model\.visual\.proj"):
        check_state_dict(missing, ref, "model_1.pt")
    extra = {**ref, "model.transformer.resblocks.0.ln_1.weight": torch.ones(16)}
    with pytest.raises(UserError, match=r"unexpected keys: model\.transformer\.resblocks\.0\.ln_1\.weight"):
        check_state_dict(extra, ref, "model_1.pt")
    shaped = {**ref, "classification_head.weight": torch.zeros(1000, 16)}
    with pytest.raises(UserError, match=r"mis-shaped: classification_head\.weight \(1000, 16\)"):
        check_state_dict(shaped, ref, "model_1.pt")
    check_state_dict(ref, ref, "model_1.pt")


def test_aliases_and_no_download():
    for alias in ("clip-vit-b32", "clip-vit-b/32", "ViT-B/32", "vit-b-32"):
        assert get_arch(alias).name == "clip-vit-b32"
    for alias in ("clip-vit-l14", "clip-vit-l/14", "ViT-L/14"):
        assert get_arch(alias).name == "clip-vit-l14"
    assert all(get_arch(n).is_vit for n in ("clip-vit-b32", "clip-vit-l14", "tiny-clip"))
    with pytest.raises(UserError, match="ingredient"):
        get_arch("clip-vit-b32").build(1000, pretrained=True)


def test_clip_preprocess():
    spec = get_arch("clip-vit-b32")
    resize = next(t for t in spec.preprocess.transforms if isinstance(t, v2.Resize))
    assert resize.interpolation == v2.InterpolationMode.BICUBIC
    x = spec.preprocess(Image.new("RGB", (300, 200), (128, 128, 128)))
    assert x.shape == (3, 224, 224)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[:, 100, 100], expected)


def test_real_vit_b32_layout():
    from open_clip.transformer import QuickGELU
    model = get_arch("clip-vit-b32").build(1000)
    sd = model.state_dict()
    # 152 visual tensors (12 blocks x 12 + 8), 6 text-side leftovers, 2 head tensors
    assert len(sd) == 160
    assert sum(k.startswith("model.visual.") for k in sd) == 152
    assert sd["model.visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert sd["model.token_embedding.weight"].shape == (49408, 512)
    assert sd["model.positional_embedding"].shape == (77, 512)
    assert sd["classification_head.weight"].shape == (1000, 512)
    blocks = model.model.visual.transformer.resblocks
    assert len(blocks) == 12 and all(isinstance(b.mlp.gelu, QuickGELU) for b in blocks)
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
