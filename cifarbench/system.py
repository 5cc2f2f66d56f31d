"""Facts about the machine this process runs on and what the process uses of it, with fallbacks where an OS call
is Linux-only."""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

_IMPORTED = time.time()


def allowed_cores() -> list[int]:
    """The cores this process may run on, where the OS says: ``sched_getaffinity`` is Linux-only; elsewhere
    (macOS) none are named."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    return sorted(getaffinity(0)) if getaffinity else []


def usable_cores() -> int:
    """How many cores this process may run on: under SLURM often far fewer than the node's ``os.cpu_count()``;
    every core where the OS does not say (macOS)."""
    return len(allowed_cores()) or os.cpu_count() or 1


def visible_devices() -> list[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES names, as CUDA reads it (up to the first invalid entry, such as -1); None
    where it is not set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    ids = []
    for name in (v.strip() for v in visible.split(",")):
        if not name or name.startswith("-"):
            break
        ids.append(name)
    return ids


def local_gpus() -> int:
    """GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES when set, else what
    ``nvidia-smi -L`` lists, else none."""
    visible = visible_devices()
    if visible is not None:
        return len(visible)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def allocation_cpus() -> int:
    """The CPUs of this job's allocation: SLURM's CPUs per task, else the cores this process may run on."""
    granted = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(granted) if granted.isdigit() else usable_cores()


def allocation_gpus() -> int:
    """The GPUs of this job's allocation: SLURM's GPUs on the node, else those this process may use."""
    granted = os.environ.get("SLURM_GPUS_ON_NODE", "")
    return int(granted) if granted.isdigit() else local_gpus()


def process_started() -> float:
    """When this process started (``time.time()``'s clock): from /proc on Linux, else when cifarbench was imported."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime; the fields after the name start at 3
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_last_task_ended: float | None = None


def task_started() -> float:
    """When this process began the task it is on now: its start, or the end of the task before it (local execution
    runs several tasks one after another in one process)."""
    return _last_task_ended if _last_task_ended is not None else process_started()


def task_ended() -> None:
    global _last_task_ended
    _last_task_ended = time.time()


def reset_peak_rss() -> bool:
    """Start measuring this process's peak resident memory afresh (``peak_rss_mb``): on Linux, writing 5 to
    /proc/self/clear_refs resets the high-water mark (VmHWM) to the memory resident now. Returns False where that is
    not possible (not Linux, or not permitted): the peak then stays the process's lifetime peak.

    First the memory the process has freed goes back to the OS where glibc allows (``malloc_trim``): the allocator
    keeps what an earlier task in the same process freed (about 1.0 of 1.9 GiB after a resnet110 epoch on a CPU), which
    would otherwise count as resident in the next task's peak."""
    gc.collect()  # a finished task's reference cycles (its Trainer's) hold memory until the collector runs
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory (RSS) in MiB: VmHWM from /proc/self/status on Linux, since the last
    ``reset_peak_rss``; elsewhere the lifetime peak ``getrusage`` reports (ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024  # in kB, which /proc means as KiB
    except (OSError, StopIteration, IndexError, ValueError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def git_commit() -> str | None:
    """The commit of the cifarbench checkout this process imported; None outside a git checkout."""
    import cifarbench

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(cifarbench.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
