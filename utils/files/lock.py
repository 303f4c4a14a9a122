"""One run per output: an exclusive lock on a hidden file beside the soup, held for the whole run.

Two runs started with the same --save-soup would otherwise interleave their writes (the soup of one
beside the recipe of the other). The lock is `flock` on `.<soup name>.lock`: the kernel releases it
when the process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock;
the file itself stays (removing it would race with a run opening it) and holds the last holder's pid.
Under torchrun the primary rank takes it and every rank learns the outcome.

Not covered: folders on file systems without working `flock` (some network mounts), where the lock is
only advisory between processes on one host."""
import fcntl
import os
from pathlib import Path

from utils.files.soup_io import sidecar
from utils.runtime import distributed

_HELD = {}  # lock path -> open file holding the lock, in this process


def lock_path(path):
    return sidecar(path, "lock")


def acquire(path, what="output"):
    """Take the exclusive lock for output `path` (primary rank; all ranks agree) or raise a UserError
    naming the process that holds it. A lock this process already holds is kept (a second `main`
    call in one interpreter, as tests do, continues the hold)."""
    error = None
    if distributed.is_primary():
        error = _acquire(Path(path), what)
    distributed.agree(error is None, error or "")
    return lock_path(path)


def _acquire(path, what):
    lock = lock_path(path)
    if str(lock) in _HELD:  # already ours (MEHL locks its soup and its state file; a second main())
        return None
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as err:
        return f"{what} {path}: cannot create its lock file {lock}: {err.strerror or err}"
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read(32).strip() or "unknown"
        f.close()
        return (f"{what} {path} is in use by another run (pid {holder}, lock {lock}): wait for it to "
                "finish or choose another path")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[str(lock)] = f
    return None


def release_all():
    """Drop every lock this process holds (the end of a run; process exit does it too)."""
    while _HELD:
        _, f = _HELD.popitem()
        f.close()
