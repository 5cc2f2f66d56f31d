"""One job per run at a time: an exclusive ``flock`` on ``locks/<run_id>.lock`` or, on a filesystem without
``flock`` (Lustre mounted without it: ENOSYS; NFS without a lock daemon: ENOLCK), a lease file.

A lease is ``locks/<run_id>.lease``, made by an exclusive create (``O_CREAT | O_EXCL``, atomic on NFS v3+ and on
parallel filesystems alike) and renewed by its holder (its mtime touched every HEARTBEAT_S); a lease not renewed
for STALE_S was left by a holder that died (SIGKILL, a lost node), and a later holder breaks it: it renames the
stale lease away (one rename wins), then creates its own. ``CIFARBENCH_LOCK=lease`` asks for leases where ``flock``
works but only within one node (some parallel filesystems)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from cifarbench.store.layout import Layout

NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}
FORCE_ENV = "CIFARBENCH_LOCK"  # "lease": lease files even where flock works
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: a live holder never looks dead, and nodes' clocks may differ by a minute
POLL_S = 2.0


@contextlib.contextmanager
def run_lock(results: str | os.PathLike, run_id: str, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on a run: a ``flock`` (released by the kernel even on SIGKILL) or, where the
    filesystem has none (or ``CIFARBENCH_LOCK=lease``), a lease (broken by a later holder once stale).

    Two jobs of the same run (a grid submitted twice, a retry racing a requeue) then train one after the
    other: the second finds the first's record, or resumes from its checkpoint if the first died."""
    path = Layout(results).lock(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get(FORCE_ENV) != "lease":
        with open(path, "a") as fh:
            try:
                _flock(fh, on_wait)
            except OSError as exc:
                if exc.errno not in NO_FLOCK:
                    raise
                print(f"cifarbench: {path.parent} has no flock ({exc.strerror}): run {run_id} holds a lease file",
                      file=sys.stderr)  # fmt: skip
            else:
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
                return
    with lease(path.with_suffix(".lease"), on_wait=on_wait):
        yield


def _flock(fh, on_wait: Callable[[], None] | None) -> None:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_wait:
            on_wait()
        fcntl.flock(fh, fcntl.LOCK_EX)


def flock_works(folder: str | os.PathLike) -> bool:
    """Whether ``folder``'s filesystem has ``flock`` (tried on a temporary file there, which is then gone)."""
    with tempfile.TemporaryFile(dir=os.fspath(folder), prefix=".lock-probe-") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in NO_FLOCK:
                return False
            raise
        fcntl.flock(fh, fcntl.LOCK_UN)
    return True


@contextlib.contextmanager
def lease(path: Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lease ``path``: wait while another holder renews it, break it once it is STALE_S seconds old."""
    heartbeat, stale, poll = HEARTBEAT_S, STALE_S, POLL_S  # read when called: a test shortens them
    token = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
    waited = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _age(path) > stale:
                _break(path, stale)
                continue
            if on_wait and not waited:
                on_wait()
            waited = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        break
    try:
        with beating(lambda: _renew(path, token), heartbeat):
            yield
    finally:
        if _holder(path) == token:
            path.unlink(missing_ok=True)


def _age(path: Path) -> float:
    """Seconds since the lease was last renewed; 0 where it is gone (the next create will tell)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _holder(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _break(path: Path, stale: float) -> None:
    """Move a stale lease out of the way; where another breaker and a new holder came between the look and the
    move, the fresh lease that was moved goes back."""
    moved = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:  # another breaker was first
        return
    try:
        if time.time() - moved.stat().st_mtime <= stale:  # not the stale lease: someone's new one
            with contextlib.suppress(FileExistsError):
                os.link(moved, path)
    finally:
        moved.unlink(missing_ok=True)


def _renew(path: Path, token: str) -> bool:
    """Renew the lease ``path`` held by ``token``; False once it is another's."""
    if _holder(path) != token:
        print(f"cifarbench: lost the lease {path} (not renewed for too long); another job may run this run too",
              file=sys.stderr)  # fmt: skip
        return False
    os.utime(path)
    return True


@contextlib.contextmanager
def beating(beat: Callable[[], bool], every: float) -> Iterator[None]:
    """Call ``beat`` every ``every`` seconds in a thread while the block runs, until it returns False: a file kept
    fresh for those who wait on it (a lease, a multi-device run's decision)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every) and beat():
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
