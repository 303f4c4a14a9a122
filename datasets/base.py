"""What every dataset builder returns, and the held-out split helpers shared by the families."""
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from utils.runtime.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """A set that is only ever reported. `project` maps the model's logits (B, num_classes) onto this
    set's label space (e.g. the 200 ImageNet-R classes); None means the identity. A missing set has
    `dataset=None` and `missing` saying why."""
    name: str
    dataset: Optional[Dataset]
    project: Optional[Callable] = None
    missing: Optional[str] = None


@dataclass
class DataBundle:
    name: str
    num_classes: int
    finetune: Dataset           # what ingredients are fine-tuned on
    heldout: Dataset            # what greedy / learned / MEHL soups select or learn on
    test: EvalSet
    shifts: list = field(default_factory=list)   # list[EvalSet]
    split: dict = field(default_factory=dict)    # how the held-out split was chosen (goes into results)


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
    """The user's 0/1 index file as a boolean mask of length n (1 = held-out). `order` says which
    order of the train set the file indexes (for the message)."""
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--heldout-index {path}: not a readable numpy file ({err})") from err
    if mask.ndim != 1 or len(mask) != n:
        over = f" ({order})" if order else ""
        raise UserError(f"--heldout-index {path}: expected a 0/1 array of length {n}{over}, got shape "
                        f"{mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise UserError(f"--heldout-index {path}: expected only 0 and 1 (1 = held-out)")
    mask = mask.astype(bool)
    if mask.mean() > 0.5:
        log.warning("--heldout-index %s marks %.0f%% of train as held-out: 1 must mean held-out "
                    "(is this the fine-tune index?)", path, 100 * mask.mean())
    return mask
