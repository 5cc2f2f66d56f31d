"""One job per run at a time: an exclusive ``flock`` on ``locks/<run_id>.lock``."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator

from cifarbench.store.layout import Layout


@contextlib.contextmanager
def run_lock(results: str | os.PathLike, run_id: str, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on a run (released by the kernel even on SIGKILL).

    Two jobs of the same run (a grid submitted twice, a retry racing a requeue) then train one after the
    other: the second finds the first's record, or resumes from its checkpoint if the first died."""
    path = Layout(results).lock(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
