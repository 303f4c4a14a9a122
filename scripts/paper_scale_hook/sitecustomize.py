"""Measurements of scripts/paper_scale.py inside every Python process of a phase (this folder goes
first on PYTHONPATH, so Python imports this file at start-up). Does nothing unless PAPER_SCALE_STATS
names a file. At exit, appends one JSON line to it: the process's own peak resident memory (VmHWM:
not getrusage's ru_maxrss, which a child inherits from its parent across fork and exec), CUDA's
peak (torch.cuda.max_memory_allocated, since the script's last reset, as its results lines), and every
pass over a DataLoader, batch by batch: how long the loop waited for the batch, how long the loop's
body took with it, its size, and whether gradients were on (a learning pass) or off (an evaluation).
Loader worker processes are forked and leave through os._exit: they write nothing and their memory is
not counted. A sitecustomize that this file shadows is run too."""
import atexit
import importlib.machinery
import importlib.util
import json
import os
import sys
import time

STATS = os.environ.get("PAPER_SCALE_STATS")
PASSES = []


def _chain():
    """Run the sitecustomize this one shadows, if any (later on sys.path)."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def _vm(field):
    # read here, not through utils.runtime.memory: this file runs in every Python process of a step before
    # anything is imported, and importing the project would import torch into each of them
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(batch):
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[-1] if hasattr(batch[-1], "__len__") else batch[0]
    try:
        return len(batch)
    except TypeError:
        return 1


def _timed(loader, iterator, torch):
    """Yield the loader's batches, recording for each [wait, body, size, grad]."""
    record = {"batch_size": getattr(loader, "batch_size", None), "dataset_len": None, "batches": []}
    try:
        record["dataset_len"] = len(getattr(loader, "dataset", None) or loader.kept)
    except (TypeError, AttributeError):
        pass
    PASSES.append(record)
    asked = time.perf_counter()
    try:
        for batch in iterator:
            got = time.perf_counter()
            entry = [got - asked, 0.0, _size(batch), torch.is_grad_enabled()]
            record["batches"].append(entry)
            yield batch
            asked = time.perf_counter()
            entry[1] = asked - got
    finally:
        if record["batches"] and record["batches"][-1][1] == 0.0:
            record["batches"][-1][1] = time.perf_counter() - got  # the loop left early


def _patch():
    import torch
    from torch.utils.data import DataLoader
    original = DataLoader.__iter__

    def __iter__(self):
        return _timed(self, original(self), torch)

    DataLoader.__iter__ = __iter__
    sys.meta_path.insert(0, _AfterImport("utils.run.evaluation", _patch_kept))


def _patch_kept(evaluation):
    """Passes over images kept decoded (utils/run/evaluation.py `_Floats`) come through no DataLoader."""
    import torch
    original = evaluation._Floats.__iter__
    evaluation._Floats.__iter__ = lambda self: _timed(self, original(self), torch)


class _AfterImport:
    """A meta path finder that lets module `name` be imported as usual, then calls `then(module)`."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module):
            run(module)
            then(module)
        spec.loader.exec_module = exec_module
        return spec


def _report():
    record = {"pid": os.getpid(), "argv": sys.argv, "vm_hwm_bytes": _vm("VmHWM"), "cuda_peak_bytes": None,
              "passes": PASSES}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            record["cuda_peak_bytes"] = max(torch.cuda.max_memory_allocated(d)
                                            for d in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a measurement must never change how the process ends
        pass
    with open(STATS, "a") as f:
        f.write(json.dumps(record) + "\n")


try:
    _chain()
except Exception:  # noqa: BLE001
    pass
if STATS:
    try:
        _patch()
    except Exception:  # noqa: BLE001 - no torch here: memory only
        pass
    atexit.register(_report)
