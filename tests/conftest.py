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


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory):
    return make_fmnist(tmp_path_factory.mktemp("fmnist"))


def make_zoo(folder, n, num_classes=10, arch="tiny-cnn", noise=0.05, differ_buffers=False, seed=0):
    """n ingredients: the arch's start plus seeded noise on every float parameter; BatchNorm statistics
    identical in all (frozen-statistics fine-tuning) unless `differ_buffers`."""
    from utils.archs import get_arch
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = get_arch(arch).build(num_classes, pretrained=False).state_dict()
    param_names = {k for k, _ in get_arch(arch).build(num_classes, pretrained=False).named_parameters()}
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
def tiny_zoo(tmp_path):
    return make_zoo(tmp_path / "zoo", 4)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, nproc=2, timeout=300, env=None):
    """Run `script` under torchrun with `nproc` gloo processes on this CPU; returns CompletedProcess."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
