"""Results files: one JSON line per evaluated model or soup, appended, never truncated (README, "The four
recipes"). Every line goes through `append`: a soup's at the end of its run (utils/run/outputs.py, after
its sidecar files, recipe and soup), an ingredient's when it is evaluated (utils/run/individual.py).

Lines are written with a single `write` on a file opened in append mode and flushed + fsynced, so a
kill leaves whole lines only. The file is not trusted when read: a line that is torn (a power loss, a
full disk, another tool), not a JSON object, or not UTF-8 is skipped, counted, and reported in one
warning per file; an append after a torn last line starts on a fresh line, so it is not glued on. A
results path that is not a regular file (a device, a FIFO, a folder) is refused up front, and so is an
existing file that is not empty and whose first line is not a JSON object (`check_appendable`): that is
another kind of file (a soup, a log), never appended to."""
import json
import logging
import os
import stat
import time
from pathlib import Path

from utils.runtime import distributed
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)
_WARNED = set()  # (path, skipped count) already reported in this process


def check_regular(path, flag="--results-db"):
    """Refuse a results path that exists but is not a regular file (a symlink to /dev/zero reads
    forever, a FIFO blocks): a UserError saying what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there yet: whether it can be written is checked where it is written
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot be read ({err.strerror or err})") from err
    if not stat.S_ISREG(mode):
        from utils.files.state_dicts import describe_missing
        what = describe_missing(path).replace(", not a checkpoint file", "")
        raise UserError(f"{flag} {path} {what}, not a regular file: give a file name")


FIRST_LINE_MAX = 64 * 2**20  # bytes of the first line read to tell a results file (a line is far shorter)


def check_appendable(path, flag="--results-db"):
    """`check_regular`, then refuse an existing file that is not empty and whose first line (the first
    that is not blank) is not a JSON object: another kind of file, which an appended line would spoil.
    Reads at most FIRST_LINE_MAX bytes."""
    path = Path(path)
    check_regular(path, flag)
    try:
        with open(path, "rb") as f:
            first = b""
            while not first.strip():
                first = f.readline(FIRST_LINE_MAX)
                if not first:
                    return  # empty, or blank lines only
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot be read ({err.strerror or err})") from err
    record = _parse(first)
    if not isinstance(record, dict):
        raise UserError(f"{flag} {path} is not a results file (its first line is not a JSON object): "
                        "refusing to append to it; give a new or a results file")


def read(path):
    """All usable records of a results file (a missing file has none): the lines that are whole
    JSON objects. Other lines are skipped and counted; one warning per file says how many."""
    return [record for _, record in stream(path)]


def stream(path):
    """(byte offset, record) of every usable record of a results file, one line at a time (memory
    holds one line, whatever the file's size), skipping and counting the lines that are not whole JSON
    objects, with one warning per file at the end. The offset lets a reader keep only the fields it
    needs and read a line again (`line_at`)."""
    path = Path(path)
    if not path.exists():
        return
    check_regular(path)
    try:
        f = open(path, "rb")
    except OSError as err:
        raise UserError(f"the results file {path} cannot be read ({err.strerror or err})") from err
    skipped, used, first_bad = 0, 0, None
    with f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            record = _parse(raw)
            if isinstance(record, dict):
                used += 1
                yield start, record
            else:
                skipped += 1
                first_bad = first_bad or lineno
    if skipped and (str(path), skipped) not in _WARNED:
        _WARNED.add((str(path), skipped))
        log.warning("%s: skipped %d line(s) that are not whole JSON objects in UTF-8 (a torn write, "
                    "another tool's line), the first at line %d; the other %d lines are used",
                    path, skipped, first_bad, used)


def line_at(path, offset):
    """The record of the line starting at byte `offset` of a results file (`stream`'s offsets), or
    None when it is no longer a JSON object there (the file changed)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            record = _parse(f.readline())
    except OSError:
        return None
    return record if isinstance(record, dict) else None


def _parse(raw):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def append(path, record):
    """Append one record (primary rank only). Adds a timestamp. Returns the record. When the file
    does not end with a newline (a torn last line), the record starts on a fresh line."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    if distributed.is_primary():
        path = Path(path)
        check_appendable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=_jsonable) + "\n"
        try:
            with open(path, "ab+") as f:
                if f.seek(0, os.SEEK_END) > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = "\n" + line
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise UserError(f"could not append to the results file {path}: {err.strerror or err}") from err
    return record


def latest(records, match, absent=None):
    """The last of `records` whose fields equal those of `match` (None when there is none). `absent`:
    the value a field has in lines written before it existed ({field: value})."""
    absent = absent or {}
    hits = [r for r in records if all(r.get(k, absent.get(k)) == v for k, v in match.items())]
    return hits[-1] if hits else None


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
