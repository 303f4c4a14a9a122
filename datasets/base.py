"""What every dataset builder returns, and the file check the families share. (The held-out split is
datasets/heldout.py; image files and their check before any work, datasets/images.py.)"""
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch.utils.data import Dataset


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


# What a path is when it is not a regular file, by its stat mode.
KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def not_regular(path):
    """None when `path` is a regular file (links followed); else why not, as a phrase ("is a FIFO
    (named pipe), not a regular file"). Nothing is opened: reading a FIFO blocks, /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a symbolic link to a missing file" if os.path.islink(path) else "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in KINDS if test(mode)), "something other than a file")
    link = f" (a symbolic link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return f"is {what}{link}, not a regular file"
