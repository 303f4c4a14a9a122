"""The paper's inputs at a tiny size: CLIP ingredients built by open_clip's own classes (so the model
has its non-persistent `attn_mask` buffer, which no checkpoint holds), saved in the published
model-soups key layout, souped by all four scripts and both benchmarks on a tree laid out like
ImageNet's. MEHL-Soup+'s first step is compared with an independent float64 computation."""
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import greedy_soup
import learned_soup
import MEHL_soup_layer as mehl
import uniform_soup
from tests import helpers
from tests.conftest import ROOT, make_zoo, torchrun, write_imagenet_tree
from datasets import build_dataset
from utils.archs import get_arch

N, CLASSES = 4, 5
TEXT_LEFTOVERS = {"model.positional_embedding", "model.text_projection", "model.logit_scale",
                  "model.token_embedding.weight", "model.ln_final.weight", "model.ln_final.bias"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet_like"), CLASSES)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("clipzoo"), N, num_classes=CLASSES, arch="tiny-clip", noise=0.02)


argv = partial(helpers.argv, arch="tiny-clip", datasets="ImageNet", heldout=2, test_size=None, batch_size=8)


def test_zoo_is_in_the_published_layout(zoo):
    sd = torch.load(zoo / "model_0.pt", weights_only=True)
    assert all(k.startswith(("model.visual.", "classification_head.")) or k in TEXT_LEFTOVERS for k in sd)
    assert TEXT_LEFTOVERS <= set(sd) and "model.attn_mask" not in sd
    assert "model.attn_mask" in dict(get_arch("tiny-clip").build(CLASSES).named_buffers())


def test_uniform_greedy_learned_on_published_layout(zoo, data, tmp_path):
    u = uniform_soup.main([str(a) for a in argv(zoo, data, tmp_path, name="uniform")])
    g = greedy_soup.main([str(a) for a in argv(zoo, data, tmp_path, name="greedy")])
    lp = learned_soup.main([str(a) for a in argv(zoo, data, tmp_path, "--layerwise", "--epochs", 1,
                                                  name="learned")])
    assert u["method"] == "uniform" and len(u["ingredients"]) == N
    assert g["method"] == "greedy" and 1 <= len(g["ingredients"]) <= N
    assert lp["method"] == "Learned-Soup+"
    # the text leftovers are identical in every ingredient: kept, never stacked N times
    assert set(lp["identical_parameters"]) == TEXT_LEFTOVERS
    uniform = torch.load(tmp_path / "uniform.pt", weights_only=True)
    first = torch.load(zoo / "model_0.pt", weights_only=True)
    assert set(uniform) == set(first)
    mean = torch.stack([torch.load(zoo / f"model_{i}.pt", weights_only=True)["model.visual.proj"]
                        for i in range(N)]).mean(0)
    assert_close(uniform["model.visual.proj"], mean)


def test_learned_soup_stacks_only_differing_parameters(zoo, data, tmp_path):
    import datasets
    from utils.run import cli
    args = learned_soup.parse_args([str(a) for a in argv(zoo, data, tmp_path, "--layerwise")])
    setup = cli.prepare(args, data=datasets.build_dataset)
    layout, stacked = learned_soup.load_resident(setup.paths, setup, 0)
    assert set(layout.identical) == TEXT_LEFTOVERS and not layout.differing_buffers
    assert not TEXT_LEFTOVERS & set(stacked)
    visual = [n for n, _ in setup.model.named_parameters() if n not in TEXT_LEFTOVERS]
    assert list(stacked) == visual and all(t.shape[0] == N for t in stacked.values())


@pytest.mark.slow
def test_mehl_on_published_layout_one_and_two_processes(zoo, data, tmp_path):
    flags = ["--model_batch", 3, "--epochs", 1, "--no-epoch-test", "--randomseed", 2]
    one = mehl.main([str(a) for a in argv(zoo, data, tmp_path, *flags, name="one")])
    assert one["method"] == "MEHL-Soup+"
    assert set(one["identical_parameters"]) == TEXT_LEFTOVERS
    assert [len(g["ingredients"]) for g in one["groups"]] == [3, 1]
    done = torchrun("MEHL_soup_layer.py", argv(zoo, data, tmp_path, *flags, name="two"), nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(tmp_path / "one.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    for k in a:
        assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_mehl_bfloat16_directions_stay_close_to_float32(zoo, data, tmp_path):
    flags = ["--model_batch", 4, "--epochs", 1, "--no-epoch-test", "--no-shifts"]
    mehl.main([str(a) for a in argv(zoo, data, tmp_path, *flags, name="f32")])
    rec = mehl.main([str(a) for a in argv(zoo, data, tmp_path, *flags, "--directions-dtype", "bfloat16",
                                          name="bf16")])
    assert rec["args"]["directions_dtype"] == "bfloat16"
    a = torch.load(tmp_path / "f32.pt", weights_only=True)
    b = torch.load(tmp_path / "bf16.pt", weights_only=True)
    first = torch.load(zoo / "model_0.pt", weights_only=True)
    moved = max(float((a[k] - first[k]).abs().max()) for k in a if a[k].is_floating_point())
    gap = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert 0 < gap < 0.05 * moved


def test_mehl_first_step_matches_a_float64_reference(zoo, data, tmp_path):
    """One group of all N, one step over the whole held-out split (constant lr, AdamW): the soup must
    equal center + sum_i X_1[i, b] P[i, b] computed here in float64 from the checkpoints alone."""
    lr = 0.01
    rec = mehl.main([str(a) for a in argv(zoo, data, tmp_path, "--model_batch", N, "--epochs", 1,
                                          "--batch-size", 64, "--lr", lr, "--no-epoch-test", "--no-shifts",
                                          name="step")])
    assert len(rec["groups"]) == 1
    sds = [torch.load(zoo / f"model_{i}.pt", weights_only=True) for i in range(N)]
    learned = [k for k in sds[0] if k.startswith(("model.visual.", "classification_head."))]
    center = {k: torch.stack([sd[k].double() for sd in sds]).mean(0) for k in learned}
    P = [{k: (sd[k].double() - center[k]) / (sd[k].double() - center[k]).norm() for k in learned}
         for sd in sds]

    spec = get_arch("tiny-clip")
    model = spec.build(CLASSES).double().eval()
    model.load_state_dict({**sds[0], **{k: v for k, v in center.items()}}, strict=False)
    bundle = build_dataset("ImageNet", str(data), spec.preprocess, heldout_per_class=2)
    x, y = next(iter(torch.utils.data.DataLoader(bundle.heldout, batch_size=len(bundle.heldout))))
    params = {k: center[k].clone().requires_grad_() for k in learned}
    logits = torch.func.functional_call(model, params, (x.double(),))
    F.cross_entropy(logits, y).backward()
    g = {k: params[k].grad for k in learned}
    g_norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    scale = min(1.0, 1.0 / (float(g_norm) + 1e-6))                  # ViT clipping, as released
    soup = torch.load(tmp_path / "step.pt", weights_only=True)
    for k in learned:
        expected = center[k].clone()
        for i in range(N):
            dx = float((P[i][k] * g[k] * scale).sum())
            x1 = -lr * dx / (abs(dx) + 1e-8)                         # AdamW's first step, wd 0
            expected += x1 * P[i][k]
        assert_close(soup[k].double(), expected, atol=2e-6, rtol=1e-5)
    for k in TEXT_LEFTOVERS:
        assert torch.equal(soup[k], sds[0][k])


@pytest.mark.slow
def test_benchmarks_run_on_a_synthetic_clip_zoo(tmp_path, capsys):
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    rows = load("bench_mehl").main(["--arch", "tiny-clip", "--datasets", "ImageNet", "--synthetic-zoo", "3",
                                    "--num-classes", "3", "--ks", "1,3", "--batch-size", "4", "--steps", "1",
                                    "--threads", "1", "--out", str(tmp_path / "bench_mehl.json")])
    assert [r["k"] for r in rows] == [1, 3] and all(r["seconds_per_step"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "plain forward/backward" in out and "ingredients" in out
    saved = json.loads((tmp_path / "bench_mehl.json").read_text())
    assert saved["plain"]["k"] == 0 and len(saved["runs"]) == 2

    data = write_imagenet_tree(tmp_path / "data", 3)
    base = load("bench_baselines").main(["--arch", "tiny-clip", "--synthetic-zoo", "3", "--num-classes", "3",
                                         "--model-location", str(tmp_path / "zoo"), "--counts", "2",
                                         "--methods", "uniform,greedy,learned+", "--test-size", "4",
                                         "--out", str(tmp_path / "bench_baselines"), "--data-location",
                                         str(data), "--", "--datasets", "ImageNet", "--heldout-per-class", "2"])
    assert [r["method"] for r in base] == ["uniform", "greedy", "learned+"]
    assert all("error" not in r for r in base), base
