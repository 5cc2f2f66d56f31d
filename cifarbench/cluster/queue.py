"""Asking the scheduler what became of jobs: SLURM's ``sacct``/``squeue``/``scontrol`` and local processes.

The parsers are pure functions of the commands' text (unit-tested on recorded output); the functions that run
the commands make one call for a whole submission, never one per run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "STAGE_OUT",
        "SIGNALING",
        "PREEMPTED",
    }
)
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING"})
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize
_ARRAY = re.compile(r"(\d+)_\[([^\]%]+)(?:%\d+)?\]")


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def expand_job_id(job: str) -> list[str]:
    """sacct and squeue show array tasks that have not started as one line: "12_[3-5,7%2]" -> 12_3, 12_4, 12_5,
    12_7 (``%2`` is the array's throttle). Any other id is itself."""
    m = _ARRAY.fullmatch(job)
    if not m:
        return [job]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def parse_states(text: str) -> dict[str, str]:
    """``JobID|State`` lines (``sacct -n -P -X -o JobID,State`` or ``squeue -h -r -o %i|%T``) -> job id -> state.
    States lose their suffix ("CANCELLED by 0" -> "CANCELLED"); an empty state reads as UNKNOWN."""
    states = {}
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        if not job:
            continue
        word = state.split()[0] if state.split() else "UNKNOWN"
        for one in expand_job_id(job):
            states[one] = word
    return states


def cancelled_before_start(job_ids: set[str], states: dict[str, str], queued: set[str]) -> dict[str, str]:
    """SLURM keeps no accounting row for an array task cancelled while pending: it just drops out of its array's
    pending line in sacct. Such a task (its array listed, itself neither listed nor in ``queued``, the ids
    ``squeue -h -r -o %i`` shows) was cancelled. A task that starts is missing from sacct for a second too, but
    squeue shows it then."""
    listed = {j.split("_")[0] for j in states}
    missing = {j for j in job_ids if "_" in j and j not in states and j.split("_")[0] in listed}
    return {j: "CANCELLED" for j in missing - queued}


def parse_config_value(text: str, key: str) -> str | None:
    """A value from ``scontrol show config`` ("MaxArraySize            = 1001")."""
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name.strip() == key:
            return value.strip()
    return None


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it."""
    value = parse_config_value(_run(["scontrol", "show", "config"]).stdout, "MaxArraySize")
    return int(value) if value and value.isdigit() else DEFAULT_MAX_ARRAY_SIZE


def slurm_states(
    job_ids: set[str], *, run: Callable[[list[str]], subprocess.CompletedProcess] | None = None
) -> dict[str, str]:
    """job id ("123_4") -> SLURM state, from one ``sacct`` call for all arrays; ``squeue`` if accounting is off.
    ``run`` runs a command (tests give recorded output); by default the real binaries."""
    if not job_ids:
        return {}
    if run is None:
        if not shutil.which("squeue"):
            return {}
        run = _run
    arrays = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    out = run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", arrays])
    if out.returncode != 0:  # accounting off: only what is still queued is known
        return parse_states(run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", arrays]).stdout)
    states = parse_states(out.stdout)
    if any("_" in j and j not in states for j in job_ids):
        # all jobs, not -j: squeue refuses a list of ids that have all left the queue
        queued = run(["squeue", "-h", "-r", "-o", "%i"])
        if queued.returncode == 0:
            states.update(cancelled_before_start(job_ids, states, set(queued.stdout.split())))
    return states


def local_alive(job_id: str) -> bool:
    """Whether the local job (a process id) still runs; a finished one that nobody reaped yet (a zombie) does not."""
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{int(job_id)}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True
