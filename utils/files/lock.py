"""One run per output: an exclusive lock on a hidden file beside the soup, held for the whole run.

Two runs started with the same --save-soup would otherwise interleave their writes (the soup of one
beside the recipe of the other). The lock is `flock` on `.<soup name>.lock`: the kernel releases it
when the process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock;
the file itself stays (removing it would race with a run opening it) and holds the last holder's pid.
Under torchrun the primary rank takes it and every rank learns the outcome.

Not covered: folders on file systems without working `flock` (some network mounts), where the lock is
only advisory between processes on one host."""
import errno
import fcntl
import os
import re
import stat
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
        # O_NOFOLLOW: a link named like the lock must not lead the truncation below to another file
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return _not_a_lock(path, what, lock, "is a symbolic link")
        return f"{what} {path}: cannot create its lock file {lock}: {err.strerror or err}"
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        return _not_a_lock(path, what, lock, "is not a regular file" if not stat.S_ISREG(st.st_mode)
                           else f"has {st.st_nlink} names (a hard link to another file)")
    f = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = f.read(32).decode("ascii", "replace").strip() or "unknown"
        f.close()
        return (f"{what} {path} is in use by another run (pid {holder}, lock {lock}): wait for it to "
                "finish or choose another path")
    held = f.read(_MAX_LOCK_BYTES + 1)  # read under the lock: a holder writes its pid under it too
    if not _PID.fullmatch(held):
        f.close()
        return _not_a_lock(path, what, lock, f"holds {len(held)}{'+' if len(held) > _MAX_LOCK_BYTES else ''} "
                           "bytes that are not a process id")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    _HELD[str(lock)] = f
    return None


# What a lock file may hold: nothing (new) or the pid of its last holder. Anything else is another file
# that happens to have the lock's name; it is left as it is.
_PID = re.compile(rb"\d{0,20}\n?")
_MAX_LOCK_BYTES = 32


def _not_a_lock(path, what, lock, why):
    return (f"{what} {path}: its lock file {lock} {why}, not a lock file of this toolkit: refusing to "
            "touch it (move it away if it is not needed)")


def release_all():
    """Drop every lock this process holds (the end of a run; process exit does it too)."""
    while _HELD:
        _, f = _HELD.popitem()
        f.close()
