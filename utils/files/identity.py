"""What "the same file" means, in one place: every cache and every record that stands for a file uses it.

- `stamp(path)`: its inode, status-change time, size and modification time,
  "ino-ctime_ns-size-mtime_ns". Cheap (one stat), and it changes whenever the file's bytes do: a write
  in place sets the modification and the status-change time, a file put in its place has another inode
  or a new status-change time, and no user can set a status-change time back (utime sets the
  modification time, and with it the status-change time to now). Used where reading the whole file
  would cost too much for what it guards: the results file's lines (a rerun finds the line of the same
  ingredients; each ingredient's accuracies are reused while its stamp is unchanged), caches of decoded
  images. What it trusts: the clock and the file system's own times (a clock set back by root, or a
  raw write to the block device, is not seen); docs/GUARANTEES.md.
- `describe(path)`: {path (resolved), size, mtime_ns, sha256}. Used where a change must be detected
  whatever happened to the file's times: MEHL's --resume state and every soup's recipe (a soup is
  rebuilt only from ingredients whose sha256 matches).
- `changes(old, new)`: what differs between two descriptions, in words.

Every cache key is a `sha256_bytes` of its parts: the frozen prefix's outputs (utils/run/prefix.py) hash
the tensors they depend on, the decoded images (utils/run/decoded.py) each file's path and `stamp`."""
import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def stamp(path):
    """Inode, status-change time, size and modification time of `path` (following links):
    "ino-ctime_ns-size-mtime_ns". Any write to the file, or another file under its name, changes it."""
    st = os.stat(path)
    return f"{st.st_ino}-{st.st_ctime_ns}-{st.st_size}-{st.st_mtime_ns}"


def sha256(path):
    """The sha256 of the file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(parts):
    """The sha256 of the parts of a key, each followed by a separator (so that ("ab", "c") != ("a", "bc")):
    a bytes-like part (bytes, a numpy array's memory) as it is, anything else as its str in UTF-8.
    `parts` is any iterable, consumed once (a generator keeps a million paths out of memory)."""
    h = hashlib.sha256()
    for part in parts:
        try:
            h.update(memoryview(part))
        except TypeError:
            h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def describe(path):
    """{path, size, mtime_ns, sha256} of `path`; the path resolved (links followed)."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256(path)}


FIELDS = (("path", "path"), ("size", "size"), ("mtime_ns", "modification time"), ("sha256", "contents"))


def changes(old, new):
    """The words for what differs between two descriptions (empty when they describe the same file)."""
    if not isinstance(old, dict):
        return ["record"]
    return [label for key, label in FIELDS if key in new and old.get(key) != new[key]]
