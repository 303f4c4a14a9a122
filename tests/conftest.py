"""Shared fixtures: a tiny Fashion-MNIST laid out like the real files, and tiny ingredient zoos."""
import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from tests.models import TINY_CNN  # noqa: E402 - importable once ROOT is on the path


def write_idx(path, array):
    """Write an IDX file (the original MNIST / Fashion-MNIST format), gzipped."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def make_fmnist(root, n_train=600, n_test=200, seed=0):
    """Class-dependent 28x28 patterns plus noise: learnable, so accuracies mean something."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 28, 28))

    def draw(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = 0.6 * templates[labels] + 0.4 * rng.integers(0, 256, size=(n, 28, 28))
        return images.astype(np.uint8), labels.astype(np.uint8)

    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = draw(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Every test keeps the frozen-prefix files (utils/run/prefix.py) in a folder of its own, never in the
    user's ~/.cache, and leaves no folder configured behind for library calls of later tests."""
    from utils.run import decoded, prefix
    folder = tmp_path_factory.mktemp("soups-cache")
    monkeypatch.setenv("MODEL_SOUPS_CACHE", str(folder))
    yield folder
    prefix.configure(None)
    decoded.configure("memory")


@pytest.fixture(autouse=True)
def release_locks():
    """A run that stops on an error keeps its output locks until its process exits (utils/files/lock.py);
    in-process runs of the tests share this process, so each test gives back what its runs held."""
    yield
    from utils.files import lock
    lock.release_all()


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory):
    return make_fmnist(tmp_path_factory.mktemp("fmnist"))


def make_zoo(folder, n, num_classes=10, arch=TINY_CNN, noise=0.05, differ_buffers=False, seed=0):
    """n ingredients: the arch's start plus seeded noise on every float parameter that fine-tuning moves
    (a parameter built frozen, such as CLIP's text leftovers, stays identical, as in the published
    checkpoints); BatchNorm statistics identical in all (frozen-statistics fine-tuning) unless
    `differ_buffers`. Saved as the arch's state dict: for CLIP archs, the published key layout."""
    from utils.archs import get_arch
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = get_arch(arch).build(num_classes, pretrained=False)
    base = model.state_dict()
    param_names = {k for k, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if not v.is_floating_point():
                sd[k] = v.clone()
            elif k in param_names or differ_buffers:
                sd[k] = v + noise * (i + 1) * torch.randn(v.shape, generator=gen).abs() \
                    if "running_var" in k else v + noise * torch.randn(v.shape, generator=gen)
            else:
                sd[k] = v.clone()
        torch.save(sd, folder / f"model_{i}.pt")
    return folder


@pytest.fixture
def zoo(tmp_path):
    """Three tiny_cnn ingredients (tests/models.py) (a module may define its own `zoo`)."""
    return make_zoo(tmp_path / "zoo", 3)


@pytest.fixture
def out(tmp_path):
    """An empty folder for a test's outputs."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def write_imagenet_tree(root, num_classes=5, train_per_class=6, val_per_class=2, size=8):
    """A tiny tree laid out like ImageNet's (`imagenet/train/<wnid>`, `imagenet/val/<wnid>`): solid
    images whose colour depends on the class, with a little seeded noise. `size`: a side, or (width,
    height) (ImageNet's photos are about 500 x 375)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    width, height = (size, size) if isinstance(size, int) else size
    for c in range(num_classes):
        wnid = f"n{1000 + 7 * c:08d}"
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = Path(root) / "imagenet" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                colour = np.array([40 * c % 256, 255 - 40 * c % 256, 90 + 30 * c % 166])
                pixels = np.clip(colour + rng.normal(0, 20, size=(height, width, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{k:03d}.JPEG")
    return Path(root)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, nproc=2, timeout=300, env=None):
    """Run `script` under torchrun with `nproc` gloo processes on this CPU; returns CompletedProcess.
    --standalone: torchrun picks a free port itself, so tests running side by side (pytest -n) never
    race for one."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
