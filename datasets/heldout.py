"""The held-out split: the train images that greedy, learned and MEHL soups select or learn on, never
used to fine-tune an ingredient. Every family builds it with `heldout_split`, from one of two sources:

- drawn: `per_class` images of each class, drawn with a seeded generator;
- an index file: the user's 0/1 numpy array (`.npy`, as `numpy.save` writes it) over the train set in
  the family's order, 1 = held-out (the published ImageNet split is given this way).

The record it returns goes into every results line and each ingredient's record (model_<i>.json):
it identifies the split (the count and seed, or the file's path and sha256).
"""
import hashlib
import io
import logging
import os

import numpy as np
from numpy.lib import format as npy_format

from datasets.base import not_regular
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_MAX = 1 << 20   # the header numpy writes is at most a few KiB; this only bounds what is read


def check_source(per_class, index_file):
    """Refuse what is wrong with the flags alone (both given; an index file that is not a regular
    file: a FIFO would block the read, /dev/zero never end), before a builder lists its data."""
    if index_file is not None and per_class is not None:
        raise UserError("give either --heldout-index or --heldout-per-class, not both")
    if index_file is not None:
        why = not_regular(index_file)
        if why:
            raise UserError(f"--heldout-index {index_file} {why}: give a 0/1 numpy .npy file")


def heldout_split(labels, default_per_class, per_class=None, index_file=None, seed=0, order=None):
    """(mask, record) of the held-out split of the train set whose labels are `labels` (mask[i] True:
    held-out). Drawn `per_class` per class with `seed` (default `default_per_class`), or read from
    `index_file` (`order` names the train order it indexes, for the messages)."""
    check_source(per_class, index_file)
    if index_file is not None:
        mask, digest = read_heldout_index(index_file, len(labels), order)
        return mask, {"heldout": "index file", "path": str(index_file), "sha256": digest}
    per_class = per_class or default_per_class
    return per_class_split(labels, per_class, seed), {"heldout": "drawn", "per_class": per_class, "seed": seed}


def subsample(n, size, seed, labels=None):
    """Sorted indices of a seeded subsample of `size` out of n items (all when size is None or >= n); with
    the items' `labels`, class-balanced: drawn from `per_class_split`'s ceil(size / classes) of each class.
    Every family subsamples its fine-tune, test and shift sets with it."""
    if size is None or size >= n:
        return np.arange(n)
    if size < 1:
        raise UserError(f"subsample size must be >= 1, got {size}")
    pool = n
    if labels is not None:
        pool = np.flatnonzero(per_class_split(labels, int(np.ceil(size / len(np.unique(labels)))), seed))
    return np.sort(np.random.default_rng(seed).choice(pool, size=size, replace=False))


def per_class_split(labels, per_class, seed):
    """Boolean mask over `labels`: `per_class` examples of each class drawn with a seeded generator
    (held-out = True). Deterministic for a given (labels, per_class, seed)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = min(per_class, len(idx))
        mask[rng.choice(idx, size=take, replace=False)] = True
    return mask


def read_heldout_index(path, n, order=None):
    """(boolean mask of length n, sha256 of the file) of the user's 0/1 .npy index file. The file is
    read once, so the mask and its recorded digest are of the same bytes."""
    data = _index_bytes(path, n)
    kind = _not_npy(data)
    if kind:
        raise UserError(f"--heldout-index {path}: {kind}, not a .npy file: save the 0/1 array with "
                        "numpy.save(path, mask)")
    shape, dtype = _npy_header(path, data)
    if dtype.kind not in "biuf":
        raise UserError(f"--heldout-index {path}: holds {dtype} values; expected a 0/1 array (bool or integer)")
    if shape != (n,):
        over = f" ({order})" if order else ""
        raise UserError(f"--heldout-index {path}: expected a 0/1 array of length {n}{over}, got shape {shape}")
    try:  # only now: numpy allocates the array the header declares before it reads a byte of it
        mask = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"--heldout-index {path}: not a readable .npy file ({err})") from err
    if not np.isin(mask, (0, 1)).all():
        raise UserError(f"--heldout-index {path}: expected only 0 and 1 (1 = held-out)")
    mask = mask.astype(bool)
    if mask.mean() > 0.5:
        log.warning("--heldout-index %s marks %.0f%% of train as held-out: 1 must mean held-out "
                    "(is this the fine-tune index?)", path, 100 * mask.mean())
    return mask, hashlib.sha256(data).hexdigest()


def _npy_header(path, data):
    """(shape, dtype) that the .npy header in `data` declares."""
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        read = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read is None:  # 3.0 is written only for structured dtypes with non-ASCII field names
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not one of a plain array")
        shape, _, dtype = read(f)
    except (ValueError, EOFError, SyntaxError, TypeError) as err:
        raise UserError(f"--heldout-index {path}: not a readable .npy file ({err})") from err
    return shape, dtype


def _index_bytes(path, n):
    """The file's bytes: a regular file (checked before it is opened) no larger than a .npy of n
    eight-byte numbers can be."""
    check_source(None, path)
    limit = NPY_HEADER_MAX + 8 * n
    try:
        size = os.stat(path).st_size
        if size > limit:
            raise UserError(f"--heldout-index {path}: {size} bytes, more than a .npy array of {n} numbers "
                            f"can hold ({limit}): not the index file of this train set")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as err:
        raise UserError(f"--heldout-index {path}: cannot be read ({err.strerror or err})") from err


def _not_npy(data):
    """What `data` is when it is not a .npy file (None when it is)."""
    if data.startswith(NPY_MAGIC):
        return None
    if not data:
        return "is empty"
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        return "is a zip archive (a .npz of several arrays?)"
    if data[:1] == b"\x80":
        return "is a Python pickle"
    return "is text or another format"
