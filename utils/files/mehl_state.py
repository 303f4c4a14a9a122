"""The MEHL --resume state file is untrusted input: every field is checked before it is used, and the
ingredients it was made from are fingerprinted, so that a resume continues exactly the run that was
interrupted or is refused in one line.

The resume state (`Progress.state`; `path_of` names its file, `save` writes it, `load` reads and
checks it) holds: version, config (`config_of`: the defining arguments, and `ingredient_files`: each
ingredient's path, size, modification time and sha256), models_epoch, next_group, order, soup, alpha,
the two generator states, groups (the log of finished groups) and seconds. Also here: the check that stops a
run whose soup went non-finite (a too large --lr) before anything of its group is written."""
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.files import identity
from utils.files.ingredients import index_of
from utils.files.soup_io import sidecar
from utils.files.state_dicts import atomic_write, load_torch
from utils.runtime import distributed
from utils.runtime.errors import UserError
from utils.soup import sampling

log = logging.getLogger("MEHL_soup")

VERSION = 1
FIELDS = ("version", "config", "models_epoch", "next_group", "order", "soup", "alpha", "models_rng",
          "data_rng", "groups", "seconds")
FILES_KEY = "ingredient_files"


def read(path):
    """The state in the file, loaded without running code and with memory bounded before reading (the
    sizes its zip records and its pickle declare, against what the file can hold: state_dicts.load_torch);
    any failure is one line, `--resume <file>: ...`."""
    try:
        return load_torch(path, "MEHL state file")
    except UserError as err:
        raise UserError(f"--resume {err}") from err


def fingerprints(paths):
    """[{path, size, mtime_ns, sha256}] of the ingredients (`identity.describe`; read by the primary
    rank, sent to all)."""
    return distributed.broadcast_object([identity.describe(p) for p in paths] if distributed.is_primary() else None)


def _refuse(path, why):
    return UserError(f"--resume {path}: {why}; start again with --overwrite (or another --resume file)")


def check_header(state, path, config, flag_of):
    """The fields, the configuration (`flag_of(key)` names a differing argument) and the ingredient
    fingerprints against this run's. Raises a one-line UserError."""
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise UserError(f"--resume {path}: not a MEHL state file of this version")
    missing = [k for k in FIELDS if k not in state]
    if missing:
        raise _refuse(path, f"the state file lacks the field(s) {', '.join(missing)}")
    saved = state["config"]
    if not isinstance(saved, dict):
        raise _refuse(path, f"its config is a {type(saved).__name__}, not a dict")
    if FILES_KEY not in saved:
        raise _refuse(path, "it records no ingredient fingerprints (made by an older version)")
    diffs = [f"{flag_of(k)} {saved.get(k)!r} in the state, {v!r} now"
             for k, v in config.items() if k != FILES_KEY and saved.get(k) != v]
    if diffs:
        raise UserError(f"--resume {path} was made with another configuration: " + "; ".join(diffs))
    changed = _changed_files(saved[FILES_KEY], config[FILES_KEY])
    if changed:
        raise _refuse(path, f"ingredient {changed} changed since the state was saved, so the soup "
                      "would match neither the old files nor the new")


def _changed_files(old, new):
    if not isinstance(old, list) or len(old) != len(new):
        return "list"
    for o, n in zip(old, new):
        if not isinstance(o, dict):
            return n["path"]
        what = identity.changes(o, n)
        if what:
            return f"{n['path']} ({', '.join(what)})"
    return None


def resumed_k(state, path):
    """The K that --model_batch auto chose when the resumed run started (a resume continues with it)."""
    k = state["config"].get("model_batch_chosen")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UserError(f"--resume {path}: its configuration records no K chosen by --model_batch auto "
                        f"(found {k!r}); start again with --overwrite")
    return k


def check_contents(state, path, *, n, numel, blocks, model_batch, models_epochs, dtype):
    """Every field's type, range and shape against this run: position in the order, the order a
    permutation of the n ingredients, the log as long as the groups done, soup (numel,) and alpha
    (blocks, n) finite tensors of the run's dtype, generator states that torch.Generator takes."""
    per_epoch = math.ceil(n / model_batch)
    models_epoch, next_group = state["models_epoch"], state["next_group"]
    if not _is_int(models_epoch) or not 0 <= models_epoch < models_epochs:
        raise _refuse(path, f"models_epoch {_show(models_epoch)} is not in [0, {models_epochs})")
    if not _is_int(next_group) or not 0 <= next_group <= per_epoch:
        raise _refuse(path, f"next_group {_show(next_group)} is not in [0, {per_epoch}] ({n} ingredients "
                      f"in groups of {model_batch})")
    order = state["order"]
    if not isinstance(order, list) or not all(_is_int(i) for i in order) or sorted(order) != list(range(n)):
        raise _refuse(path, f"order is not a permutation of the {n} ingredients")
    logs = state["groups"]
    if not isinstance(logs, list) or len(logs) != models_epoch * per_epoch + next_group:
        raise _refuse(path, f"the log of finished groups has {len(logs) if isinstance(logs, list) else '?'} "
                      f"entries, the position (models-epoch {_show(models_epoch)}, group "
                      f"{_show(next_group)}) means {models_epoch * per_epoch + next_group}")
    try:
        json.dumps(logs)
    except (TypeError, ValueError) as err:
        raise _refuse(path, f"the log of finished groups is not plain data ({err})") from err
    _tensor(state["soup"], "soup", (numel,), dtype, path)
    _tensor(state["alpha"], "alpha", (blocks, n), torch.float64, path, any_float=True)
    size = torch.Generator().get_state().numel()
    for key in ("models_rng", "data_rng"):
        g = state[key]
        if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8 or g.layout != torch.strided \
                or g.device.type != "cpu" or g.shape != (size,):
            raise _refuse(path, f"{key} is not a generator state")
    seconds = state["seconds"]
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < math.inf:
        raise _refuse(path, f"seconds {_show(seconds)} is not a finite number >= 0")


def _tensor(t, name, shape, dtype, path, any_float=False):
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type != "cpu":
        raise _refuse(path, f"{name} is not a dense tensor")
    if tuple(t.shape) != tuple(shape):
        raise _refuse(path, f"{name} has shape {tuple(t.shape)}, this run's is {tuple(shape)}")
    if (any_float and not t.dtype.is_floating_point) or (not any_float and t.dtype != dtype):
        raise _refuse(path, f"{name} is {t.dtype}, this run's is {dtype}")
    if not torch.isfinite(t).all():
        raise _refuse(path, f"{name} holds NaN or Inf")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _show(x):
    text = repr(x)
    return text if len(text) <= 40 else text[:40] + "..."


def check_finite(first_bad_step, group, lr):
    """Stop (one line) when a step of the group left the soup holding a NaN or Inf: it would be saved
    otherwise. `first_bad_step` is the first such step (1 for the group's first step), 0 when none: the
    step keeps it on the device, and it is read once per logging interval and at the end of every
    epoch, so a run stops at the first read after the soup went non-finite, before anything of the
    group is written."""
    if first_bad_step:
        raise UserError(f"the soup became non-finite (NaN or Inf) in group {group}, step {first_bad_step}: "
                        f"the coefficients diverged; try a smaller --lr (now {lr:g}); nothing was written "
                        "for this group")


# ------------------------------------------------------------------- the resume state of a run
UNDERSCORE_FLAGS = ("params_start", "params_end", "model_batch", "models_epochs")


def flag_of(key):
    """The flag of a defining argument, as MEHL_soup_layer.py spells it."""
    return "--" + (key if key in UNDERSCORE_FLAGS else key.replace("_", "-"))


def path_of(resume, soup_target, method):
    """--resume's file when it names one, else `<soup>.state.pt` (runs/<method>.state.pt without a
    soup)."""
    if isinstance(resume, str):
        return Path(resume)
    return sidecar(soup_target or Path(f"runs/{method}.pt"), "state")


def config_of(run_key, model_location, paths):
    """The arguments that define the run (`run_key`, as for reruns), where its ingredients live and
    their indices and fingerprints: a resume state made with other values is refused."""
    return {**run_key, "model_location": str(Path(model_location).resolve()),
            "ingredients": [index_of(p) for p in paths], FILES_KEY: fingerprints(paths)}


def load(path, *, resume, overwrite, config, added, flag_of):
    """The saved resume state when --resume names an existing file (checked against `config`), else
    None. Without --resume an existing state file is refused unless --overwrite. `added` maps the
    defining flags left out of the config at their defaults (`cli.ADDED_DEFAULTS`) to (now, default):
    they are compared both ways here."""
    exists = path.is_file()
    distributed.agree(exists == distributed.broadcast_object(exists),
                      f"{path}: the state file is not visible to every rank (use a shared folder)")
    if not resume:
        if exists and not overwrite:
            raise UserError(f"{path} holds the state of an earlier run: pass --resume to continue it "
                            "or --overwrite to start again")
        return None
    if not exists:
        log.info("--resume: %s does not exist yet; starting from the beginning", path)
        return None
    state = read(path)
    saved = state.get("config") if isinstance(state, dict) else None
    for key, (now, default) in added.items():
        made = saved.get(key, default) if isinstance(saved, dict) else now
        if made != now:
            raise UserError(f"--resume {path} was made with another configuration: {flag_of(key)} {made!r} "
                            f"in the state, {now!r} now")
    check_header(state, path, config, flag_of)
    return state


def save(path, state):
    """Write the resume state atomically (the primary rank)."""
    if distributed.is_primary():
        atomic_write(path, lambda tmp: torch.save(state, tmp), overwrite=True)


@dataclass
class Progress:
    """Where a run stands: what its resume state holds, saved after every group."""
    models_epoch: int = 0
    next_group: int = 0
    order: list = None        # this models-epoch's ingredient order (None: not drawn yet)
    alpha: torch.Tensor = None  # B x N coefficients of the soup (None: before the first group)
    groups: list = field(default_factory=list)
    seconds: float = 0.0
    models_rng: torch.Generator = None
    data_rng: torch.Generator = None

    @classmethod
    def start(cls, seed, state=None):
        p = cls(models_rng=sampling.models_generator(seed), data_rng=sampling.data_generator(seed))
        if state is not None:
            p.models_epoch, p.next_group, p.order = state["models_epoch"], state["next_group"], state["order"]
            p.alpha, p.groups, p.seconds = state["alpha"], state["groups"], state["seconds"]
            p.models_rng.set_state(state["models_rng"])
            p.data_rng.set_state(state["data_rng"])
        return p

    def state(self, config, soup):
        """The resume state: this position, the run's config and the soup."""
        return {"version": VERSION, "config": config, "models_epoch": self.models_epoch,
                "next_group": self.next_group, "order": self.order, "soup": soup.cpu(),
                "alpha": self.alpha, "models_rng": self.models_rng.get_state(),
                "data_rng": self.data_rng.get_state(), "groups": self.groups, "seconds": self.seconds}
