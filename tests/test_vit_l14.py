"""ViT-L/14, the paper's second model (`clip-vit-l14`, utils/archs/clip.py), in the published checkpoint
layout: stand-ins load strictly, and MEHL's memory plan (utils/run/plan.py) holds at its size: a fresh
MEHL-Soup+ process on two ViT-L/14 stand-ins at K = 2 peaks within 10 % of the peak it predicted (its
VmHWM on this CPU, as tests/test_plan.py measures)."""
import re

import pytest
import torch

from scripts.standins import jpeg_pool, write_imagenet_tree, write_synthetic_zoo
from tests.helpers import planned_mehl
from utils.archs import get_arch
from utils.files.ingredients import load_checked

ARCH = "clip-vit-l14"


def test_vit_l14_is_the_published_layout_of_a_large_tower():
    with torch.device("meta"):
        model = get_arch("vit-l/14").build(1000)
    sd = model.state_dict()
    assert {k for k in sd if not k.startswith("model.visual.")} == {
        "model.positional_embedding", "model.text_projection", "model.logit_scale", "model.token_embedding.weight",
        "model.ln_final.weight", "model.ln_final.bias", "classification_head.weight", "classification_head.bias"}
    assert sd["model.visual.conv1.weight"].shape == (1024, 3, 14, 14)  # 14 px patches, width 1024
    assert sum(k.endswith(".attn.in_proj_weight") for k in sd) == 24  # 24 blocks
    assert sd["classification_head.weight"].shape == (1000, 768)
    assert 300e6 < sum(p.numel() for p in model.parameters() if p.requires_grad) < 310e6


@pytest.mark.slow
def test_the_plan_holds_at_vit_l14_size(tmp_path):
    zoo, data, out = tmp_path / "zoo", tmp_path / "data", tmp_path / "out"
    write_synthetic_zoo(zoo, 2, ARCH, 2)
    reference = get_arch(ARCH).build(2).state_dict()
    assert load_checked(zoo / "model_1.pt", reference).keys() == reference.keys()
    del reference
    write_imagenet_tree(data, 2, 2, 2, {}, pool=jpeg_pool(count=4, size=(40, 30)))
    args = ["--model-location", zoo, "--arch", ARCH, "--datasets", "ImageNet", "--data-location", data,
            "--heldout-per-class", 2, "--test-size", 2, "--batch-size", 2, "--epochs", 1, "--no-epoch-test",
            "--no-shifts", "--model_batch", 2, "--device", "cpu", "--results-db", out / "results.jsonl",
            "--save-soup", "none", "--resume", out / "mehl.state.pt"]
    stderr, k, predicted, record = planned_mehl(args, out / "results.jsonl", timeout=1200)
    measured = record["peak_memory_bytes"]
    # the step's own part of the prediction (plain step + 2 rows), not only the process's peak before learning
    plain, row = (float(v) * 2**30 for v in re.search(
        r"measured before learning: ([0-9.]+) GiB; a step holds 2 row\(s\) .*?: ([0-9.]+) GiB each",
        stderr).groups())
    print(f"ViT-L/14, K = 2, batch 2: predicted {predicted / 2**30:.3f} GiB (plain step {plain / 2**30:.3f} + "
          f"2 rows of {row / 2**30:.3f}), measured {measured / 2**30:.3f} GiB ({(predicted - measured) / measured:+.1%})")
    assert k == record["model_batch"] == 2
    assert abs(predicted - measured) <= 0.1 * measured, (predicted, measured)
    assert abs(plain + 2 * row - measured) <= 0.1 * measured, (plain + 2 * row, measured)
