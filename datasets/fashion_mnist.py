"""Fashion-MNIST, the embedded default: 60k train / 10k test, 28x28 grey, 10 classes.

Looked for at --data-location, else at /usr/share/datasets/fashion-mnist (Debian package
dataset-fashion-mnist: the original gzip files), else downloaded by torchvision when online.
Shift sets are synthetic corruptions of real images: the test set under fixed, seeded corruptions
(noise, blur, contrast, rotation, JPEG, pixelate), reported each and as their mean."""
import contextlib
import gzip
import hashlib
import io
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from datasets.base import DataBundle, EvalSet
from datasets.heldout import check_source, heldout_split, subsample
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
DEFAULT_HELDOUT_PER_CLASS = 500   # 5000 held-out images: docs/ZOO.md, "The held-out size"
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "rotation", "jpeg", "pixelate")


class ImageTensors(Dataset):
    """uint8 images (N, 1, H, W) and labels, with a per-sample transform.

    `cache=True` (deterministic eval transforms only) keeps the transformed images after the first
    access: the held-out, test and shift sets are evaluated many times in one run (greedy soup tries
    every candidate on held-out; MEHL logs test accuracy every epoch)."""

    def __init__(self, images, labels, transform=None, cache=False):
        self.images, self.labels, self.transform = images, labels, transform
        self.cached = None if cache and transform is not None else False

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.cached is None:
            self.cached = torch.stack([self.transform(img) for img in self.images])
        if self.cached is not False:
            return self.cached[i], int(self.labels[i])
        img = self.images[i]
        return (self.transform(img) if self.transform else img), int(self.labels[i])

    def fingerprint(self):
        """A string that changes whenever an item would (images, labels, transform, torchvision's
        version), for utils/run/prefix.py's files on disk; None when the transform cannot be described."""
        described = repr(self.transform)
        if " at 0x" in described:  # an object without a stable description
            return None
        digest = hashlib.sha256(np.ascontiguousarray(torch.as_tensor(self.images).numpy()).tobytes())
        digest.update(np.ascontiguousarray(np.asarray(self.labels, dtype=np.int64)).tobytes())
        return f"ImageTensors {tuple(self.images.shape)} {digest.hexdigest()} torchvision " \
               f"{torchvision.__version__} {described}"

    def items(self, indices):
        """(images, labels) of `indices` as one batch, transformed afresh (the cache is not filled)."""
        images = [self.images[i] for i in indices]
        x = torch.stack([self.transform(img) if self.transform else img for img in images])
        return x, torch.as_tensor(np.asarray(self.labels)[list(indices)], dtype=torch.int64)


# ---------------------------------------------------------------------------------- the files
def _candidates(root):
    if root is not None:
        root = Path(root)
        return [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", root / "fashion_mnist"]
    return [SYSTEM_DIR, Path("data") / "FashionMNIST" / "raw"]


def _find(folder, stem):
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


MIRROR = ("ossci-datasets.s3.amazonaws.com", 443)  # where torchvision downloads Fashion-MNIST from


def online(address=MIRROR, timeout=3.0):
    """Whether torchvision's mirror can be reached (a download is tried only then)."""
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def locate(root=None, download=True):
    """The folder holding the four files. Tries torchvision's download only when nothing is found and
    the mirror can be reached; the download goes to a temporary folder that is moved into place
    whole, so a failed one leaves nothing behind. Offline, a missing data set is one UserError."""
    looked = _candidates(root)
    for folder in looked:
        if all(_find(folder, stem) for stem in FILES.values()):
            return folder
    why = "offline, so no download was tried"
    if download and online():
        target = Path(root) if root is not None else Path("data")
        try:
            return _download(target)
        except Exception as err:  # noqa: BLE001 - any failure of the download is the message below
            why = f"the download failed: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
    raise UserError("Fashion-MNIST not found; looked in " + ", ".join(str(p) for p in looked)
                    + f" ({why}). Install it (apt-get install dataset-fashion-mnist) or put the four files "
                    + ", ".join(s + ".gz" for s in FILES.values()) + " in the folder given by "
                    "--data-location")


def _download(target):
    """torchvision's download into a temporary folder inside `target`, then moved to
    `target/FashionMNIST/raw`; its progress output goes to the log, not to the terminal."""
    from torchvision.datasets import FashionMNIST
    made = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=".fashion-mnist-download-"))
    try:
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            FashionMNIST(str(tmp), train=True, download=True)
            FashionMNIST(str(tmp), train=False, download=True)
        log.info("downloaded Fashion-MNIST: %s", chatter.getvalue().strip().replace("\n", "; "))
        raw = target / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in (tmp / "FashionMNIST" / "raw").iterdir():
            os.replace(f, raw / f.name)
        return raw
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made and not any(target.iterdir()):
            target.rmdir()


def read_idx(path):
    """Parse an IDX file (gzipped or not) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, EOFError, IndexError) as err:
        raise UserError(f"{path}: not a readable IDX file ({err})") from err


def load_arrays(root=None):
    folder = locate(root)
    arrays = {k: read_idx(_find(folder, stem)) for k, stem in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise UserError(f"{folder}: {split} images must be N x H x W and labels N long (got shapes "
                            f"{images.shape} and {labels.shape}): are the files swapped?")
        if len(images) != len(labels):
            raise UserError(f"{folder}: {split} images and labels differ in length")
    return folder, arrays


# ------------------------------------------------------------------------------- corruptions
def corrupt(images, name, seed):
    """Apply corruption `name` to uint8 images (N, 1, H, W); deterministic for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    x = images
    if name == "gaussian_noise":
        noisy = x.float() + 0.25 * 255 * torch.randn(x.shape, generator=gen)
        return noisy.clamp(0, 255).round().to(torch.uint8)
    if name == "gaussian_blur":
        return F.gaussian_blur(x, kernel_size=[5, 5], sigma=[1.2, 1.2])
    if name == "contrast":
        return F.adjust_contrast(x, 0.3)
    if name == "rotation":
        angles = (torch.rand(len(x), generator=gen) * 2 - 1) * 35
        return torch.stack([F.rotate(img, float(a)) for img, a in zip(x, angles)])
    if name == "jpeg":
        return torch.stack([F.jpeg(img, quality=8) for img in x])
    if name == "pixelate":
        h, w = x.shape[-2:]
        small = F.resize(x, [h // 3, w // 3], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        return F.resize(small, [h, w], interpolation=F.InterpolationMode.NEAREST)
    raise ValueError(f"unknown corruption {name}")


# ---------------------------------------------------------------------------------- the bundle
def build_fashion_mnist(root, preprocess, heldout_per_class=None, heldout_index=None, seed=0,
                        test_size=None, finetune_size=None, train_preprocess=None, corruption_seed=0):
    check_source(heldout_per_class, heldout_index)
    folder, arr = load_arrays(root)
    train_x = torch.from_numpy(arr["train_images"].copy()).unsqueeze(1)
    train_y = arr["train_labels"].astype(np.int64)
    test_x = torch.from_numpy(arr["test_images"].copy()).unsqueeze(1)
    test_y = arr["test_labels"].astype(np.int64)

    mask, split = heldout_split(train_y, DEFAULT_HELDOUT_PER_CLASS, heldout_per_class, heldout_index, seed)
    held, rest = np.flatnonzero(mask), np.flatnonzero(~mask)
    rest = rest[subsample(len(rest), finetune_size, seed + 1, labels=train_y[rest])]
    keep = subsample(len(test_y), test_size, seed + 2, labels=test_y)
    test_x, test_y = test_x[keep], test_y[keep]
    split.update(heldout_size=len(held), finetune_size=len(rest), test_size=len(keep), folder=str(folder))

    shifts = [EvalSet(name, ImageTensors(corrupt(test_x, name, corruption_seed + k), test_y, preprocess,
                                         cache=True))
              for k, name in enumerate(CORRUPTIONS)]
    return DataBundle(
        name="FashionMNIST", num_classes=10,
        finetune=ImageTensors(train_x[rest], train_y[rest], train_preprocess or preprocess),
        heldout=ImageTensors(train_x[held], train_y[held], preprocess, cache=True),
        test=EvalSet("test", ImageTensors(test_x, test_y, preprocess, cache=True)),
        shifts=shifts, split=split)
