"""The one distributed helper: torchrun's environment when present, a single process otherwise.

Backend: nccl on CUDA, gloo on CPU. Every print and file write is guarded by `is_primary()`.
"""
import argparse
import contextlib
import datetime
import math
import os
import re
import sys
import tempfile
import threading

import torch
import torch.distributed as dist

from utils.runtime.errors import UserError


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_primary():
    return rank() == 0


def is_distributed():
    return world_size() > 1


# torchrun's variables (and this toolkit's SOUP_DIST_TIMEOUT): each read here and nowhere else, checked
# before it is used, so a bad value is one line naming it (`environment`).
DEFAULT_TIMEOUT = 600.0  # seconds a collective (and the rendezvous) may wait for a peer
MAX_TIMEOUT = 10 * 365 * 86400.0  # what datetime.timedelta and the stores take, with room to spare
JOIN_GRACE = 5.0  # seconds past SOUP_DIST_TIMEOUT for torch's own timeout to answer first


def _integer(name, low, high=None):
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"environment variable {name}={text!r}: must be a whole number {bound} "
                        "(torchrun sets it; unset it for a single process)")
    return value


def environment():
    """The distributed environment, read and checked in one place: a dict with local_rank, rank,
    world_size, local_world_size (torchrun's LOCAL_RANK, RANK, WORLD_SIZE, LOCAL_WORLD_SIZE; one process
    when absent), master_port (None when unset) and timeout (SOUP_DIST_TIMEOUT: seconds > 0, finite).
    A UserError names a variable that is malformed or out of range, or two that contradict each other."""
    world = _integer("WORLD_SIZE", 1)
    local_world = _integer("LOCAL_WORLD_SIZE", 1)
    env = {"world_size": world or 1, "local_world_size": local_world or 1,
           "rank": _integer("RANK", 0), "local_rank": _integer("LOCAL_RANK", 0),
           "master_port": _integer("MASTER_PORT", 1, 65535)}
    if env["rank"] is not None and env["rank"] >= env["world_size"]:
        raise UserError(f"environment variables RANK={env['rank']} and WORLD_SIZE={env['world_size']}: RANK must be "
                        "below WORLD_SIZE")
    if local_world is not None and env["local_rank"] is not None and env["local_rank"] >= local_world:
        raise UserError(f"environment variables LOCAL_RANK={env['local_rank']} and LOCAL_WORLD_SIZE={local_world}: "
                        "LOCAL_RANK must be below LOCAL_WORLD_SIZE")
    text = os.environ.get("SOUP_DIST_TIMEOUT")
    try:
        timeout = DEFAULT_TIMEOUT if text is None else float(text)
    except ValueError:
        timeout = math.nan
    if not 0 < timeout <= MAX_TIMEOUT:
        raise UserError(f"environment variable SOUP_DIST_TIMEOUT={text!r}: must be a number of seconds > 0 and "
                        f"at most {MAX_TIMEOUT:g}")
    env["timeout"] = timeout
    return env



def local_world_size():
    """Processes on this host (LOCAL_WORLD_SIZE; 1 without torchrun), checked."""
    return environment()["local_world_size"]


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def parse_device(text):
    """`text` as a device choice ("auto", "cpu", "cuda", "cuda:N"); argparse's `type` (a bad one is its
    one-line error). Returns the text, normalised."""
    value = str(text).strip().lower()
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,4}", value):
        return value
    raise argparse.ArgumentTypeError(f"expected {DEVICE_FORMS}, got {text!r}")


def setup(device_arg="auto"):
    """Start the process group when torchrun set WORLD_SIZE > 1; return the torch.device to use.

    `device_arg`: "auto" (CUDA when available), "cpu", "cuda", or "cuda:N" (the GPU N; under torchrun
    each rank takes LOCAL_RANK, so N is honoured only without it).
    """
    env = environment()
    device = pick_device(device_arg, env["local_rank"])
    if env["world_size"] > 1 and not dist.is_initialized():
        join("nccl" if device.type == "cuda" else "gloo", env["timeout"])
    return device


def pick_device(device_arg="auto", local_rank=None):
    """The torch.device of `device_arg` (see `setup`); `local_rank` (torchrun's) picks the GPU when set.
    A UserError when CUDA is asked for and absent, or the GPU asked for is not there."""
    device_arg = parse_device_value(device_arg)
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device_arg} was asked for but no CUDA device is visible")
    if not use_cuda:
        return torch.device("cpu")
    index = local_rank if local_rank is not None else int(device_arg.split(":")[1]) if ":" in device_arg else 0
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device_arg}: CUDA device {index} does not exist here "
                        f"({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def parse_device_value(value):
    try:
        return parse_device(value)
    except argparse.ArgumentTypeError as err:
        raise UserError(f"--device: {err}") from None


def join(backend, timeout):
    """Join torchrun's process group within `timeout` seconds, whatever answers at MASTER_ADDR:MASTER_PORT
    (a peer that never comes, a program that accepts and says nothing, or garbage): torch is given the
    timeout, and the whole rendezvous runs under a watchdog that ends it in one line when torch does not.
    What torch's C++ code prints meanwhile (a store's retries, each with a 40-frame backtrace) is held and
    shown only when the rendezvous succeeds: a failure is the one line."""
    where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}"
    with _stderr_held() as held:
        failure = _rendezvous(backend, timeout)
    if failure is None:
        os.write(2, b"".join(held))
        return
    if isinstance(failure, TimeoutError):
        _silence_left_behind()
        raise UserError(f"could not join the process group ({backend}, {where}): no rendezvous within "
                        f"SOUP_DIST_TIMEOUT={timeout:g} s (is MASTER_PORT another program's?)")
    raise UserError(f"could not join the process group ({backend}, {where}): "
                    f"{str(failure).splitlines()[0] if str(failure) else type(failure).__name__}") from failure


def _rendezvous(backend, timeout):
    """`dist.init_process_group` in a thread given `timeout` + JOIN_GRACE seconds: None when it joined,
    else its exception (TimeoutError when it did not return in time; the thread is left behind)."""
    done, failure = threading.Event(), []

    def rendezvous():
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        except BaseException as err:  # noqa: BLE001 - reported by the caller in one line
            failure.append(err)
        finally:
            done.set()

    threading.Thread(target=rendezvous, name="rendezvous", daemon=True).start()
    if not done.wait(timeout + JOIN_GRACE):
        return TimeoutError()
    return failure[0] if failure else None


def _silence_left_behind():
    """The rendezvous thread left behind may still print (torch's store gives up after its own retries):
    Python's stderr moves to a copy of file descriptor 2, and descriptor 2, where C++ code writes, to
    /dev/null, so that the run's one line is the last it shows (the process is about to exit)."""
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


@contextlib.contextmanager
def _stderr_held():
    """File descriptor 2 (where C++ code writes) sent to a temporary file for the block; yields a list that
    holds, after the block, the bytes written there."""
    sys.stderr.flush()
    saved, written = os.dup(2), []
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield written
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            written.append(held.read())



def teardown():
    """Leave the process group (the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum `tensor` in place over ranks (no-op on one process) and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src=0):
    """Send a picklable object from `src` to every rank (used for small metadata only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(ok, message):
    """Every rank learns whether all ranks are `ok`; used so that one rank's bad input stops all.

    Returns normally when all are fine; raises UserError (with this rank's message, or a note that
    another rank failed) otherwise. Avoids the hang of one rank leaving while others wait in a collective.
    """
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if is_distributed() and dist.get_backend() == "nccl":
        flag = flag.cuda()
    all_reduce_sum(flag)
    if int(flag.item()) > 0:
        raise UserError(message if not ok else "another rank failed (see its message above)")
