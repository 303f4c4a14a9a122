"""Peak memory: `torch.cuda.max_memory_allocated` on GPU, the process's peak resident set on CPU."""
import resource
import sys

import torch


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device):
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def current_rss_bytes():
    """Resident memory now (Linux), for benchmarks that want growth rather than the peak."""
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def gib(n):
    return round(n / 2**30, 3)
