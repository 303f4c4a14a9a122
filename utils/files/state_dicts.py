"""State dicts: safe loading (memory bounded before a checkpoint is read) and atomic saving, validation
against an architecture, flattening in `named_parameters()` order. The blocks and the parameters
identical across ingredients are in `utils.run.layout`."""
import errno
import fcntl
import glob
import io
import logging
import mmap
import os
import pickle
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

import torch

from utils.files.checkpoint_formats import unwrap
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


# ----------------------------------------------------------------------------------------- files
def load_state_dict(path, max_bytes=None):
    """Load a checkpoint without running code from it: `.safetensors`, or `.pt` through
    `torch.load(weights_only=True)`. Accepts a plain state dict or a training checkpoint holding one
    (utils.files.checkpoint_formats.unwrap). Any failure is a UserError naming the file.

    `max_bytes` (the most a checkpoint of the architecture may hold, see `checkpoint_limit`) bounds
    what the file may unpack to, checked before any tensor data is read: the file's size, the sizes
    its zip entries declare and the storage sizes its pickle declares (a zip bomb is refused unread)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {describe_missing(path)}")
    check_unpacked_size(path, max_bytes)  # without a bound: what the file itself can hold
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused to load: the pickle asks for objects outside plain tensors "
                        f"(weights_only=True; nothing in it was run): {first_line(err)}") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as err:
        raise UserError(f"{path}: not a readable checkpoint (truncated or another format): "
                        f"{first_line(err)}") from err
    if isinstance(sd, dict):  # a training checkpoint, keys saved from DDP (utils/files/checkpoint_formats.py)
        sd = unwrap(sd, str(path))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: holds no state dict of tensors (found {type(sd).__name__})")
    screen_tensors(sd, str(path))
    return sd


def first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe_missing(path):
    """Why `path` is not a checkpoint file: missing, or what it is instead (a device, a FIFO, ...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return ("no such checkpoint file (a symbolic link to a missing file)" if os.path.islink(path)
                else "no such checkpoint file")
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    what = ("a folder" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    link = f" (a symbolic link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    return f"is {what}{link}, not a checkpoint file"


# Dtypes a state dict may hold: the floating types souping works in, and integer / bool buffers.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OTHER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def screen_tensors(sd, name):
    """Refuse what the checks and the soup math cannot handle, in one line: keys that are not strings,
    sparse or other non-dense layouts, meta tensors (no data), and dtypes other than FLOAT_DTYPES /
    OTHER_DTYPES (float8, complex, quantized)."""
    for k, v in sd.items():
        if not isinstance(k, str):
            raise UserError(f"{name}: holds a key that is not a string ({_short(k)}, "
                            f"{type(k).__name__}): not a state dict")
        if v.layout != torch.strided:
            raise UserError(f"{name}: tensor {_short(k)} has layout {str(v.layout).replace('torch.', '')}: "
                            "only dense tensors are accepted")
        if v.device.type == "meta":
            raise UserError(f"{name}: tensor {_short(k)} is a meta tensor (a shape without data)")
        if v.dtype not in FLOAT_DTYPES + OTHER_DTYPES:
            raise UserError(f"{name}: tensor {_short(k)} has dtype {str(v.dtype).replace('torch.', '')}: "
                            "only float16/bfloat16/float32/float64 and integer/bool tensors are accepted")


def _short(key, limit=80):
    text = repr(key) if not isinstance(key, str) else key
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------- bounds before reading
def checkpoint_limit(reference):
    """The most bytes a checkpoint of this architecture may unpack to: three times its numbers at
    float64 (a float64 export, or weights with two optimizer moments in a training checkpoint) plus
    64 MiB for metadata."""
    numbers = sum(v.numel() for v in reference.values())
    return 3 * 8 * numbers + 64 * 2**20


def check_unpacked_size(path, limit=None, holder="a checkpoint of this architecture", unreadable=None):
    """Refuse (UserError) a checkpoint that declares more data than it can hold, or than `limit` bytes
    (the most `holder` may hold; None: no such bound), reading only sizes: the file's size; for torch's
    zip format the uncompressed size every zip entry declares and the storage sizes its pickle declares;
    for torch's legacy format the declared storage sizes. torch allocates a storage from the size the
    pickle declares before reading its bytes, and inflates a compressed zip entry fully, so both are
    checked before torch.load sees the file.

    What a file can hold, whatever reads it (a --resume state, a soup read by report.py, a recipe's
    ingredient, a cache file): torch stores its records uncompressed and every storage's bytes are in
    the file, so the entries together declare at most the file's size, and so do the storages. A
    deflated record of 3 GiB in a 3 MB file is refused unread. `unreadable`: the words for a file that
    is not torch's format (default: "<path>: not a readable checkpoint (truncated or another format)")."""
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    size = path.stat().st_size
    if limit is not None and size > limit:
        raise UserError(f"{path}: the file is {mib(size)}, more than {holder} may hold "
                        f"({mib(limit)}): refused unread")
    unreadable = unreadable or f"{path}: not a readable checkpoint (truncated or another format)"
    if path.suffix == ".safetensors":
        return  # tensors are views of the file: its size bounds them
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
                declared = sum(i.file_size for i in infos)
                packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
                note = (f" ({len(packed)} compressed entr{'y' if len(packed) == 1 else 'ies'}; "
                        "torch never compresses them)" if packed else "")
                if limit is not None and declared > limit:
                    raise UserError(f"{path}: its zip entries unpack to {mib(declared)}, more than "
                                    f"{holder} may hold ({mib(limit)}){note}: "
                                    "refused unread")
                if declared > size:
                    raise UserError(f"{path}: its zip entries unpack to {mib(declared)}, more than the file "
                                    f"({mib(size)}) can hold{note}: refused unread")
                pkl = [i for i in infos if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
                if not pkl:
                    return  # not torch's layout: torch.load refuses it
                with zf.open(pkl[0]) as f:
                    data = f.read(size + 1)
        except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, EOFError) as err:
            raise UserError(f"{unreadable}: {first_line(err)}") from err
        storages = declared_storage_bytes(io.BytesIO(data), unreadable, pickles=1)
    else:
        if tarfile_format(path):
            raise UserError(f"{path}: a torch checkpoint in the pre-1.0 tar format is not accepted "
                            "(load and save it again with a current torch)")
        if size == 0:
            raise UserError(f"{unreadable}: the file is empty")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            storages = declared_storage_bytes(mm, unreadable, pickles=4)
    if limit is not None and storages > limit:
        raise UserError(f"{path}: its pickle declares storages of {mib(storages)}, more than "
                        f"{holder} may hold ({mib(limit)}): refused unread")
    if storages > size:
        raise UserError(f"{path}: its pickle declares storages of {mib(storages)}, more than the file "
                        f"({mib(size)}) can hold: refused unread")


def load_torch(path, holder):
    """`torch.load(weights_only=True)` of a file that is not a state dict (`holder`, e.g. "MEHL state
    file"), after `check_unpacked_size`: nothing is inflated or allocated beyond what the file can hold.
    Returns what torch.load gives; a UserError (one line naming the file) for any file it cannot read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {describe_missing(path)}")
    unreadable = f"{path}: not a readable {holder}"
    check_unpacked_size(path, None, f"a {holder}", unreadable)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{unreadable}: the pickle asks for objects outside plain tensors (weights_only=True; "
                        f"nothing in it was run): {first_line(err)}") from err
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line naming it
        raise UserError(f"{unreadable}: {first_line(err)}") from err


def tarfile_format(path):
    import tarfile
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy format starts with this number, pickled
_ITEMSIZE = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
             "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
             "BoolStorage": 1, "UntypedStorage": 1}


class _StorageType:
    def __init__(self, itemsize):
        self.itemsize = itemsize


class _Stub:
    """Stands for every object a scanned pickle names: nothing is imported, nothing runs."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _SizeScanner(pickle.Unpickler):
    """Walks torch's pickle with stubs in place of every global, adding up the bytes of the storages
    it declares (persistent ids ('storage', type, key, location, numel, ...), each key once)."""

    def __init__(self, f):
        super().__init__(f)
        self.total, self.keys = 0, set()

    def find_class(self, module, name):
        if name.endswith("Storage"):
            return _StorageType(_ITEMSIZE.get(name, 16))  # unknown storage types: the widest
        return _Stub

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind, key, numel = pid[1], pid[2], pid[4]
            itemsize = kind.itemsize if isinstance(kind, _StorageType) else 16
            if not isinstance(numel, int) or numel < 0:
                raise pickle.UnpicklingError(f"storage {key!r} declares a size of {numel!r}")
            try:
                hash(key)
            except TypeError:
                key = id(key)
            if key not in self.keys:
                self.keys.add(key)
                self.total += numel * itemsize
        return _Stub()


def declared_storage_bytes(f, unreadable, pickles):
    """Bytes of the storages declared by the pickle(s) at the start of `f` (legacy format: a magic
    number, the protocol, system info, then the object: up to `pickles` pickles in a row)."""
    scanner = _SizeScanner(f)
    try:
        first = scanner.load()
        if pickles > 1 and isinstance(first, int) and first == _MAGIC:
            for _ in range(3):
                scanner.load()
    except Exception as err:  # noqa: BLE001 - a pickle this walk cannot read, torch.load could not either
        raise UserError(f"{unreadable}: {first_line(err)}") from err
    return scanner.total


def atomic_write(path, write_fn, overwrite=False, size=None):
    """Write through a temporary file beside `path` (`temporary`) and `os.replace` it into place, so
    that the final name never holds a half-written file. Refuses an existing `path` unless `overwrite`.

    Any failure to write is a UserError naming the file, saying "No space left on device" when the
    disk is full (see `_write_reason`; `size`: the bytes to write, where known), and the temporary file
    is removed. Temporary files of this name left by a killed process are removed first
    (`remove_leftovers`: only what a write of this toolkit made)."""
    with Staged() as staged:
        staged.write(path, write_fn, overwrite, size)
        staged.replace(path)
    return Path(path)


# A temporary file is `.<name>.tmp` inside a folder of its own, `.<name>.<random>.tmp`, that mkdtemp makes
# beside the output (mode 0700, a name no one can predict, created exclusively): a link planted under
# a predictable name cannot send the write elsewhere, and no other user can plant one inside. The file
# is created with O_EXCL | O_NOFOLLOW; the folder is flock'ed while its writer lives (so a later write
# tells a killed run's leftover from a live write), and the file takes the umask's mode before it is
# renamed into place (mkstemp's 0600 would hide a soup from a colleague).
def temporary(path):
    """(folder, file, fd) of a new temporary file for `path`: `fd` holds the folder's flock until
    `drop_temporary`."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    file = folder / f".{path.name}.tmp"
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError:
        drop_temporary(folder, file, fd)
        raise
    return folder, file, fd


def finish_temporary(file):
    """Before a temporary file is renamed into place: a regular file (not a link: a writer may have put
    its own file under the name, as safetensors does, but no one else can in the private folder), given
    the mode the umask gives new files."""
    if not stat.S_ISREG(os.lstat(file).st_mode):
        raise OSError(errno.EEXIST, f"the temporary file {file} is not a regular file")
    os.chmod(file, 0o666 & ~umask())


def drop_temporary(folder, file, fd):
    """Remove a temporary file and its folder (what is left of them), and release the folder's lock."""
    try:
        if os.path.lexists(file):
            os.unlink(file)
        os.rmdir(folder)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(path):
    """Remove the temporary files of `path` that a killed write of this toolkit left: a folder
    `.<name>.*.tmp` (not a link) of this user whose flock no live writer holds, holding nothing or only
    `.<name>.tmp` (not a folder). Anything else named like them (an input called `.<output>.x.tmp`, a
    folder of the user's, a write still under way) is left as it is."""
    path = Path(path)
    for folder in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue  # not a folder, or a link
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError (an OSError): its writer lives
            inside = os.listdir(fd)
            if inside not in ([], [f".{path.name}.tmp"]):
                continue
            if inside and stat.S_ISDIR(os.lstat(folder / inside[0]).st_mode):
                continue
            if inside:
                os.unlink(folder / inside[0])
            os.rmdir(folder)
        except OSError:
            continue
        finally:
            os.close(fd)


def umask():
    """The process's umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Staged:
    """Several files written to temporary names in their folders first and renamed into place only
    once all are whole (`replace`, in the order the caller gives): a write that fails (a full disk)
    leaves every old file as it was. On leaving the `with` block, temporaries not renamed are removed."""

    def __init__(self):
        self.temps = {}  # final path -> (folder, file, fd) of its temporary file

    def __enter__(self):
        return self

    def write(self, path, write_fn, overwrite=False, size=None):
        """Write `path`'s temporary file with `write_fn(tmp)`; returns the temporary's path."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists: refusing to overwrite it (pass --overwrite, or choose another "
                            "name)")
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(path)
            self.temps[path] = folder, file, fd = temporary(path)
            tmp = str(file)
            write_fn(tmp)
            finish_temporary(file)
        except Exception as err:  # noqa: BLE001 - every write failure becomes one line naming the file
            raise UserError(f"could not write {path}: {_write_reason(err, path.parent, tmp, size)}") from err
        return tmp

    def replace(self, *paths):
        for path in map(Path, paths):
            folder, file, fd = self.temps.pop(path)
            try:
                os.replace(file, path)
            except OSError as err:
                raise UserError(f"could not write {path}: {_write_reason(err, path.parent)}") from err
            finally:
                drop_temporary(folder, file, fd)

    def __exit__(self, *exc):
        for temp in self.temps.values():
            drop_temporary(*temp)
        self.temps.clear()
        return False


NO_SPACE = "No space left on device"  # os.strerror(ENOSPC), in the words every user knows


def _write_reason(err, folder, tmp=None, size=None):
    """Why a write failed, in one line, with the folder's free space. A full disk is said as
    NO_SPACE whatever the library's words: torch.save reports it as "[enforce fail at
    inline_container.cc:...] unexpected pos", safetensors as its own error. Decided from the errno
    where the error (or one it was raised from) carries one, else from the free space: less than
    the bytes still to write (`size` less what `tmp` holds), or than FULL_MARGIN when unknown. Measured
    before the temporary file is removed, while it still fills the disk."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = _errno_of(err)
    text = str(err).strip()
    if code is not None:
        reason = NO_SPACE if code == errno.ENOSPC else os.strerror(code)
    elif NO_SPACE in text or "StorageFull" in text:
        reason = NO_SPACE
    elif free is not None and free < _still_to_write(tmp, size) + FULL_MARGIN:
        reason = NO_SPACE
    else:
        reason = text.splitlines()[0] if text else type(err).__name__
    if free is not None:
        reason += f" (free space in {folder}: {free / 2**20:.1f} MiB)"
    return reason


FULL_MARGIN = 1 << 20  # a write that fails with less free than this (besides what it still had to write)


def _errno_of(err):
    """The errno of `err` or of an exception it was raised from, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        err = err.__cause__ or err.__context__
    return None


def _still_to_write(tmp, size):
    if size is None or tmp is None:
        return 0
    try:
        return max(size - os.path.getsize(tmp), 0)
    except OSError:
        return size


def save_state_dict(sd, path, overwrite=False, staged=None):
    """Save a state dict as `.safetensors` or `.pt` (by suffix), atomically. With `staged` (a Staged),
    only its temporary file is written, and returned: the caller renames it with the files it
    belongs with."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    size = sum(v.numel() * v.element_size() for v in sd.values())
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        write = lambda tmp: save_file(sd, tmp)  # noqa: E731
    else:
        write = lambda tmp: torch.save(sd, tmp)  # noqa: E731
    if staged is not None:
        return staged.write(path, write, overwrite, size)
    return atomic_write(path, write, overwrite, size)


# ------------------------------------------------------------------------------------ validation
def check_state_dict(sd, reference, name):
    """Refuse a state dict that does not match `reference` (the architecture's own state dict):
    missing, unexpected or mis-shaped keys, and NaN/Inf values. `name` is the file, for the message."""
    missing = [k for k in reference if k not in sd]
    unexpected = [k for k in sd if k not in reference]
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(reference[k].shape)})"
              for k in reference if k in sd and sd[k].shape != reference[k].shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise UserError(f"{name} does not match the architecture: " + "; ".join(problems))
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{name}: tensor {k} holds NaN or Inf")


def check_dtypes(sd, reference, name):
    """Cast floating tensors to the architecture's dtype; refuse integer/float mix-ups.

    Mixed float dtypes (e.g. an fp16 ingredient beside fp32 ones) are cast to the reference dtype, with
    one logged warning per file: souping happens in float32/float64 anyway, and the cast is exact for
    fp16/bf16 -> fp32 (a float64 ingredient is rounded to float32, as loading it into the model would)."""
    out, casts = {}, set()
    for k, v in sd.items():
        ref = reference[k]
        if v.dtype != ref.dtype:
            if v.is_floating_point() and ref.is_floating_point():
                casts.add(str(v.dtype).replace("torch.", ""))
                v = v.to(ref.dtype)
            else:
                raise UserError(f"{name}: tensor {k} is {v.dtype}, the architecture expects {ref.dtype}")
        out[k] = v
    if casts and name not in _CAST_WARNED:  # once per file: ingredients are read several times
        _CAST_WARNED.add(name)
        log.warning("%s: floating tensors stored as %s were cast to the architecture's %s", name,
                    "/".join(sorted(casts)), str(next(v.dtype for v in reference.values()
                                                      if v.is_floating_point())).replace("torch.", ""))
    return out


_CAST_WARNED = set()


# --------------------------------------------------------------------------- flatten and blocks
def param_names(model):
    """Parameter names in `named_parameters()` order (the order blocks are built in)."""
    return [n for n, _ in model.named_parameters()]
