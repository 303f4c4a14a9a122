"""Peak memory: `torch.cuda.max_memory_allocated` on GPU, the process's peak resident set on CPU.

On Linux the resident peak is the process's own high-water mark (`VmHWM` in /proc/self/status).
`getrusage`'s `ru_maxrss` is not used there: a process started by fork (or vfork) and exec inherits its
parent's high-water mark in it, so a soup run started from a large process (a test runner, a driver
script) would report the parent's peak."""
import resource
import sys

import torch


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _proc_bytes(path, field):
    """A "Field: <n> kB" line of a /proc file in bytes, or None where there is none (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def status_bytes(field):
    """A field of this process's /proc/self/status in bytes (VmRSS, VmHWM), or None."""
    return _proc_bytes("/proc/self/status", field)


def mem_available():
    """The host's available memory (MemAvailable of /proc/meminfo) in bytes, or None."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def resident_peak_bytes():
    """This process's peak resident set in bytes."""
    peak = status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def peak_bytes(device):
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resident_peak_bytes()


def gib(n):
    return round(n / 2**30, 3)
