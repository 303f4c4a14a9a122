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


def gib(n):
    return round(n / 2**30, 3)
