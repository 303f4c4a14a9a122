"""Finding, checking and streaming the ingredients `model_{i}.pt` of a range [params_start, params_end)."""
import itertools
import logging
import re
from pathlib import Path

import torch
from tqdm import tqdm

from utils.files.state_dicts import (CHECKPOINT_SUFFIXES, check_dtypes, check_state_dict, checkpoint_limit,
                                     load_state_dict)
from utils.runtime import distributed
from utils.runtime.errors import UserError
from utils.soup.sampling import shard_range

log = logging.getLogger(__name__)
_NAME = re.compile(r"^model_(\d+)$")   # the stem of ingredient_file


def ingredient_file(folder, index, suffix=".pt"):
    """Where ingredient `index` lives in `folder`: model_{index}.pt (its finetune record: suffix ".json")."""
    return Path(folder) / f"model_{index}{suffix}"


def available(model_location):
    """index -> path of every `model_{i}.(pt|pth|safetensors)` in the folder (where several files
    stand for one index, the first by name; `ingredient_paths` refuses that)."""
    return {i: ps[0] for i, ps in _candidates(model_location).items()}


def _candidates(model_location):
    """index -> every file in the folder that is named as ingredient i, sorted by name."""
    folder = Path(model_location)
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NAME.match(p.stem)
            if m and p.suffix in CHECKPOINT_SUFFIXES:
                found.setdefault(int(m.group(1)), []).append(p)
    return {i: sorted(ps) for i, ps in found.items()}


def ingredient_paths(model_location, params_start=0, params_end=None):
    """Paths of model_{params_start} ... model_{params_end - 1}. params_end=None: up to the last one
    present. Missing files or an empty range are UserErrors."""
    folder = Path(model_location)
    if not folder.is_dir():
        raise UserError(f"--model-location {folder}: no such folder")
    candidates = _candidates(folder)
    found = {i: ps[0] for i, ps in candidates.items()}
    if params_start < 0:
        raise UserError(f"--params_start must be >= 0, got {params_start}")
    if params_end is None:
        params_end = max(found) + 1 if found else params_start
    if params_end <= params_start:
        raise UserError(f"empty range of ingredients: --params_start {params_start} >= --params_end "
                        f"{params_end} (folder {folder} holds {len(found)} ingredients)")
    # Checked against the files present before anything is built from the range: its size may be any
    # number a user types (--params_end 3000000000), the folder holds few files.
    inside = sorted(i for i in found if params_start <= i < params_end)
    if len(inside) < params_end - params_start:
        first = itertools.islice((i for i in range(params_start, params_end) if i not in found), 5)
        show = ", ".join(ingredient_file("", i).name for i in first)
        missing = params_end - params_start - len(inside)
        raise UserError(f"{missing} ingredient(s) missing in {folder} for range "
                        f"[{params_start}, {params_end}): {show}{' ...' if missing > 5 else ''}")
    twice = [candidates[i] for i in inside if len(candidates[i]) > 1]
    if twice:
        raise UserError(f"ingredient {index_of(twice[0][0])} is ambiguous: "
                        + " and ".join(str(p) for p in twice[0])
                        + " both stand for it (remove or rename all but one)"
                        + (f"; {len(twice) - 1} more index(es) like it" if len(twice) > 1 else ""))
    return [found[i] for i in inside]


def load_checked(path, reference):
    """Load one ingredient and check it against the architecture's state dict `reference`."""
    sd = load_state_dict(path, max_bytes=checkpoint_limit(reference))
    check_state_dict(sd, reference, str(path))
    return check_dtypes(sd, reference, str(path))


def preflight(paths, reference):
    """Check every ingredient (keys, shapes, dtypes, finite values) before any long work starts.
    Each rank checks a share and all ranks agree, so a bad file stops every process with its name."""
    start, stop = shard_range(len(paths), distributed.world_size(), distributed.rank())
    error = None
    for p in tqdm(paths[start:stop], desc="checking ingredients", leave=False,
                  disable=not distributed.is_primary()):
        try:
            load_checked(p, reference)
        except UserError as err:
            error = str(err)
            break
    distributed.agree(error is None, error or "")


def stream(paths, reference, desc="ingredients"):
    """Yield (index, path, state dict) one ingredient at a time."""
    for i, p in enumerate(tqdm(paths, desc=desc, leave=False, disable=not distributed.is_primary())):
        yield i, p, load_checked(p, reference)


def index_of(path):
    return int(_NAME.match(Path(path).stem).group(1))


def average(sds_iter, reference):
    """Streamed mean of state dicts (float64 accumulator, cast back); integer tensors from the first."""
    acc, n = None, 0
    for sd in sds_iter:
        if acc is None:
            acc = {k: (v.to(torch.float64).clone() if v.is_floating_point() else v.clone())
                   for k, v in sd.items()}
        else:
            for k, v in sd.items():
                if v.is_floating_point():
                    acc[k] += v.to(torch.float64)
        n += 1
    if acc is None:
        raise UserError("no ingredients to average")
    return {k: ((v / n).to(reference[k].dtype) if v.is_floating_point() else v) for k, v in acc.items()}
