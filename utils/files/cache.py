"""Where the toolkit keeps files between runs: the frozen prefix's outputs (utils/run/prefix.py) and
decoded images (utils/run/decoded.py), each in a folder of its own, every file checked before use and
safe to delete at any time."""
import os
from pathlib import Path


def cache_folder(name):
    """Where the toolkit keeps files between runs (the frozen prefix's outputs, decoded images):
    $MODEL_SOUPS_CACHE/<name>, else $XDG_CACHE_HOME/model_soups/<name>, else ~/.cache/model_soups/<name>."""
    root = os.environ.get("MODEL_SOUPS_CACHE")
    if root:
        return Path(root) / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "model_soups" / name
