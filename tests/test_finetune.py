"""finetune.py end to end on the tiny Fashion-MNIST fixture, and the seeded sweep (sweep.py)."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

import finetune
import sweep
from tests.models import TINY_CNN
from utils.archs import effnet
from utils.run import prefix
from utils.runtime.errors import UserError

TINY = ["--heldout-per-class", "3", "--finetune-size", "64", "--test-size", "30", "--batch-size", "16",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def lp_zoo(fmnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    finetune.main(["--data-location", str(fmnist_root), "--out-dir", str(out), "--index", "0",
                   "--linear-probe", "--epochs", "2", "--lr", "1e-2", *TINY])
    return out


def test_linear_probe_changes_only_the_head(lp_zoo):
    sd = torch.load(lp_zoo / "model_0.pt", weights_only=True)
    shipped = torch.load(effnet.weights_path(), weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in shipped.items() if k not in effnet.HEAD_KEYS)
    assert torch.count_nonzero(sd["_fc.weight"]) > 0
    record = json.loads((lp_zoo / "model_0.json").read_text())
    assert record["linear_probe"] and record["data"]["heldout_size"] == 30
    assert 0 <= record["heldout"] <= 100 and 0 <= record["test"] <= 100


def test_finetune_end_to_end_keeps_frozen_blocks_and_statistics(lp_zoo, fmnist_root):
    record = finetune.main(["--data-location", str(fmnist_root), "--out-dir", str(lp_zoo), "--index", "1",
                            "--epochs", "1", "--max-steps", "3", "--lr", "1e-3", "--mixup", "0.4",
                            "--randaug-n", "2", "--randaug-m", "9", "--label-smoothing", "0.1", *TINY])
    start = torch.load(lp_zoo / "model_0.pt", weights_only=True)
    sd = torch.load(lp_zoo / "model_1.pt", weights_only=True)
    assert list(sd) == list(start)
    prefixes = effnet.frozen_prefixes()
    frozen = [k for k in sd if k.startswith(prefixes)]
    assert frozen and all(torch.equal(sd[k], start[k]) for k in frozen)
    # BatchNorm statistics stay the pre-trained ones everywhere, also in the trained blocks
    assert all(torch.equal(sd[k], start[k]) for k in sd if "running_" in k or "num_batches" in k)
    assert not torch.equal(sd["_blocks.12._project_conv.weight"], start["_blocks.12._project_conv.weight"])
    assert not torch.equal(sd["_fc.weight"], start["_fc.weight"])
    saved = json.loads((lp_zoo / "model_1.json").read_text())
    assert saved["steps"] == 3 == record["steps"]
    assert saved["hparams"]["mixup"] == 0.4 and saved["hparams"]["randaug_n"] == 2
    assert saved["heldout"] == record["heldout"]
    # the accuracies come from cached frozen activations: the same as the whole model on the images
    from utils.archs import get_arch
    from utils.run.evaluation import accuracy
    spec = get_arch("efficientnet-lite0")
    _, bundle = finetune.load_bundle(finetune.parse_args(["--data-location", str(fmnist_root), *TINY]), spec)
    model = spec.build(10, pretrained=False)
    model.load_state_dict(sd)
    assert record["heldout"] == accuracy(model, bundle.heldout, "cpu")
    assert record["test"] == accuracy(model, bundle.test.dataset, "cpu")


class Computed:
    """Counts the items that go through a frozen prefix (utils/run/prefix.py), per data set size."""

    def __init__(self, monkeypatch):
        self.items, real = [], prefix._compute
        monkeypatch.setattr(prefix, "_compute", lambda split, dataset, *a: self.items.append(len(dataset))
                            or real(split, dataset, *a))


def forget_activations():
    """A new process, as far as the frozen activations go: nothing computed before is kept."""
    finetune._CACHE.clear()
    prefix._MEMORY.update(key=None, outputs={})


def test_refuses_existing_output_without_overwrite(lp_zoo, fmnist_root):
    args = ["--data-location", str(fmnist_root), "--out-dir", str(lp_zoo), "--index", "0",
            "--linear-probe", "--epochs", "1", *TINY]
    before = (lp_zoo / "model_0.pt").read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        finetune.main(args)
    assert (lp_zoo / "model_0.pt").read_bytes() == before
    finetune.main(args + ["--overwrite", "--lr", "5e-2"])
    assert (lp_zoo / "model_0.pt").read_bytes() != before


def test_finetune_without_linear_probe_is_a_user_error(tmp_path, fmnist_root):
    with pytest.raises(UserError, match="build the linear probe first"):
        finetune.main(["--data-location", str(fmnist_root), "--out-dir", str(tmp_path), "--index", "1",
                       *TINY])
    with pytest.raises(UserError, match="--lr must be > 0"):
        finetune.main(["--lr", "0", "--out-dir", str(tmp_path)])


def test_frozen_blocks_need_an_arch_that_declares_a_prefix(tmp_path, fmnist_root):
    """The depth is the architecture's declaration (utils/archs: register_split), not a name finetune.py
    knows: an arch that declares none trains whole, and refuses frozen blocks in one line."""
    args = ["--arch", TINY_CNN, "--linear-probe", "--epochs", "1", "--data-location", str(fmnist_root),
            "--out-dir", str(tmp_path), *TINY]
    with pytest.raises(UserError, match=f"--frozen-blocks 2: --arch {TINY_CNN} declares no frozen prefix"):
        finetune.main(args + ["--frozen-blocks", "2"])
    assert finetune.main(args)["steps"] > 0 and (tmp_path / "model_0.pt").is_file()


def test_sweep_draws_are_seeded_and_in_range():
    # the CPU default draws neither mixup nor RandAugment; the published zoo's shares can be asked for
    plain = sweep.draw(40, seed=3)[1:]
    assert all(cfg["mixup"] == 0 and cfg["randaug_n"] == 0 for cfg in plain)
    assert all(3e-5 <= cfg["lr"] <= 1.5e-4 and 4 <= cfg["epochs"] <= 8 for cfg in plain)
    assert 0 < sum(cfg["label_smoothing"] == 0 for cfg in plain) < len(plain)
    a, b, c = (sweep.draw(40, seed=s, lr=(1e-5, 2e-4), epochs=(2, 4), mixup_frac=0.5, randaug_frac=0.5)
               for s in (3, 3, 4))
    assert a == b and a != c
    assert a[0]["linear_probe"] and not any(cfg["linear_probe"] for cfg in a[1:])
    ft = a[1:]
    assert all(1e-5 <= cfg["lr"] <= 2e-4 and 1e-4 <= cfg["wd"] <= 0.2 and 2 <= cfg["epochs"] <= 4 for cfg in ft)
    assert all(0 <= cfg["label_smoothing"] <= 0.25 and 0 <= cfg["mixup"] <= 0.9 for cfg in ft)
    assert all(cfg["randaug_n"] in (0, 1, 2) for cfg in ft)
    assert all((cfg["randaug_m"] == 0) == (cfg["randaug_n"] == 0) and cfg["randaug_m"] <= 20 for cfg in ft)
    # a real spread: some without each regulariser, some with it; learning rates span the range
    for key in ("label_smoothing", "mixup", "randaug_m"):
        assert 0 < sum(cfg[key] == 0 for cfg in ft) < len(ft), key
    lrs = sorted(cfg["lr"] for cfg in ft)
    assert lrs[0] < 3e-5 and lrs[-1] > 1e-4
    with pytest.raises(UserError):
        sweep.draw(3, lr=(1e-3, 1e-4))
    # views: drawn for a share of the ingredients without mixup and RandAugment; the other draws unchanged
    viewed = sweep.draw(40, seed=3, views_frac=0.5, views=2)
    strip = [{k: v for k, v in cfg.items() if k != "views"} for cfg in viewed]
    assert strip == [{k: v for k, v in cfg.items() if k != "views"} for cfg in sweep.draw(40, seed=3)]
    assert all(cfg["views"] == 0 for cfg in sweep.draw(40, seed=3))
    assert 0 < sum(cfg["views"] == 2 for cfg in viewed) < 39 and set(cfg["views"] for cfg in viewed) == {0, 2}
    mixed = sweep.draw(40, seed=3, mixup_frac=0.5, randaug_frac=0.5, views_frac=1.0)
    assert all(cfg["views"] == (0 if cfg["mixup"] or cfg["randaug_n"] else 3) for cfg in mixed[1:])


def test_sweep_builds_and_then_skips_existing(tmp_path, fmnist_root):
    argv = ["--n", "3", "--out", str(tmp_path), "--data-location", str(fmnist_root), "--max-steps", "2",
            "--subset", "32", *TINY]
    first = sweep.main(argv)
    assert [r["index"] for r in first] == [0, 1, 2]
    # the sweep's default fine-tune flags, unless given: frozen blocks by default, batch size as given
    assert first[1]["hparams"]["frozen_blocks"] == 15 and first[1]["hparams"]["batch_size"] == 16
    assert (tmp_path / "model_1.pt").is_file() and (tmp_path / "model_1.json").is_file()
    # efficientnet-lite0 starts from the anchor: one fine-tune of the probe, not an ingredient
    anchor = json.loads((tmp_path / "anchor" / "model_0.json").read_text())
    assert anchor["init"] == str(tmp_path / "model_0.pt") and not anchor["linear_probe"]
    assert anchor["hparams"]["lr"] == sweep.ANCHOR["lr"] and anchor["hparams"]["seed"] == sweep.ANCHOR["seed"]
    assert first[0]["init"] is None
    assert all(r["init"] == str(tmp_path / "anchor" / "model_0.pt") for r in first[1:])
    # each on its own subset of the pool (drawn with its seed), the default pool unless given
    assert all(r["hparams"]["subset"] == 32 for r in first[1:]) and first[1]["data"]["finetune_size"] == 64
    start = torch.load(tmp_path / "anchor" / "model_0.pt", weights_only=True)
    probe = torch.load(tmp_path / "model_0.pt", weights_only=True)
    assert any(not torch.equal(start[k], probe[k]) for k in start if not k.startswith("_fc"))
    mtimes = [(tmp_path / p).stat().st_mtime_ns for p in ("model_1.pt", "anchor/model_0.pt")]
    again = sweep.main(argv)
    assert again == first and [(tmp_path / p).stat().st_mtime_ns for p in ("model_1.pt", "anchor/model_0.pt")] \
        == mtimes
    probe_start = sweep.main(argv[:3] + [str(tmp_path / "probe")] + argv[4:] + ["--start", "probe"])
    assert all(r["init"] is None for r in probe_start) and not (tmp_path / "probe" / "anchor").exists()
    # a zoo whose ingredients all exist builds no anchor (an older zoo stays as it is)
    assert sweep.main(argv[:3] + [str(tmp_path / "probe")] + argv[4:]) == probe_start
    assert not (tmp_path / "probe" / "anchor").exists()
    with pytest.raises(UserError, match="set by the sweep"):
        sweep.main(argv + ["--index", "3"])
    with pytest.raises(UserError, match="--lr is set by the sweep"):
        sweep.main(argv + ["--lr=1e-3"])


def test_plain_finetune_uses_cached_activations_and_matches_a_rerun(lp_zoo, fmnist_root, monkeypatch):
    args = ["--data-location", str(fmnist_root), "--out-dir", str(lp_zoo), "--epochs", "2", "--lr", "1e-3",
            "--seed", "5", *TINY]
    finetune.main(args + ["--index", "2"])
    computed = Computed(monkeypatch)
    finetune.main(args + ["--index", "3"])  # second run reads the cached frozen activations
    assert computed.items == []
    a = torch.load(lp_zoo / "model_2.pt", weights_only=True)
    b = torch.load(lp_zoo / "model_3.pt", weights_only=True)
    start = torch.load(lp_zoo / "model_0.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same ingredient
    assert not torch.equal(a["_blocks.15._project_conv.weight"], start["_blocks.15._project_conv.weight"])


def test_subset_trains_each_seed_on_its_own_images(lp_zoo, fmnist_root):
    args = ["--data-location", str(fmnist_root), "--out-dir", str(lp_zoo), "--epochs", "2", "--lr", "1e-3",
            "--subset", "32", *TINY]
    record = finetune.main(args + ["--index", "4", "--seed", "1"])
    assert record["steps"] == 2 * 2 and record["hparams"]["subset"] == 32  # 32 images in batches of 16
    parsed = [finetune.parse_args(args + ["--seed", str(s)]) for s in (1, 1, 2)]
    spec = finetune.get_arch("efficientnet-lite0")
    _, bundle = finetune.load_bundle(parsed[0], spec)
    a, b, c = (finetune.training_images(p, bundle) for p in parsed)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 32 == len(set(a.tolist())) and 0 <= a.min() and a.max() < len(bundle.finetune)
    with pytest.raises(UserError, match="--subset 65 is larger"):
        finetune.main(args[:-len(TINY)] + ["--subset", "65", *TINY, "--index", "5"])


def view_of(x, k):
    return torch.stack([img for img, _ in finetune.View(TensorDataset(x, torch.zeros(len(x))), k)])


def test_views_are_seeded_flips_and_shifts_of_the_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8).repeat(20, 1, 1, 1)
    a, b, c = view_of(x, 1), view_of(x, 1), view_of(x, 2)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    for img, orig in zip(a, x):  # every view is the image or its mirror, moved by at most 3 pixels
        assert any(torch.equal(img[:, max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)],
                               src[:, max(0, dy):8 + min(0, dy), max(0, dx):8 + min(0, dx)])
                   for src in (orig, orig.flip(-1)) for dy in range(-3, 4) for dx in range(-3, 4))
    assert not torch.equal(a, x)


def test_views_train_on_cached_views_and_refuse_per_batch_augmentation(lp_zoo, fmnist_root):
    args = ["--data-location", str(fmnist_root), "--out-dir", str(lp_zoo), "--epochs", "2", "--lr", "1e-3",
            "--seed", "5", *TINY]
    plain = finetune.main(args + ["--index", "6"])
    viewed = finetune.main(args + ["--index", "7", "--views", "2"])
    assert viewed["steps"] == plain["steps"] and viewed["hparams"]["views"] == 2
    a = torch.load(lp_zoo / "model_6.pt", weights_only=True)
    b = torch.load(lp_zoo / "model_7.pt", weights_only=True)
    assert not torch.equal(a["_fc.weight"], b["_fc.weight"])  # other inputs, same seed
    with pytest.raises(UserError, match="--views"):
        finetune.main(args + ["--index", "8", "--views", "2", "--mixup", "0.2"])


def test_a_sweep_computes_the_frozen_activations_once_per_data_set(tmp_path, fmnist_root, monkeypatch):
    """The fine-tune images (clean and each view), the held-out and the test set go through the frozen
    blocks once for the whole zoo: the probe, the anchor and every ingredient share them."""
    forget_activations()
    computed = Computed(monkeypatch)
    records = sweep.main(["--n", "4", "--out", str(tmp_path), "--data-location", str(fmnist_root), "--max-steps",
                          "2", "--subset", "32", "--views-frac", "1", "--views", "2", *TINY])
    assert [r["hparams"]["views"] for r in records] == [0, 2, 2, 2]
    # 64 fine-tune images, views 1 and 2 of them, 30 held-out and 30 test images: each once
    assert sorted(computed.items) == [30, 30, 64, 64, 64]


def test_a_frozen_tensor_changed_with_its_sum_kept_computes_the_activations_again(lp_zoo, fmnist_root,
                                                                                   tmp_path):
    """Two starts whose frozen parameters have the same sum (two elements of a frozen weight swapped):
    the second does not reuse the first's activations, so it trains as it would in a fresh process."""
    start = torch.load(lp_zoo / "model_0.pt", weights_only=True)
    key = "_blocks.3._project_conv.weight"  # frozen: block 3 < effnet.FROZEN_BLOCKS
    flat = start[key].flatten().clone()
    i, j = 0, int(torch.argmax((flat - flat[0]).abs()))
    flat[i], flat[j] = flat[j].clone(), flat[i].clone()
    swapped = dict(start, **{key: flat.reshape(start[key].shape)})
    frozen = [k for k in start if k.startswith(effnet.frozen_prefixes()) and "running" not in k
              and "num_batches" not in k]
    assert sum(start[k].double().sum() for k in frozen) == sum(swapped[k].double().sum() for k in frozen)
    torch.save(swapped, tmp_path / "swapped.pt")
    args = ["--data-location", str(fmnist_root), "--out-dir", str(lp_zoo), "--epochs", "1", "--lr", "1e-3",
            "--seed", "2", "--overwrite", *TINY]
    finetune.main(args + ["--index", "8"])                                                  # caches filled
    warm = finetune.main(args + ["--index", "9", "--init", str(tmp_path / "swapped.pt")])
    forget_activations()
    cold = finetune.main(args + ["--index", "10", "--init", str(tmp_path / "swapped.pt")])
    a = torch.load(lp_zoo / "model_9.pt", weights_only=True)
    b = torch.load(lp_zoo / "model_10.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (warm["heldout"], warm["test"]) == (cold["heldout"], cold["test"])
