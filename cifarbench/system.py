"""Facts about the machine this process runs on, with fallbacks where an OS call is Linux-only."""

from __future__ import annotations

import os
import shutil
import subprocess


def allowed_cores() -> list[int]:
    """The cores this process may run on, where the OS says: ``sched_getaffinity`` is Linux-only; elsewhere
    (macOS) none are named."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    return sorted(getaffinity(0)) if getaffinity else []


def usable_cores() -> int:
    """How many cores this process may run on: under SLURM often far fewer than the node's ``os.cpu_count()``;
    every core where the OS does not say (macOS)."""
    return len(allowed_cores()) or os.cpu_count() or 1


def local_gpus() -> int:
    """GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES when set, else what
    ``nvidia-smi -L`` lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0
