"""The ranks of one run trained on several processes (DDP, one SLURM task per device): who decides whether the run
trains, and how a rank that fails is named in the run's record. Torch-free: the files are the only channel.

Only global rank 0 takes the run's lock and decides; it writes the decision to the attempt's folder
(``runs/<run_id>/ranks/<job>.<restart>/start``: ``train`` or ``done``), which the other ranks wait for, so that a
run that another job completed costs them nothing and nobody waits at a rendezvous that rank 0 will not join.
While rank 0 waits for another job's lock it keeps the file ``waiting`` and fresh; a rank that sees neither a
fresh ``waiting`` nor a decision within the collective timeout gives up (rank 0 died before it decided).

A rank that raises writes ``rank-<r>.error`` (one line) there. Rank 0, after its own failure, waits GRACE_S for
the others' and rewrites its failed record's error to name every rank: their errors in the order they were
written (the rank that raised first, then those whose collectives failed), then the ranks that wrote nothing
(SIGKILLed, or still blocked in a collective). Where rank 0 is the rank that died, the other ranks see no
``rank-0.error`` within the collective timeout (a live rank 0 fails within one) and write the failed record
themselves. A SIGTERM (scancel, requeue) or the time-limit signal ends every rank without waiting: the record stays
rank 0's (``Cancelled``, or the signal's exit), as for a run on one device, and the requeued job trains it on.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from cifarbench.errors import UsageError
from cifarbench.store import atomic
from cifarbench.store.layout import Layout
from cifarbench.store.locks import beating

TIMEOUT_ENV = "CIFARBENCH_DDP_TIMEOUT_S"  # seconds a collective may wait for the other ranks (tests: a few)
DEFAULT_TIMEOUT_S = 1800.0  # torch's default for a process group
GRACE_S = 2.0  # how long rank 0 waits for the other ranks' errors: its leaving the group fails them at once
POLL_S = 0.5
START, TRAIN, DONE, WAITING = "start", "train", "done", "waiting"
_ERROR = re.compile(r"rank-(\d+)\.error")


def collective_timeout_s() -> float:
    """The timeout of the run's collective operations (and of the ranks' start), from CIFARBENCH_DDP_TIMEOUT_S."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds above 0; unset it for the default")
    return seconds


def global_rank() -> int:
    """This process's rank in the run: SLURM's task rank (one task per device), 0 outside SLURM."""
    return int(os.environ.get("SLURM_PROCID", "0"))


def attempt_dir(results: str | os.PathLike, run_id: str) -> Path:
    """The folder the ranks of this job's attempt share: a requeued job (same id) is a new attempt."""
    job = os.environ.get("SLURM_JOB_ID", "local")
    return Layout(results).rank_files(run_id, f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}")


def begin(folder: Path) -> None:
    """Rank 0, before its decision: a fresh folder for this attempt; earlier attempts' folders go."""
    for earlier in folder.parent.glob("*") if folder.parent.is_dir() else ():
        if earlier != folder:
            shutil.rmtree(earlier, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def end(folder: Path) -> None:
    """Rank 0, once the run completed: the attempt's files go (a failed attempt's stay, for whoever looks)."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # another attempt's folder is there: not empty
        folder.parent.rmdir()


def decide(folder: Path, train: bool) -> None:
    atomic.write_text(folder / START, TRAIN if train else DONE)


@contextlib.contextmanager
def waiting(folder: Path, timeout: float) -> Iterator[None]:
    """Rank 0 while it waits for another job's lock: ``start`` says ``waiting``, renewed well within ``timeout``."""
    atomic.write_text(folder / START, WAITING)

    def renew() -> bool:
        with contextlib.suppress(FileNotFoundError):
            os.utime(folder / START)
        return True

    with beating(renew, timeout / 4):
        yield


def await_decision(folder: Path, timeout: float) -> bool:
    """A rank but 0: whether rank 0 decided to train (False: the run is completed). Raises TimeoutError where
    rank 0 neither decided nor kept ``waiting`` fresh for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            said, age = (folder / START).read_text(), time.time() - (folder / START).stat().st_mtime
            if said in (TRAIN, DONE):
                return said == TRAIN
            if said == WAITING and age < timeout:
                deadline = time.monotonic() + timeout - age
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not start the run within {timeout:.0f} s ({TIMEOUT_ENV}): it died?")
        time.sleep(POLL_S)


def report_error(folder: Path, rank: int, error: str) -> None:
    """What made ``rank`` fail, one line, for the record (best effort: the rank is failing already)."""
    with contextlib.suppress(OSError):
        atomic.write_text(folder / f"rank-{rank}.error", " ".join(error.split()))


def rank_errors(folder: Path) -> dict[int, str]:
    """The ranks' errors written so far, in the order they were written."""
    found = []
    for path in folder.glob("rank-*.error") if folder.is_dir() else ():
        if match := _ERROR.fullmatch(path.name):
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_mtime, int(match[1]), path.read_text().strip()))
    return {rank: error for _, rank, error in sorted(found)}


def await_errors(folder: Path, ranks: set[int], timeout: float) -> dict[int, str]:
    """The ranks' errors once each of ``ranks`` wrote one, or after ``timeout`` seconds, whichever is first."""
    deadline = time.monotonic() + timeout
    while not ranks <= (errors := rank_errors(folder)).keys() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return errors


def failure(world_size: int, errors: dict[int, str], *, limit: int = 200) -> str:
    """Pure: a failed run's error naming every rank: the errors in the order they were written (``errors``'
    order: a rank that raised comes before the ranks whose collectives then failed), then the ranks that wrote
    none (killed, or still blocked in a collective)."""
    parts = [f"rank {r}: {error[:limit]}" for r, error in errors.items()]
    parts += [f"rank {r} wrote no error (killed, or still blocked)" for r in range(world_size) if r not in errors]
    return f"{world_size} ranks: " + "; ".join(parts)
