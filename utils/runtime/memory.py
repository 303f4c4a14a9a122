"""Peak memory: `torch.cuda.max_memory_allocated` on GPU, the process's peak resident set on CPU.

On Linux the resident peak is the process's own high-water mark (`VmHWM` in /proc/self/status).
`getrusage`'s `ru_maxrss` is not used there: a process started by fork (or vfork) and exec inherits its
parent's high-water mark in it, so a soup run started from a large process (a test runner, a driver
script) would report the parent's peak."""
import math
import os
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
    """The memory this process may still take, in bytes, or None where unknown: the host's MemAvailable
    (/proc/meminfo), bounded by what the process's memory cgroup leaves (`cgroup_available`): a container
    limited to 1.5 GiB on a host with 100 GiB free has 1.5 GiB less what it uses."""
    host, group = _proc_bytes("/proc/meminfo", "MemAvailable"), cgroup_available()
    if host is None or group is None:
        return host if group is None else group
    return min(host, group)


CGROUP_ROOT = "/sys/fs/cgroup"  # where the cgroup file systems are mounted
PROC_CGROUP = "/proc/self/cgroup"  # which cgroups this process is in
# A v1 memory.limit_in_bytes at or above this is "no limit" (the kernel writes PAGE_COUNTER_MAX pages).
_NO_LIMIT = 2**62


def cgroup_available(root=None, proc=None):
    """What the memory cgroups of this process leave, in bytes: for its cgroup and every one above it,
    the limit less the usage that cannot be reclaimed (usage less inactive file pages), the smallest of
    them; None when no limit is set or none can be read. cgroup v2: memory.max and memory.current; v1:
    memory.limit_in_bytes and memory.usage_in_bytes. `root` and `proc`: where they are mounted and listed."""
    leaves = []
    for folder, names in _cgroup_folders(root or CGROUP_ROOT, proc or PROC_CGROUP):
        limit = _first_int(os.path.join(folder, names[0]))
        usage = _first_int(os.path.join(folder, names[1]))
        if limit is None or limit >= _NO_LIMIT or usage is None:
            continue
        reclaimable = _stat_field(os.path.join(folder, "memory.stat"), names[2]) or 0
        leaves.append(max(limit - max(usage - reclaimable, 0), 0))
    return min(leaves) if leaves else None


_V2 = ("memory.max", "memory.current", "inactive_file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_folders(root, proc):
    """(folder, the file names of its version) for the process's memory cgroup and its ancestors up to
    the mount point. Inside a cgroup namespace the listed path may not exist under the mount, whose top
    is then the process's own cgroup."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, names = root, _V2
        elif "memory" in parts[1].split(","):
            base, names = os.path.join(root, "memory"), _V1
        else:
            continue
        folder = os.path.normpath(os.path.join(base, parts[2].lstrip("/")))
        while not os.path.isdir(folder) and folder != base:
            folder = os.path.dirname(folder)
        while True:
            found.append((folder, names))
            if folder == os.path.normpath(base) or len(folder) <= len(base):
                break
            folder = os.path.dirname(folder)
    return found


def _first_int(path):
    """The number a cgroup file holds (None for "max", a missing or unreadable file)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat_field(path, field):
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == field:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


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
    """Bytes for a reader, in the one unit used everywhere: GiB to three decimals, below 1 GiB to four
    significant digits, trailing zeros dropped and never an exponent ("0.25 GiB", "0.0009766 GiB" for
    1 MiB, "11.498 GiB"); "-" for None (not measured)."""
    if n is None:
        return "-"
    x = n / 2**30
    decimals = 3 if x == 0 or abs(x) >= 1 else min(12, 3 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}".rstrip("0").rstrip(".") + " GiB"
