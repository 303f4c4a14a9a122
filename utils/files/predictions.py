"""Per-example predictions of an evaluation, kept for the report's paired tests (docs/RESULTS.md,
"Paired statistics"). One file per results line, beside the results file in `<results file>.predictions/`:
a .npy int16 array of shape (rows, 6), each row an example's label then its five best classes (-1
past the number of classes), the sets one after the other in the order the line lists them
("predictions": {"file", "sha256", "sets": [[name, rows], ...]}). The label column lets the report
check that two files hold the same examples before it pairs them.

The file is named by its sha256 (identical predictions share one file; nothing is ever overwritten
with other bytes), written as every output is (utils/files/state_dicts.py `atomic_write`: a private temporary,
renamed into place). Read back, it is untrusted input: `load` checks the line's field, the file's kind and size
before it reads, then the .npy header (dtype, shape), then the sha256, and raises `Unusable` with one
sentence saying what is wrong; the caller warns once and leaves the comparison out."""
import hashlib
import io
import os
import re
import stat
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from utils.files.state_dicts import atomic_write
from utils.runtime.errors import UserError

COLUMNS = 6           # label + the top 5
DTYPE = np.dtype("<i2")
HEADER_MAX = 4096     # numpy writes a header of 128 bytes for this shape; this bounds what is read
_HEX = re.compile(r"[0-9a-f]{64}")


class Unusable(Exception):
    """A predictions file (or a results line's field naming it) that cannot be used: the message is
    one sentence for a warning."""


def folder_of(results_db):
    results_db = Path(results_db)
    return results_db.parent / f"{results_db.name}.predictions"


def save(results_db, kept):
    """Write the predictions `kept` ({set name: (rows, 6) int16 array}) beside `results_db`; returns
    the results line's field."""
    names = list(kept)
    rows = np.concatenate([np.asarray(kept[n], dtype=DTYPE).reshape(-1, COLUMNS) for n in names]) \
        if names else np.zeros((0, COLUMNS), DTYPE)
    buf = io.BytesIO()
    npy_format.write_array(buf, np.ascontiguousarray(rows), allow_pickle=False)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    folder = folder_of(results_db)
    target = folder / f"{digest[:32]}.npy"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"could not write the predictions file {target}: {err.strerror or err}") from err
    if not _same_bytes(target, data):  # written as every output is (a private temporary, renamed)
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data), overwrite=True, size=len(data))
    return {"file": str(target.relative_to(Path(results_db).parent)), "sha256": digest,
            "columns": "label, top-5 classes", "dtype": "int16",
            "sets": [[n, int(len(np.asarray(kept[n]).reshape(-1, COLUMNS)))] for n in names]}


def _same_bytes(target, data):
    """Whether `target` is already a regular file holding `data` (a rerun with the same predictions)."""
    try:
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
            return False
        return target.read_bytes() == data
    except OSError:
        return False


def check_field(field):
    """[(name, rows)] of a results line's "predictions" field, or Unusable."""
    if not isinstance(field, dict):
        raise Unusable("its \"predictions\" field is not an object")
    file, digest, sets = field.get("file"), field.get("sha256"), field.get("sets")
    if not isinstance(file, str) or not file or "\x00" in file:
        raise Unusable("its \"predictions\" field names no file")
    if not isinstance(digest, str) or not _HEX.fullmatch(digest):
        raise Unusable("its \"predictions\" field has no sha256 of 64 hex digits")
    if not isinstance(sets, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and type(s[1]) is int and s[1] >= 0
            for s in sets):
        raise Unusable("its \"predictions\" field lists the sets wrongly (expected [[name, rows], ...])")
    if len({s[0] for s in sets}) != len(sets):
        raise Unusable("its \"predictions\" field lists a set twice")
    return [(s[0], s[1]) for s in sets]


def load(results_db, field):
    """{set name: (rows, 6) int16 array} of the predictions a results line of `results_db` names
    (`field`: its "predictions" value). Raises Unusable, never reads more than the field declares."""
    sets = check_field(field)
    rows = sum(n for _, n in sets)
    path = Path(results_db).parent / field["file"]
    expected_data = rows * COLUMNS * DTYPE.itemsize
    try:
        st = os.stat(path)
    except (OSError, ValueError) as err:
        raise Unusable(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from err
    if not stat.S_ISREG(st.st_mode):
        raise Unusable(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_MAX)   # the header first: what the file says it holds
            shape, dtype, offset = _header(path, head)
            if dtype != DTYPE:
                raise Unusable(f"{path}: holds {dtype} values, not int16 (wrong dtype)")
            if len(shape) != 2 or shape[1] != COLUMNS or shape[0] != rows:
                raise Unusable(f"{path}: holds an array of shape {shape}, the results line names ({rows}, "
                               f"{COLUMNS}) (wrong length)")
            if st.st_size < offset + expected_data:
                raise Unusable(f"{path}: truncated ({st.st_size - offset} of {expected_data} bytes of "
                               "predictions)")
            if st.st_size > offset + expected_data:
                raise Unusable(f"{path}: {st.st_size - offset - expected_data} bytes more than its header "
                               "declares (wrong length)")
            f.seek(0)
            data = f.read(offset + expected_data + 1)   # bounded by what the line declares
    except OSError as err:
        raise Unusable(f"{path}: cannot be read ({err.strerror or err})") from err
    if len(data) != offset + expected_data:
        raise Unusable(f"{path}: changed while it was read")
    if hashlib.sha256(data).hexdigest() != field["sha256"]:
        raise Unusable(f"{path}: its sha256 is not the one its results line records (the file changed)")
    array = np.frombuffer(data, dtype=DTYPE, offset=offset).reshape(rows, COLUMNS)
    out, start = {}, 0
    for name, n in sets:
        out[name] = array[start:start + n]
        start += n
    return out


def _header(path, data):
    """(shape, dtype, data offset) of the .npy header at the start of `data`, or Unusable."""
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        read = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"version {version}")
        shape, fortran, dtype = read(f)
    except (ValueError, EOFError, SyntaxError, TypeError) as err:
        raise Unusable(f"{path}: not a readable .npy file ({err})") from err
    if fortran:
        raise Unusable(f"{path}: a Fortran-ordered array, not one this project writes")
    return shape, dtype, f.tell()
