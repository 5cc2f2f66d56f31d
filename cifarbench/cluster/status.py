"""What became of every run: records, submission manifests and SLURM's job states, combined."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from cifarbench.cluster import queue
from cifarbench.config.resources import STOPPED
from cifarbench.config.spec import RunSpec
from cifarbench.errors import plural
from cifarbench.store import records, scan
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import read_manifests
from cifarbench.store.progress import read_progress

ORDER = records.STATES
ENDED = {"completed", "failed", "cancelled", "lost", "not submitted"}


@dataclass(frozen=True, kw_only=True)
class RunStatus:
    run_id: str
    model: str
    dataset: str
    recipe: str
    batch_size: int
    seed: int
    status: str
    epochs_done: int | None = None
    epochs: int | None = None
    job_id: str | None = None
    slurm_state: str | None = None
    error: str | None = None
    log: str | None = None
    resources: dict | None = None  # what the run asked SLURM for (from its manifest entry)
    # the time its array task was given and estimated (its manifest entry's: time_limit_s, estimated_s and
    # estimate_source)
    budget: dict | None = None
    # a running run, from its progress file: seconds trained (and of the epoch in progress), the latest test
    # accuracy, mean seconds an epoch, and seconds until it ends at that pace; a completed run's final test accuracy
    # and mean seconds an epoch, from its record
    elapsed_s: float | None = None
    test_acc: float | None = None
    epoch_s: float | None = None
    eta_s: float | None = None


# sacct may not list a job in the first seconds after sbatch returned
GRACE_S = 120


def fresh(record: dict | None, entry: dict) -> bool:
    """Pure: whether the record was written after the run's latest submission (else an earlier attempt's)."""
    return record is not None and record["ended_at"] >= datetime.fromisoformat(entry["submitted_at"])


def classify(
    *, record: dict | None, entry: dict | None, job_state: str | None, alive: bool | None, now: datetime | None = None
) -> str:
    """Pure: one run's status from its record, its latest manifest entry and its job's state."""
    if record and record["status"] == "completed":
        return "completed"
    if entry is None:
        return _ended(record) if record else "not submitted"
    submitted = datetime.fromisoformat(entry["submitted_at"])
    fresh_record = fresh(record, entry)
    if (
        record is not None
        and fresh_record
        and (entry.get("packed_with") or entry.get("fused_with"))
        and not (record["error"] or "").startswith(STOPPED)
    ):
        return _ended(record)  # its pack or fused group goes on with the other runs, and will not run it again
    if entry["executor"] == "local":
        if alive and not fresh_record:
            return "running" if job_state == "RUNNING" else "pending"
    elif job_state in queue.ACTIVE_STATES:
        return "running" if job_state in queue.RUNNING_STATES else "pending"
    if job_state and job_state.startswith("CANCELLED"):
        return "cancelled"
    waited = ((now or datetime.now(timezone.utc)) - submitted).total_seconds()
    if job_state is None and entry["executor"] == "slurm" and not fresh_record and waited < GRACE_S:
        return "pending"
    if record is not None and fresh_record:
        return _ended(record)
    return "failed" if record and entry["executor"] == "slurm" else "lost"


def _ended(record: dict) -> str:
    """A record's own word for its run: failed, or cancelled (the record says its process was sent SIGTERM)."""
    return records.run_state(record["status"], record.get("error"))


# SLURM's own lines (slurmstepd's, srun's) in a job's log when it killed the job for its memory: jobacct_gather's
# OverMemoryKill, where there are no cgroups ("StepId=12.0 exceeded memory limit (...), being killed", "Exceeded
# job memory limit"), and the kernel's OOM killer in a cgroup ("Detected 1 oom_kill event in StepId=12.0. Some of
# the step tasks have been OOM Killed.", "oom-kill event(s)" before SLURM 21.08; srun: "task 0: Out Of Memory").
_MEMORY_KILL = re.compile(r"exceeded (job |step )?memory limit|oom[-_]kill event|oom killed|: out of memory", re.I)
LOG_TAIL = 64 * 1024  # SLURM's lines come last: what is read of the end of a job's log


def memory_killed(job_state: str | None, log_tail: str) -> bool:
    """Pure: whether SLURM killed a job for exceeding its memory, from its state (sacct's OUT_OF_MEMORY: the OOM
    killer of a cgroup) or the end of its log (OverMemoryKill leaves the state at FAILED, and says so there)."""
    if job_state == "OUT_OF_MEMORY":
        return True
    lines = log_tail.splitlines()
    return any(line.startswith(("slurmstepd", "srun:")) and _MEMORY_KILL.search(line) for line in lines)


def memory_error(resources: dict | None) -> str:
    """Pure: the error of a run whose job SLURM killed for its memory, with what the job asked for (its manifest
    entry's resources: ``mem_gb`` None is the partition's default)."""
    gb = (resources or {}).get("mem_gb")
    asked = (
        f"asked {gb:g} GB: --mem={int(gb * 1024)}M" if gb is not None else "no --mem: the partition's default memory"
    )
    return (
        f"OutOfMemory: SLURM killed the job for exceeding its memory ({asked}); raise slurm.mem_gb, or use mem_gb: auto"
    )


def memory_record(entry: dict, *, epochs_done: int, now: datetime) -> dict:
    """Pure: the failed record of a run whose job SLURM killed for its memory, which no process of the job lived
    to write: the spec's columns, the error, how far it got, and the job (``entry["job_id"]``, "123_4")."""
    job, _, task = entry["job_id"].partition("_")
    return {
        **records.spec_fields(RunSpec.from_dict(entry["spec"])),
        "status": "failed",
        "error": memory_error(entry.get("resources")),
        "epochs_done": epochs_done,
        "started_at": now,
        "ended_at": now,
        "slurm_job_id": job,
        "slurm_array_task_id": task or None,
    }


def _described(spec: dict) -> dict:
    """The fields of a run that status shows, from its spec as a manifest stores it (``RunSpec.to_dict``)."""
    recipe = spec["recipe"]
    return {
        "model": spec["model"],
        "dataset": spec["dataset"],
        "recipe": recipe["name"],
        "batch_size": spec["batch_size"],
        "seed": spec["seed"],
        # a recipe counted in iterations has no epochs of its own (0): its run's spec says how many they take
        "epochs": spec.get("epochs") or recipe["epochs"] or RunSpec.from_dict(spec).schedule.epochs,
    }


# what status reads of each record's summary
FIELDS = ("run_id", "status", "ended_at", "epochs_done", "error", "train_seconds", "test_seconds", "final_test_acc")


def epoch_time(seconds: list[float]) -> float | None:
    """Mean seconds an epoch takes, the first left out where there are later ones (it also warms up, compiles)."""
    kept = seconds[1:] if len(seconds) > 1 else seconds
    return sum(kept) / len(kept) if kept else None


def progress_times(progress: dict, now: float) -> dict:
    """Pure: a running run's ``elapsed_s``, ``test_acc``, ``epoch_s`` and ``eta_s`` from its progress file (those
    it cannot tell are None): the epochs' seconds so far plus the time since the last one ended, and the epochs
    left at the mean pace, less the part of the current epoch already spent."""
    seconds = [float(x) for x in progress.get("epoch_seconds") or ()]
    updated = progress.get("updated_at")
    since = max(0.0, now - updated) if isinstance(updated, (int, float)) else 0.0
    per = epoch_time(seconds)
    left = max(0, int(progress.get("epochs", 0)) - int(progress.get("epochs_done", 0)))
    return {
        "elapsed_s": sum(seconds) + since if seconds or updated else None,
        "test_acc": progress.get("test_acc"),
        "epoch_s": per,
        "eta_s": None if per is None else max(0.0, left * per - since),
    }


def grid_eta(statuses: list[RunStatus]) -> dict | None:
    """Pure: when the runs still running or pending should all have ended, from the runs' progress and how many
    run at once. Each running run needs its own ETA; a pending one its epochs at the mean epoch time of the runs
    measured (running, or completed); that work is shared by as many runs as run now, or, while none does, by
    the arrays' parallelism (``%limit``). None when nothing is left or no epoch time is known."""
    active = [s for s in statuses if s.status in ("running", "pending")]
    measured = [s.epoch_s for s in statuses if s.epoch_s]
    if not active or not measured:
        return None
    mean = sum(measured) / len(measured)
    running = [s for s in active if s.status == "running"]
    work, epochs = 0.0, 0
    for s in active:
        left = max(0, (s.epochs or 0) - (s.epochs_done or 0))
        epochs += left
        work += s.eta_s if s.status == "running" and s.eta_s is not None else left * (s.epoch_s or mean)
    limit = sum(
        {(s.job_id or "").split("_")[0]: (s.resources or {}).get("array_parallelism") or 1 for s in active}.values()
    )
    slots = len(running) or min(limit, len(active)) or 1
    longest = max((s.eta_s or 0.0 for s in running), default=0.0)
    return {"eta_s": max(work / slots, longest), "run_epochs_left": epochs, "epoch_s": mean, "parallel": slots}


def collect_status(
    results: str | os.PathLike, specs: list[RunSpec] | None = None, *, summaries: dict[str, dict] | None = None
) -> list[RunStatus]:
    """Every run submitted to ``results`` (and, with ``specs``, every run of a grid, submitted or not).
    ``summaries``: the records' summaries (FIELDS at least) where the caller has read them already.

    A run whose SLURM job was killed for its memory left no record (nothing of the job outlived it): it gets its
    failed record here, the first time status sees it."""
    entries = read_manifests(results)
    described = {run_id: _described(e["spec"]) for run_id, e in entries.items()}
    for spec in specs or ():
        if spec.run_id not in described:
            described[spec.run_id] = {
                "model": spec.model,
                "dataset": spec.dataset,
                "recipe": spec.recipe.name,
                "batch_size": spec.batch_size,
                "seed": spec.seed,
                "epochs": spec.schedule.epochs,
            }
    slurm_jobs = {e["job_id"] for e in entries.values() if e["executor"] == "slurm"}
    with ThreadPoolExecutor(1) as pool:  # sacct answers while the records are read
        asked = pool.submit(queue.slurm_states, slurm_jobs)
        alive = {e["job_id"]: queue.local_alive(e["job_id"]) for e in entries.values() if e["executor"] == "local"}
        if summaries is None:
            summaries = scan.summaries(results, FIELDS)
        states = asked.result()
    try:  # one listing instead of a failed open per run that never started (most of a fresh grid)
        started = set(os.listdir(Layout(results).runs))
    except OSError:
        started = set()
    out = []
    now = time.time()
    tails: dict[str, str] = {}  # log -> its end: a pack's or fused group's runs share their job's log
    for run_id, desc in described.items():
        record = summaries.get(run_id)
        entry = entries.get(run_id)
        # a run requeued after a failed attempt trains again: its progress file says how far, not that record
        finished = record is not None and record["status"] == "completed"
        progress = None if finished or run_id not in started else read_progress(results, run_id)
        job_state = None
        if entry and entry["executor"] == "slurm":
            job_state = states.get(entry["job_id"])
        elif entry:
            job_state = "RUNNING" if alive.get(entry["job_id"]) and progress else None
        status = classify(
            record=record, entry=entry, job_state=job_state, alive=alive.get(entry["job_id"]) if entry else None
        )
        # only a SLURM job that ended without its run's record can have been killed for its memory; once its log
        # says so, the record written here tells every later status (which reads no log then), collect and
        # submit --retry-failed
        if entry and entry["executor"] == "slurm" and status in ("failed", "lost") and not fresh(record, entry):
            if entry["stderr"] not in tails:
                tails[entry["stderr"]] = _tail(entry["stderr"])
            if memory_killed(job_state, tails[entry["stderr"]]):
                record = _record_memory_kill(results, entry, progress)
                status = record["status"]
        training = progress is not None and status == "running"
        done = (progress or {}).get("epochs_done") if training or not record else record["epochs_done"]
        times = progress_times(progress, now) if training and progress else {}
        if record and record["status"] == "completed" and record.get("train_seconds") and record["epochs_done"]:
            times = {"epoch_s": (record["train_seconds"] + (record.get("test_seconds") or 0)) / record["epochs_done"]}
        if status == "completed":
            times["test_acc"] = record.get("final_test_acc") if record else None
        out.append(
            RunStatus(
                run_id=run_id,
                **desc,
                status=status,
                epochs_done=done,
                job_id=entry["job_id"] if entry else None,
                slurm_state=job_state,
                error=_error(record, entry, status),
                log=_log(entry, status),
                resources=entry.get("resources") if entry else None,
                budget=entry.get("budget") if entry else None,
                **times,
            )
        )
    return out


def _tail(log: str) -> str:
    """The last LOG_TAIL bytes of a job's log; empty where there is none."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _record_memory_kill(results: str | os.PathLike, entry: dict, progress: dict | None) -> dict:
    """Write the failed record of a run SLURM killed for its memory (``memory_record``) and return the run's record
    now: that one, or a completed one found in its place. A results folder this user cannot write keeps no record;
    status still says why."""
    existing, _ = records.read_summary(Layout(results).record(entry["run_id"]))
    if existing and existing["status"] == "completed":
        return existing
    row = memory_record(entry, epochs_done=(progress or {}).get("epochs_done") or 0, now=datetime.now(timezone.utc))
    with contextlib.suppress(OSError):
        records.write_record(row, results)
    return row


def _log(entry: dict | None, status: str) -> str | None:
    """The job's log, for a run that did not complete, where there is one."""
    if entry is None or status not in ("failed", "lost", "cancelled") or not os.path.exists(entry["stderr"]):
        return None
    return entry["stderr"]


def _error(record: dict | None, entry: dict | None, status: str) -> str | None:
    """Why a run did not complete: its record's error (a cancelled run's only where the record is its latest
    submission's, not an earlier attempt's), or that it never started."""
    if record and (status == "failed" or (status == "cancelled" and (entry is None or fresh(record, entry)))):
        return record["error"]
    return _never_started(entry, status)


def _never_started(entry: dict | None, status: str) -> str | None:
    if entry is not None and status in ("lost", "cancelled") and not os.path.exists(entry["stderr"]):
        return f"{status} before it started (no log was written)"
    return None


def no_runs(results: str | os.PathLike) -> str:
    """What ``status`` says, as an error (exit code 2, like collect's "no cifarbench records found"), of a results
    folder with no run to show: nothing submitted to it, and no grid given."""
    return (
        f"{results}: no submitted runs found (looked for submissions/<time>-<pid>.json); submit a grid first "
        "(cifarbench submit GRID), or give --grid GRID to list its runs"
    )


def state_map(
    results: str | os.PathLike, specs: list[RunSpec], *, summaries: dict[str, dict] | None = None
) -> dict[str, str]:
    return {s.run_id: s.status for s in collect_status(results, specs, summaries=summaries)}


def summary(statuses: list[RunStatus]) -> dict[str, int]:
    counts = {k: 0 for k in ORDER}
    for s in statuses:
        counts[s.status] += 1
    return {k: v for k, v in counts.items() if v}


def duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h05m``, ``2d04h``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _running(s: RunStatus) -> str | None:
    """A running run's times and latest test accuracy; a completed run's final test accuracy."""
    parts = [
        f"elapsed {duration(s.elapsed_s)}" if s.elapsed_s is not None else None,
        f"test acc {s.test_acc:.4f}" if s.test_acc is not None else None,
        f"ETA {duration(s.eta_s)} ({duration(s.epoch_s or 0)}/epoch)" if s.eta_s is not None else None,
    ]
    return ", ".join(p for p in parts if p) or None


def render(statuses: list[RunStatus]) -> str:
    lines = ["  ".join(f"{k}: {v}" for k, v in summary(statuses).items()) or "no runs", ""]
    eta = grid_eta(statuses)
    if eta:
        lines.insert(
            1,
            f"ETA of the runs left: about {duration(eta['eta_s'])} ({plural(eta['run_epochs_left'], 'run-epoch')} "
            f"at {duration(eta['epoch_s'])} each, {eta['parallel']} at a time)",
        )
    header = f"{'run id':<40} {'status':<13} {'epochs':>9} {'job':<12} detail"
    lines.append(header)
    for s in sorted(statuses, key=lambda s: (ORDER.index(s.status), s.run_id)):
        epochs = f"{s.epochs_done or 0}/{s.epochs}"
        live = _running(s) if s.status in ("running", "completed") else None
        detail = "; ".join(x for x in (live, s.error, f"log: {s.log}" if s.log else None) if x)
        lines.append(f"{s.run_id:<40} {s.status:<13} {epochs:>9} {s.job_id or '-':<12} {detail}".rstrip())
    return "\n".join(lines)


def as_json(statuses: list[RunStatus]) -> dict:
    return {"summary": summary(statuses), "eta": grid_eta(statuses), "runs": [asdict(s) for s in statuses]}


def wait(results: str | os.PathLike, specs: list[RunSpec], *, interval: float = 2.0, stream=None) -> list[RunStatus]:
    """Follow the runs until every one has ended, with a progress line (redrawn in place on a terminal) on
    ``stream``, by default the standard error of the moment (not of the moment this module was imported)."""
    stream = stream or sys.stderr
    interactive = stream.isatty()
    last = None
    wanted = {sp.run_id for sp in specs}
    while True:
        statuses = [s for s in collect_status(results, specs) if s.run_id in wanted]
        counts = summary(statuses)
        ended = sum(counts.get(k, 0) for k in ENDED)
        epochs_done = sum(s.epochs_done or 0 for s in statuses)
        epochs = sum(s.epochs or 0 for s in statuses)
        width = 30
        bar = "#" * (width * ended // max(len(statuses), 1))
        line = (
            f"[{bar:<{width}}] {ended}/{plural(len(statuses), 'run')} ended  done {counts.get('completed', 0)}  "
            f"failed {counts.get('failed', 0) + counts.get('lost', 0) + counts.get('cancelled', 0)}  "
            f"running {counts.get('running', 0)}  epochs {epochs_done}/{epochs}"
        )
        if interactive:
            print("\r" + line, end="", file=stream, flush=True)
        elif line != last:
            print(line, file=stream, flush=True)
        last = line
        if ended == len(statuses):
            if interactive:
                print(file=stream)
            return statuses
        time.sleep(interval)
