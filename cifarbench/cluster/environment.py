"""The node's environment: the command that runs Python in each job, as submitit puts it before ``-u -m
submitit.core._submit FOLDER``. Either this host's interpreter (submitit's default), the grid's ``python:`` (an
interpreter or a launcher prefix such as ``conda run -n bench python``), or an Apptainer/Singularity image
(``container:``) with the folders the runs read and write bound in.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath

import cifarbench
from cifarbench.config.resources import CONTAINER_RUNTIMES, Resources

# The folder holding the cifarbench package: bound into an image and put on its Python path, so that the image's
# Python imports the cifarbench that submitted the job (the pickled job names its classes) rather than another.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(cifarbench.__file__)))
CONTAINER_PYTHON = "python3"  # what runs Python in an image where python: does not say
# apptainer splits --bind on commas (between paths) and colons (source:destination:options), --env on commas
_UNBINDABLE = set(",:")


def find_runtime(resources: Resources, which: Callable[[str], str | None] = shutil.which) -> str:
    """The command that runs ``resources.container``: ``container_runtime`` where set; else the first of
    CONTAINER_RUNTIMES on this host's PATH, as its full path; else apptainer, for the nodes' PATH to find."""
    if resources.container_runtime is not None:
        return resources.container_runtime
    return next((path for name in CONTAINER_RUNTIMES if (path := which(name))), CONTAINER_RUNTIMES[0])


def _outermost(paths: Iterable[str]) -> list[str]:
    """Pure: ``paths`` in their order, each once, without those inside another (binding a folder binds its
    contents)."""
    unique = list(dict.fromkeys(str(PurePosixPath(p)) for p in paths))
    return [p for p in unique if not any(q != p and PurePosixPath(p).is_relative_to(q) for q in unique)]


def python_command(resources: Resources, *, binds: Iterable[str], runtime: str, checkout: str = CHECKOUT) -> str | None:
    """Pure: the command that runs Python in the jobs of ``resources``; None: submitit's default, this host's
    interpreter. With a container: ``RUNTIME exec [--nv] --bind PATHS --env PYTHONPATH=CHECKOUT IMAGE PYTHON``,
    ``--nv`` where the task asks for GPUs, ``binds`` (absolute paths: the results folders and data roots) and
    ``checkout`` bound at the same paths. ``python:`` is a command as the user wrote it, so it stays unquoted.

    Raises ValueError for a path apptainer cannot bind (one with a comma or a colon)."""
    if resources.container is None:
        return resources.python
    paths = _outermost([*binds, checkout])
    for path in paths:
        if _UNBINDABLE & set(path):
            raise ValueError(
                f"container: {path!r} cannot be bound into the image: apptainer splits bind paths on ',' and ':'; "
                "move it to a path without them"
            )
    gpus = ["--nv"] if resources.gpus_per_node else []
    words = [runtime, "exec", *gpus, "--bind", ",".join(paths), "--env", f"PYTHONPATH={checkout}", resources.container]
    return f"{shlex.join(words)} {resources.python or CONTAINER_PYTHON}"
