"""One BatchNorm rule for learned and MEHL soups: only BatchNorm statistics that differ across the
ingredients switch learning to batch statistics and re-estimation; another float buffer that differs is
averaged and decides nothing. Recipes restore whatever buffers the soup has (averaged or re-estimated),
and `--resume` never replaces a soup that its own state did not make."""
from functools import partial

import pytest
import torch
from torch.testing import assert_close

import learned_soup
import MEHL_soup_layer as mehl
import uniform_soup
from tests import helpers
from tests.conftest import make_zoo
from tests.models import TinyCNN
from utils.archs import ARCHS, ArchSpec, image_transform, register
from utils.files import soup_io
from utils.runtime.errors import UserError


class ScaledCNN(TinyCNN):
    """TinyCNN whose logits are multiplied by a float buffer that is not a BatchNorm statistic."""

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.register_buffer("logit_scale", torch.ones(1))

    def forward(self, x):
        return super().forward(x) * self.logit_scale


def _scaled_cnn(num_classes, pretrained=False):
    torch.manual_seed(0)
    return ScaledCNN(num_classes)


@pytest.fixture(scope="module", autouse=True)
def scaled_arch():
    register(ArchSpec("scaled-cnn", _scaled_cnn, image_transform(16), image_transform(16)))
    yield
    del ARCHS["scaled-cnn"]


argv = partial(helpers.argv, heldout=4, batch_size=15)


def scaled_zoo(folder, n=3):
    zoo = make_zoo(folder, n, arch="scaled-cnn")          # BatchNorm statistics identical in all
    for i in range(n):
        sd = torch.load(zoo / f"model_{i}.pt", weights_only=True)
        sd["logit_scale"] = torch.tensor([1.0 + 0.5 * i])
        torch.save(sd, zoo / f"model_{i}.pt")
    return zoo


@pytest.mark.parametrize("script", ["learned", "mehl"])
def test_a_differing_non_batchnorm_buffer_is_averaged_and_decides_nothing(tmp_path, fmnist_root, script):
    zoo = scaled_zoo(tmp_path / "zoo")
    if script == "learned":
        record = learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--layerwise", "--epochs", 1, arch="scaled-cnn"))
        assert record["batchnorm"] != "re-estimated on held-out"
    else:
        record = mehl.main(argv(zoo, fmnist_root, tmp_path, "--model_batch", 3, "--epochs", 1,
                                "--no-epoch-test", arch="scaled-cnn"))
        assert record["batchnorm"] == "identical statistics, eval mode"
    soup = torch.load(tmp_path / "soup.pt", weights_only=True)
    first = torch.load(zoo / "model_0.pt", weights_only=True)
    for k in ("features.1.running_mean", "features.1.running_var", "features.4.running_var"):
        assert torch.equal(soup[k], first[k]), k                      # kept: eval mode, not re-estimated
    assert_close(soup["logit_scale"], torch.tensor([1.5]))            # the mean of 1.0, 1.5, 2.0
    rebuilt = soup_io.rebuild(tmp_path / "soup.recipe.json")
    for k in soup:
        assert_close(rebuilt[k], soup[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("script", ["learned", "mehl"])
def test_recipe_restores_reestimated_statistics(tmp_path, fmnist_root, script):
    zoo = make_zoo(tmp_path / "zoo", 3, differ_buffers=True)
    if script == "learned":
        learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--layerwise", "--epochs", 1))
    else:
        mehl.main(argv(zoo, fmnist_root, tmp_path, "--model_batch", 2, "--epochs", 1, "--no-epoch-test"))
    soup = torch.load(tmp_path / "soup.pt", weights_only=True)
    first = torch.load(zoo / "model_0.pt", weights_only=True)
    assert not torch.allclose(soup["features.1.running_var"], first["features.1.running_var"])
    rebuilt = soup_io.rebuild(tmp_path / "soup.recipe.json")
    for k in soup:
        assert_close(rebuilt[k], soup[k], atol=1e-6, rtol=1e-5)


def test_resume_never_replaces_a_soup_its_state_did_not_make(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3)
    uniform_soup.main(argv(zoo, fmnist_root, tmp_path, name="keep"))
    before = (tmp_path / "keep.pt").read_bytes()
    with pytest.raises(UserError, match="keep.pt exists"):
        mehl.main(argv(zoo, fmnist_root, tmp_path, "--model_batch", 3, "--resume", name="keep"))
    assert (tmp_path / "keep.pt").read_bytes() == before
    assert not (tmp_path / "keep.state.pt").exists()


@pytest.mark.parametrize("script", ["learned", "mehl"])
def test_batch_statistics_of_one_image_refused_before_learning(tmp_path, fmnist_root, script):
    """40 held-out images in batches of 13 leave a last batch of 1: no batch statistics."""
    zoo = make_zoo(tmp_path / "zoo", 2, differ_buffers=True)
    flags = argv(zoo, fmnist_root, tmp_path, "--epochs", 1)
    flags[flags.index("--batch-size") + 1] = "13"
    main = learned_soup.main if script == "learned" else mehl.main
    with pytest.raises(UserError, match="share of 1 image"):
        main(flags + (["--layerwise"] if script == "learned" else ["--model_batch", "2"]))
    assert not (tmp_path / "soup.pt").exists() and not (tmp_path / "results.jsonl").exists()
