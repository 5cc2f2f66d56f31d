"""What a probe job reports from a compute node: the interpreter, the training stack's versions, the GPU, and
whether the grid's data and results folder are there. ``cifarbench.cluster.probe`` submits it and reads it.

Each module is imported by name inside ``node_report`` so that one that is missing or broken is reported, not
raised; importing this module imports nothing of the training stack (the control plane pickles ``node_report``).
"""

from __future__ import annotations

import importlib
import os
import platform
import socket
import sys

from cifarbench.store.atomic import check_results_writable
from cifarbench.store.datasets import DataError, check_dataset
from cifarbench.system import git_commit, visible_devices

STACK = ("torch", "torchvision", "lightning", "submitit", "cifarbench")


def _version(name: str) -> str:
    """``name``'s version, or "missing: " and why it cannot be imported."""
    try:
        module = importlib.import_module(name)
    except Exception as e:  # an ImportError, or a module that fails while importing (a broken CUDA library)
        return f"missing: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return str(getattr(module, "__version__", "?"))


def _gpu() -> dict:
    try:
        import torch
    except Exception:  # reported by the versions already
        return {"gpu_name": None, "gpu_count": 0, "gpu_memory_gb": None}
    if not torch.cuda.is_available():
        return {"gpu_name": None, "gpu_count": 0, "gpu_memory_gb": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu_name": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
    }


def node_report(results: str, datasets: list[tuple[str, str]]) -> dict:
    """The node's answers, a dict of plain values (it travels back pickled): ``datasets`` are (dataset, data root)
    pairs whose files must be there; ``results`` the folder records are written to."""
    data: dict[str, str | None] = {}
    for dataset, root in datasets:
        try:
            check_dataset(dataset, root, verify=False)
            data[f"{dataset} in {root}"] = None
        except DataError as e:
            data[f"{dataset} in {root}"] = str(e)
    writable: str | None = None
    try:
        check_results_writable(results)
    except Exception as e:  # UsageError: its message says why
        writable = str(e)
    return {
        "node": socket.gethostname(),
        "python": sys.executable,
        "python_version": platform.python_version(),
        "container": os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"),
        "versions": {name: _version(name) for name in STACK},
        "git_commit": git_commit(),
        "visible_devices": visible_devices(),
        **_gpu(),
        "data": data,
        "results": writable,
    }
