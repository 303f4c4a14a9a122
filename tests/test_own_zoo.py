"""Your own zoo (README, "Your own zoo"): a folder of images (`--datasets ImageFolder`), a timm CNN with
BatchNorm (`--arch timm:test_resnet@32`) and a user's factory (`--arch own_models:tiny`), each
fine-tuned into 3 ingredients (LP-FT) and souped by all four recipes through `main([...])`, MEHL-Soup+
also under 2 gloo processes; and the bad inputs of each, refused in one line before any work."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import finetune
import greedy_soup
import learned_soup
import MEHL_soup_layer as mehl
import uniform_soup
from conftest import ROOT, torchrun
from datasets import build_dataset
import sweep
from utils.archs import get_arch
from utils.files.checkpoint_formats import unwrap
from utils.run.batchnorm import reestimate
from utils.runtime.errors import UserError

CLASSES = ["cat", "dog", "fox"]
TIMM = "timm:test_resnet@32"
FACTORY = "own_models:tiny"
FACTORY_SOURCE = '''
import torch
from torch import nn
from torchvision.transforms import v2


def tiny(num_classes, pretrained=False):
    """A small conv net without BatchNorm (GroupNorm), 16 px input."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    preprocess = v2.Compose([v2.ToImage(), v2.Resize(16, antialias=True), v2.CenterCrop(16),
                             v2.ToDtype(torch.float32, scale=True)])
    return model, preprocess


def not_a_pair(num_classes):
    return nn.Linear(3, num_classes)
'''


def write_class(folder, c, n, seed, size=24):
    """n images of class c: a bright colour channel c and a class-dependent stripe, plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        img = rng.integers(0, 90, size=(size, size, 3))
        img[..., c] += 140
        img[4 * c:4 * c + 4, :, :] = 255
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img_{k:02d}.png")


def make_image_folder(root, train=10, val=4, shift=3):
    for c, name in enumerate(CLASSES):
        write_class(root / "train" / name, c, train, seed=c)
        write_class(root / "val" / name, c, val, seed=10 + c)
        write_class(root / "shifts" / "noisy" / name, c, shift, seed=20 + c)
    for c in (0, 2):  # a shift that lacks "dog": masked out of the logits, as ImageNet-R is
        write_class(root / "shifts" / "no_dog" / CLASSES[c], c, shift, seed=30 + c)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def factory_path(tmp_path_factory):
    """The user's module, importable through sys.path (PYTHONPATH for the torchrun children)."""
    where = tmp_path_factory.mktemp("user_code")
    (where / "own_models.py").write_text(FACTORY_SOURCE)
    sys.path.insert(0, str(where))
    yield where
    sys.path.remove(str(where))
    sys.modules.pop("own_models", None)


def data_args(folder):
    # 12 held-out images, soup batches of 6: under 2 processes each rank gets 3, never a lone image
    # (BatchNorm in train mode cannot take one image whose last feature map is 1x1)
    return ["--datasets", "ImageFolder", "--data-location", str(folder), "--heldout-per-class", "4"]


# 18 fine-tune images in batches of 17: the last batch of each epoch is one image, which BatchNorm in
# train mode cannot take (finetune.py skips it)
FT = ["--finetune-size", "0", "--test-size", "0", "--batch-size", "17", "--device", "cpu"]


@pytest.fixture(scope="module")
def timm_zoo(folder, tmp_path_factory):
    """Pre-trained weights as timm's training script saves them under DDP (1000-class head, keys under
    state_dict with `module.`), then the zoo launcher's sweep: a linear probe and 2 fine-tuned
    ingredients with BatchNorm in train mode (auto for timm)."""
    base = tmp_path_factory.mktemp("timm")
    with torch.random.fork_rng():
        torch.manual_seed(123)
        import timm
        sd = timm.create_model("test_resnet", num_classes=1000).state_dict()
    torch.save({"epoch": 7, "arch": "test_resnet", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "state_dict_ema": {f"module.{k}": v + 1 for k, v in sd.items()}}, base / "pretrained.pth")
    zoo = base / "zoo"
    records = sweep.main(["--n", "3", "--out", str(zoo), "--lr-min", "3e-3", "--lr-max", "1e-2",
                          "--epochs-min", "1", "--epochs-max", "1", "--arch", TIMM,
                          "--pretrained", str(base / "pretrained.pth"), *data_args(folder), *FT])
    return zoo, records, sd


@pytest.fixture(scope="module")
def factory_zoo(folder, factory_path, tmp_path_factory):
    zoo = tmp_path_factory.mktemp("factory") / "zoo"
    common = ["--arch", FACTORY, "--out-dir", str(zoo), *data_args(folder), *FT]
    finetune.main(["--index", "0", "--linear-probe", "--epochs", "5", "--lr", "1e-2", *common])
    for i, lr in ((1, "3e-3"), (2, "1e-2")):
        finetune.main(["--index", str(i), "--epochs", "2", "--lr", lr, "--seed", str(i), *common])
    return zoo


def soup_args(zoo, arch, folder, out, *extra):
    return ["--model-location", str(zoo), "--arch", arch, *data_args(folder), "--batch-size", "6",
            "--results-db", str(out / "results.jsonl"), *map(str, extra)]


def load(path):
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------ the data set
def test_image_folder_classes_splits_and_shifts(folder, tmp_path):
    bundle = build_dataset("ImageFolder", str(folder), lambda img: img, heldout_per_class=3, seed=0)
    assert bundle.num_classes == 3 and len(bundle.heldout) == 9 and len(bundle.finetune) == 21
    assert sorted(bundle.heldout.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not set(bundle.heldout.paths) & set(bundle.finetune.paths)
    # class index = sorted folder names; labels follow the folders
    assert all(f"/{CLASSES[y]}/" in p for p, y in zip(bundle.test.dataset.paths, bundle.test.dataset.labels))
    shifts = {s.name: s for s in bundle.shifts}
    assert sorted(shifts) == ["no_dog", "noisy"] and shifts["noisy"].project is None
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    assert shifts["no_dog"].project(logits).tolist() == [[0.0, 1.0]]   # dog's column is gone
    assert sorted(set(shifts["no_dog"].dataset.labels.tolist())) == [0, 1]
    # default held-out: a tenth of the smallest class (10 images), at least 1
    default = build_dataset("ImageFolder", str(folder), lambda img: img)
    assert default.split["per_class"] == 1 and len(default.heldout) == 3
    # an index file over the sorted ImageFolder of train gives exactly that split
    mask = np.zeros(30, dtype=np.int64)
    mask[[0, 10, 29]] = 1
    np.save(tmp_path / "index.npy", mask)
    exact = build_dataset("ImageFolder", str(folder), lambda img: img,
                          heldout_index=str(tmp_path / "index.npy"))
    assert [p.split("/")[-2:] for p in exact.heldout.paths] == [["cat", "img_00.png"], ["dog", "img_00.png"],
                                                                ["fox", "img_09.png"]]


def test_checkpoint_formats_are_unwrapped_and_said(caplog):
    sd = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    assert unwrap(dict(sd), "plain.pt") == sd
    with caplog.at_level(logging.INFO):
        for key in ("state_dict", "model", "state_dict_ema", "model_state_dict"):
            assert unwrap({"epoch": 3, key: {f"module.{k}": v for k, v in sd.items()}}, f"{key}.pt") == sd
        both = unwrap({"state_dict": sd, "state_dict_ema": {k: v + 1 for k, v in sd.items()}}, "both.pt")
    said = caplog.text
    assert "'model'" in said and "'state_dict_ema'" in said and "'module.' prefix" in said
    assert torch.equal(both["a.weight"], sd["a.weight"])                    # the trained weights, not EMA
    assert "also present, not used: state_dict_ema" in caplog.text


# ----------------------------------------------------------------------------------------- timm zoo
def test_timm_arch_uses_timms_preprocessing():
    white = Image.new("RGB", (24, 24), (255, 255, 255))
    native = get_arch("timm:test_resnet").preprocess(white)          # test_resnet's config: 160 px,
    assert native.shape == (3, 160, 160) and torch.allclose(native, torch.ones(1))   # mean = std = 0.5
    grey = torch.full((1, 28, 28), 255, dtype=torch.uint8)             # a Fashion-MNIST-like tensor
    assert torch.allclose(get_arch(TIMM).preprocess(grey), torch.ones(3, 32, 32))
    assert get_arch("timm:test_vit").is_vit and not get_arch(TIMM).is_vit
    model = get_arch(TIMM).build(7)
    assert model.get_classifier().out_features == 7
    again = get_arch(TIMM).build(7)                                   # a fixed start: builds agree
    assert torch.equal(again.state_dict()["conv1.0.weight"], model.state_dict()["conv1.0.weight"])


def test_timm_zoo_linear_probe_then_batchnorm_in_train_mode(timm_zoo):
    zoo, records, pretrained = timm_zoo
    probe, *tuned = [load(zoo / f"model_{i}.pt") for i in range(3)]
    # the probe: the pre-trained backbone (unwrapped from state_dict, module. removed; not EMA), a new head
    assert all(torch.equal(probe[k], v) for k, v in pretrained.items() if not k.startswith("fc."))
    assert probe["fc.weight"].shape == (3, pretrained["fc.weight"].shape[1])
    assert torch.count_nonzero(probe["fc.weight"]) > 0
    # fine-tuned in train mode: BatchNorm statistics moved, differently in each ingredient
    key = "layer1.0.bn1.running_mean"
    assert not torch.equal(tuned[0][key], probe[key]) and not torch.equal(tuned[0][key], tuned[1][key])
    assert [r["hparams"]["batchnorm"] for r in records[1:]] == ["train", "train"]
    assert records[0]["arch"] == TIMM and records[0]["data"]["heldout_size"] == 12


@pytest.mark.slow
def test_timm_soups_follow_the_batchnorm_rule(timm_zoo, folder, tmp_path):
    zoo = timm_zoo[0]
    sds = [load(zoo / f"model_{i}.pt") for i in range(3)]
    u = uniform_soup.main(soup_args(zoo, TIMM, folder, tmp_path, "--save-soup", tmp_path / "u.pt"))
    soup = load(tmp_path / "u.pt")
    for k in ("conv1.0.weight", "layer1.0.bn1.running_mean"):  # uniform averages statistics too
        assert_close(soup[k], sum(sd[k] for sd in sds) / 3)
    assert set(u["shifts"]) == {"noisy", "no_dog"} and u["dataset"] == "ImageFolder"
    zoo_split = timm_zoo[1][0]["data"]   # the soups learn on the split the zoo held out
    assert {k: u["split"][k] for k in ("per_class", "seed", "heldout_size")} == \
        {k: zoo_split[k] for k in ("per_class", "seed", "heldout_size")}

    g = greedy_soup.main(soup_args(zoo, TIMM, folder, tmp_path, "--save-soup", tmp_path / "g.pt"))
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    best = max(r["heldout"] for r in lines if r["method"] == "individual")
    assert g["ingredients"] and g["heldout"] >= best

    spec = get_arch(TIMM)
    bundle = build_dataset("ImageFolder", str(folder), spec.preprocess, heldout_per_class=4)
    learned = learned_soup.main(soup_args(zoo, TIMM, folder, tmp_path, "--layerwise", "--epochs", 1,
                                          "--save-soup", tmp_path / "l.pt"))
    m = mehl.main(soup_args(zoo, TIMM, folder, tmp_path, "--model_batch", 2, "--epochs", 1,
                            "--no-epoch-test", "--save-soup", tmp_path / "m.pt"))
    assert learned["method"] == "Learned-Soup+" and learned["batchnorm"] == "re-estimated on held-out"
    assert m["method"] == "MEHL-Soup+" and m["batchnorm"] == "re-estimated on held-out"
    # one block per parameter that differs across ingredients (timm's zero-initialised last BatchNorm of
    # a block leaves the biases before it at zero after one step: identical, kept, not learned)
    names = [n for n, _ in spec.build(3).named_parameters()]
    same = [n for n in names if all(torch.equal(sds[0][n], sd[n]) for sd in sds[1:])]
    assert learned["blocks"] == len(names) - len(same) == m["blocks"]
    assert learned["identical_parameters"] == same == m["identical_parameters"]
    for name in ("l.pt", "m.pt"):
        # the soup's statistics are its own, re-estimated on held-out: doing it again changes nothing
        soup = load(tmp_path / name)
        model = spec.build(3)
        model.load_state_dict(soup)
        reestimate(model, bundle.heldout, torch.device("cpu"), batch_size=6)
        assert_close(model.state_dict()["layer1.0.bn1.running_var"], soup["layer1.0.bn1.running_var"])
        mean = sum(sd["layer1.0.bn1.running_var"] for sd in sds) / 3
        assert not torch.allclose(soup["layer1.0.bn1.running_var"], mean)

    argv = soup_args(zoo, TIMM, folder, tmp_path, "--model_batch", 2, "--epochs", 1, "--no-epoch-test",
                     "--save-soup", tmp_path / "m2.pt")
    done = torchrun("MEHL_soup_layer.py", argv, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert last["world_size"] == 2 and last["batchnorm"] == "re-estimated on held-out"
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "m2.pt").values() if v.is_floating_point())


# -------------------------------------------------------------------------------------- factory zoo
@pytest.mark.slow
def test_factory_zoo_soups_and_two_processes(factory_zoo, factory_path, folder, tmp_path):
    zoo = factory_zoo
    sds = [load(zoo / f"model_{i}.pt") for i in range(3)]
    assert not torch.equal(sds[1]["0.weight"], sds[0]["0.weight"])   # fine-tuned end to end
    uniform_soup.main(soup_args(zoo, FACTORY, folder, tmp_path, "--save-soup", tmp_path / "u.pt"))
    assert_close(load(tmp_path / "u.pt")["7.weight"], sum(sd["7.weight"] for sd in sds) / 3)
    g = greedy_soup.main(soup_args(zoo, FACTORY, folder, tmp_path, "--save-soup", tmp_path / "g.pt"))
    assert g["ingredients"]
    learned = learned_soup.main(soup_args(zoo, FACTORY, folder, tmp_path, "--layerwise", "--epochs", 1,
                                          "--save-soup", tmp_path / "l.pt"))
    assert learned["method"] == "Learned-Soup+" and learned["batchnorm"] != "re-estimated on held-out"
    argv = soup_args(zoo, FACTORY, folder, tmp_path, "--model_batch", 3, "--epochs", 1, "--no-epoch-test",
                     "--save-soup", tmp_path / "one.pt")
    one = mehl.main(argv)
    assert one["method"] == "MEHL-Soup+" and one["blocks"] == 8
    argv[argv.index(str(tmp_path / "one.pt"))] = str(tmp_path / "two.pt")
    done = torchrun("MEHL_soup_layer.py", argv, env={"PYTHONPATH": f"{ROOT}:{factory_path}"})
    assert done.returncode == 0, done.stderr[-3000:]
    # no BatchNorm: 2 processes give the soup of 1 (float32, only the order of sums differs)
    a, b = load(tmp_path / "one.pt"), load(tmp_path / "two.pt")
    for k in a:
        assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)


def test_factory_importable_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_models.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    spec = get_arch("cwd_models:tiny")
    assert spec.build(5)(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    assert spec.preprocess(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape == (3, 16, 16)  # grey tensor in


# -------------------------------------------------------------------------------------- bad inputs
def bad_folder(tmp_path, *, val_classes=CLASSES, empty=None):
    root = tmp_path / "bad"
    for c, name in enumerate(CLASSES):
        write_class(root / "train" / name, c, 4, seed=c)
    for c, name in enumerate(val_classes):
        write_class(root / "val" / name, c % 3, 2, seed=c)
    if empty:
        for f in (root / "train" / empty).iterdir():
            f.unlink()
        (root / "train" / empty / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("case", ["unknown timm", "bad tag", "no module", "no function", "not a pair",
                                  "other timm model", "classes differ", "empty class"])
def test_bad_input_is_one_line_before_any_work(case, timm_zoo, folder, factory_path, tmp_path):
    zoo, arch, data = timm_zoo[0], TIMM, folder
    expected = {
        "unknown timm": "timm 1.* has no model 'test_resnt'; closest: test_resnet",
        "bad tag": "no pretrained tag 'nope' for resnet18",
        "no module": "cannot import the factory's module no_such_pkg.models",
        "no function": r"module own_models \(.*own_models.py\) has no function missing",
        "not a pair": r"own_models:not_a_pair: the factory must return \(model, preprocess\).*returned a "
                      "Linear",
        "other timm model": "does not match the architecture: missing keys: conv_stem.weight.*"
                            "unexpected keys: conv1.0.weight",
        "classes differ": r"the classes of .*val differ from those of train \(3 classes\): missing 1: fox; "
                          "extra 1: wolf",
        "empty class": r"1 class folder\(s\) of .*train hold no images .*: dog",
    }[case]
    if case == "unknown timm":
        arch = "timm:test_resnt"
    elif case == "bad tag":
        arch = "timm:resnet18.nope"
    elif case == "no module":
        arch = "no_such_pkg.models:build"
    elif case == "no function":
        arch = "own_models:missing"
    elif case == "not a pair":
        arch = "own_models:not_a_pair"
    elif case == "other timm model":
        arch = "timm:test_efficientnet@32"
    elif case == "classes differ":
        data = bad_folder(tmp_path, val_classes=["cat", "dog", "wolf"])
    else:
        data = bad_folder(tmp_path, empty="dog")
    out = tmp_path / "out"
    for script in (uniform_soup, mehl):
        with pytest.raises(UserError, match=expected) as err:
            script.main(soup_args(zoo, arch, data, out, "--save-soup", out / "soup.pt"))
        assert "\n" not in str(err.value)
    assert not (out / "results.jsonl").exists() and not (out / "soup.pt").exists()


def test_finetune_refuses_pretrained_weights_of_another_model(folder, tmp_path):
    import timm
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"--pretrained .*other.pt .*head fc excepted\) does not match the "
                                        "architecture: missing keys: conv1.0.weight"):
        finetune.main(["--arch", TIMM, "--linear-probe", "--pretrained", str(tmp_path / "other.pt"),
                       "--out-dir", str(tmp_path / "zoo"), *data_args(folder), *FT])
    assert not (tmp_path / "zoo" / "model_0.pt").exists()


@pytest.mark.slow
def test_command_line_error_is_one_line(timm_zoo, tmp_path):
    data = bad_folder(tmp_path, val_classes=["cat", "dog"])
    done = subprocess.run([sys.executable, str(ROOT / "uniform_soup.py"), "--arch", TIMM, "--datasets",
                           "ImageFolder", "--data-location", str(data), "--model-location", str(timm_zoo[0]),
                           "--results-db", str(tmp_path / "r.jsonl")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: ImageFolder: the classes of {data / 'val'} differ from those of train (3 classes): "
        "missing 1: fox"]


# ------------------------------------------------------------------------------ decoded once (29.9)
@pytest.mark.parametrize("which", ["timm", "factory"])
def test_greedy_soup_decodes_once_and_gives_the_numbers_of_no_cache(which, timm_zoo, factory_zoo, folder,
                                                                     tmp_path):
    """Issue 29.9: timm's eval transform (a torchvision v1 Compose) and a factory's transform (wrapped by
    the factory path) are split, so the images are kept (files appear in the cache folder), and greedy
    soup's accuracies are those with --decode-cache none."""
    zoo, arch = (timm_zoo[0], TIMM) if which == "timm" else (factory_zoo, FACTORY)
    cache = tmp_path / "cache"
    records = []
    for k, where in enumerate(("none", str(cache), str(cache))):  # the last reads the files back
        out = tmp_path / f"run{k}"
        out.mkdir()
        records.append(greedy_soup.main(soup_args(zoo, arch, folder, out, "--decode-cache", where,
                                                  "--save-soup", out / "g.pt")))
    assert len(list(cache.glob("*.npy"))) == 4   # held-out, val, the two shift sets
    scores = ("heldout", "test", "shifts", "ingredients")
    assert [{s: r[s] for s in scores} for r in records[1:]] == [{s: records[0][s] for s in scores}] * 2
    assert all(torch.equal(load(tmp_path / "run2" / "g.pt")[k], v) for k, v in load(tmp_path / "run0" / "g.pt").items())
