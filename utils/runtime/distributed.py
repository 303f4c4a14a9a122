"""The one distributed helper: torchrun's environment when present, a single process otherwise.

Backend: nccl on CUDA, gloo on CPU. Every print and file write is guarded by `is_primary()`.
"""
import datetime
import os

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


def setup(device_arg="auto"):
    """Start the process group when torchrun set WORLD_SIZE > 1; return the torch.device to use.

    `device_arg`: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". The CUDA device is torchrun's
    LOCAL_RANK when it is set, else N of "cuda:N", else 0.
    """
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        # A collective that never completes (a peer died) ends with an error instead of hanging.
        timeout = datetime.timedelta(seconds=float(os.environ.get("SOUP_DIST_TIMEOUT", 600)))
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except Exception as err:  # the rendezvous could not complete: say so in one line
                raise UserError(f"could not join the process group ({backend}, "
                            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                            f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {err}") from err
    if use_cuda:
        return _cuda_device(device_arg, local_rank)
    return torch.device("cpu")


def _cuda_device(device_arg, local_rank):
    """LOCAL_RANK under torchrun (one process per device), else the index of --device cuda:N (0 for cuda)."""
    index = local_rank if "LOCAL_RANK" in os.environ else int(device_arg.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device_arg}: CUDA device {index} does not exist here "
                        f"({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


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
