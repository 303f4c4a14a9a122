"""Which files a run reads and which it writes, compared before any work (docs/GUARANTEES.md, "Outputs
are atomic and never silently overwritten").

An output that is one of the inputs destroys it (`--save-soup zoo/model_0.pt --overwrite` replaces an
ingredient), and two outputs that are one file mix their bytes (a results line appended to the soup, a
lock truncating the results). So every output path of a run is compared with every input and every
other output, after resolving symbolic links and, where both exist, by inode (a hard link); the first
collision is one UserError naming both roles. `--overwrite` covers the run's own earlier soup only:
it never makes an input writable.

Paths are compared as the run will open them; a file reached through a bind mount or another machine's
share under another name is not recognised.

`check_writable` then makes sure each output can be written where asked, before any work: a run that
learns for an hour and then cannot write its soup, a sidecar or its results line would repeat that hour
on every rerun."""
import errno
import fnmatch
import glob
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from utils.files.soup_io import SIDECARS, sidecar
from utils.files.state_dicts import CHECKPOINT_SUFFIXES
from utils.runtime.errors import UserError

_INGREDIENT = re.compile(r"^model_\d+$")  # utils.files.ingredients names ingredients so


@dataclass(frozen=True)
class Role:
    """A path the run reads or writes. `flag` names it where it leads a message ("--results-db"),
    `what` where it follows "is also" ("the soup (--save-soup)"). `kind`: "file" (this one file),
    "tree" (an input folder: an output on an existing file or folder under it collides), "zoo" (the
    ingredient folder: an output named as an ingredient there, existing or not, collides) or, for an
    output, "append" (a file appended to, never replaced: the results file) or "lock" (a lock file: utils/files/lock.py opens an existing file only when it is one of its
    own locks, so no tree's file can be harmed by it, and the run's own lock exists by the time the data
    set's standard place is known)."""
    flag: str
    what: str
    path: Path
    kind: str = "file"


def _real(path):
    return os.path.realpath(os.fspath(path))


def _stat(path):
    try:
        return os.stat(path)
    except OSError:
        return None


def same_file(a, b):
    """Whether paths `a` and `b` name one file: equal once links are resolved, or the same inode."""
    if _real(a) == _real(b):
        return True
    sa, sb = _stat(a), _stat(b)
    return sa is not None and sb is not None and os.path.samestat(sa, sb)


def _hit(output, role):
    """Why `output` (a path) lands on the input or output `role`, as the end of a message, or None."""
    if role.kind == "file":
        return f"is also {role.what}" if same_file(output, role.path) else None
    real, folder = _real(output), _real(role.path)
    if role.kind == "tree":
        inside = real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)
        return f"is also {role.what}" if inside and os.path.lexists(real) else None
    # "zoo": named as an ingredient in the folder (a later run would soup it, or it is one already)
    name = Path(real)
    named = _INGREDIENT.match(name.stem) and name.suffix in CHECKPOINT_SUFFIXES
    if os.path.dirname(real) != folder or not named:
        return None
    verb = "is also" if os.path.lexists(real) else "would be read as"
    return f"{verb} ingredient {name.name} of {role.what}"


def _temporary_of(path, output):
    """Whether `path` has the name of a temporary file of `output` (utils.files.state_dicts.Staged
    writes `.<name>.<random>.tmp` beside it and removes such files left by a killed run)."""
    real, target = Path(_real(path)), Path(_real(output))
    return (real.parent == target.parent
            and fnmatch.fnmatchcase(real.name, f".{glob.escape(target.name)}.*.tmp"))


def check_distinct(outputs, inputs):
    """Refuse (UserError, one line) an output that collides with an input or with an earlier output.
    `outputs` and `inputs`: Roles. Nothing is created or opened."""
    for i, out in enumerate(outputs):
        for role in inputs:
            if out.kind == "lock" and role.kind == "tree":
                continue
            why = _hit(out.path, role)
            if why:
                raise UserError(f"{out.flag} {out.path} {why}: an output never replaces an input "
                                "(--overwrite does not change that); choose another path")
        for earlier in outputs[:i]:
            if same_file(out.path, earlier.path):
                raise UserError(f"{out.flag} {out.path} is also {earlier.what}: give each output a file "
                                "of its own")
            if _temporary_of(out.path, earlier.path):
                raise UserError(f"{out.flag} {out.path} is named like a temporary file of {earlier.what}, "
                                "which writing it removes: give each output a file of its own")


def ingredient_inputs(model_location):
    """The inputs of an ingredient folder: the folder itself (as "zoo": any file named as an ingredient
    in it) and each file named as an ingredient there (as "file": catches links and hard links to it
    from elsewhere). A missing folder has none (the run refuses it later, naming it)."""
    folder = Path(model_location)
    roles = [Role("--model-location", f"--model-location {folder}", folder, "zoo")]
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if _INGREDIENT.match(p.stem) and p.suffix in CHECKPOINT_SUFFIXES:
                roles.append(Role("--model-location", f"ingredient {p.name} of --model-location {folder}", p))
    return roles


def soup_outputs(soup, flag):
    """The files a run writes for the soup `soup` (a Path; `flag` says where the path came from): the
    soup, the files beside it (utils.files.soup_io.SIDECARS but MEHL's state, which the caller adds
    where it is written) and its lock."""
    named = f"{flag} {soup}"
    roles = [Role(flag, f"the soup ({flag})", soup)]
    roles += [Role(f"the soup's {kind} file", f"the {kind} file of the soup ({named})", sidecar(soup, kind))
              for kind in SIDECARS if kind != "state"]
    roles.append(Role("the soup's lock file", f"the lock file of the soup ({named})", sidecar(soup, "lock"),
                      "lock"))
    return roles


def state_outputs(state, given):
    """MEHL's state file and its lock; `given`: named by --resume (else the one beside the soup)."""
    flag, where = ("--resume", "--resume") if given else ("the MEHL state file", "beside the soup")
    return [Role(flag, f"the MEHL state file ({where})", state),
            Role("the state's lock file", f"the lock file of the MEHL state ({where}: {state})",
                 sidecar(state, "lock"), "lock")]


# ------------------------------------------------------------------------- can each output be written
# The longest name a run gives a file beside an output `<name>`: its temporary file `.<name>.<random>.tmp`
# (utils.files.state_dicts.temporary: a mkdtemp folder whose name draws 8 characters: TEMPORARY_RANDOM bounds any random part
# up to that many) or its lock `.<name>.lock`. The one place that rule lives.
TEMPORARY_RANDOM = 16


def longest_name(name):
    """The longest file name that writing the output named `name` uses, in bytes."""
    return len(os.fsencode(f".{name}.{'x' * TEMPORARY_RANDOM}.tmp"))


def _existing_folder(path):
    """The nearest folder of `path` that exists (its parent, or an ancestor when parents are still to be
    made), or the first ancestor that exists but is not a folder."""
    folder = Path(os.path.abspath(path)).parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _name_max(folder):
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255  # what Linux's file systems allow


def check_writable(outputs):
    """Refuse (UserError, one line) before any work an output of `outputs` (Roles) that could not be
    written where asked: one that exists and is not a regular file (a folder where a file goes), a name
    (with the temporary and lock names written beside it, `longest_name`) longer than its folder's
    NAME_MAX, a parent that is a file, a folder where no file can be created (read-only, no permission),
    and for a results file (kind "append") an existing file that cannot be opened for appending. Missing
    folders are created (as the run would); a probe file is created and removed in each folder."""
    probed = set()
    for out in outputs:
        path = Path(out.path)
        if out.kind not in ("file", "append"):
            continue  # a lock: utils.files.lock checks its own file, and its name is shorter
        _check_kind(out.flag, path)
        folder = _existing_folder(path)
        if os.path.lexists(folder) and not os.path.isdir(folder):
            where = "" if folder == Path(os.path.abspath(path)).parent else f"cannot write in {path.parent}: "
            raise UserError(f"{out.flag} {path}: {where}{folder} is a file, not a folder")
        longest = len(os.fsencode(path.name)) if out.kind == "append" else longest_name(path.name)
        limit = _name_max(folder)
        if longest > limit:
            what = "" if out.kind == "append" else "temporary "
            raise UserError(f"{out.flag} {path}: its name is too long for {folder} (its {what}file name takes "
                            f"{longest} bytes, more than the {limit} the folder allows): choose a shorter name")
        if out.kind == "append" and os.path.exists(path):
            try:
                with open(path, "ab"):
                    pass
            except OSError as err:
                raise UserError(f"{out.flag} {path}: cannot be appended to ({err.strerror or err})") from err
        elif path.parent not in probed:
            _probe(out.flag, path)
            probed.add(path.parent)


def _check_kind(flag, path):
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there yet (or a parent that is a file: said by the caller)
    except OSError as err:
        if err.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            raise UserError(f"{flag} {path}: not a usable path ({err.strerror})") from err
        raise UserError(f"{flag} {path}: cannot be inspected ({err.strerror or err})") from err
    if stat.S_ISDIR(mode):
        raise UserError(f"{flag} {path} is a folder: give a file name")
    if not stat.S_ISREG(mode):
        raise UserError(f"{flag} {path} exists and is not a regular file (a device, a pipe or a socket): "
                        "give a file name")


def _probe(flag, path):
    """Create the folder of `path` and a file in it, then remove that file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {path.parent}: {err.strerror or err}") from err


def check_outputs(outputs, model_location=None, data_location=None):
    """The outputs of a script that is not a soup run (a benchmark's numbers, a fine-tuned ingredient):
    none lands on an input (the ingredients of `model_location`, the data under `data_location`) or on
    another output (`check_distinct`), and each can be written (`check_writable`)."""
    inputs = (ingredient_inputs(model_location) if model_location else []) + data_inputs(data_location)
    check_distinct(outputs, inputs)
    check_writable(outputs)


def check_own_json(path, flag, keys, limit=64 * 2**20):
    """An existing file that a script replaces must be one it wrote: a JSON object (of at most `limit`
    bytes) holding `keys`. Anything else (an ingredient, a results file, a user's notes) is refused."""
    path = Path(path)
    if not os.path.isfile(path):
        return
    try:
        too_big = os.path.getsize(path) > limit
        doc = None if too_big else json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        doc = None
    if not (isinstance(doc, dict) and all(k in doc for k in keys)):
        raise UserError(f"{flag} {path} exists and is not a file this script wrote (a JSON object with "
                        f"{', '.join(keys)}): refusing to replace it; choose another path")


def run_outputs(soups, states, results_db):
    """The outputs of a soup run (Roles): `soups` ({path: the flag it came from}), the soup(s) the run
    may write with their sidecars and locks; `states` ({path: whether --resume named it}), MEHL's state
    file(s); the results file (kind "append")."""
    outputs = [role for soup, flag in soups.items() for role in soup_outputs(Path(soup), flag)]
    outputs += [role for state, given in states.items() for role in state_outputs(Path(state), given)]
    outputs.append(Role("--results-db", "the results file (--results-db)", Path(results_db), "append"))
    return outputs


def check_run(soups, states, results_db, model_location, data_location=None, heldout_index=None,
              standard=None):
    """A soup run's outputs against its inputs and each other (`check_distinct`). Outputs: `soups`
    ({path: the flag it came from}), the soup(s) the run may write (MEHL: one per method it may learn);
    `states` ({path: whether --resume named it}), MEHL's state file(s); the results file. Inputs: the
    ingredient folder, the data folder (`data_location`; without it, `standard`: the folder the data
    set was read from, see `data_inputs`) and the held-out index file."""
    outputs = run_outputs(soups, states, results_db)
    inputs = ingredient_inputs(model_location) + data_inputs(data_location, heldout_index, standard)
    check_distinct(outputs, inputs)


def data_inputs(data_location=None, heldout_index=None, standard=None):
    """The inputs of the data set: the folder given by --data-location, or with `standard` the data
    set's standard place, the folder it was read from (known only once it is read: callers check again
    then), and the held-out index file."""
    inputs = []
    if data_location or standard:
        flag = f"--data-location {data_location}" if data_location else f"its standard place {standard}"
        inputs.append(Role("--data-location", f"a file of the data set ({flag})", Path(data_location or standard),
                           "tree"))
    if heldout_index:
        inputs.append(Role("--heldout-index", "the held-out index (--heldout-index)", Path(heldout_index)))
    return inputs
