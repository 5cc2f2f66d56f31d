"""What became of every run: records, submission manifests and SLURM's job states, combined."""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from cifarbench.cluster import queue
from cifarbench.config.resources import STOPPED
from cifarbench.config.spec import RunSpec
from cifarbench.errors import plural
from cifarbench.store import scan
from cifarbench.store.manifests import read_manifests
from cifarbench.store.progress import read_progress

ORDER = ("completed", "running", "pending", "failed", "cancelled", "lost", "not submitted")
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


# sacct may not list a job in the first seconds after sbatch returned
GRACE_S = 120


def classify(
    *, record: dict | None, entry: dict | None, job_state: str | None, alive: bool | None, now: datetime | None = None
) -> str:
    """Pure: one run's status from its record, its latest manifest entry and its job's state."""
    if record and record["status"] == "completed":
        return "completed"
    if entry is None:
        return "failed" if record else "not submitted"
    submitted = datetime.fromisoformat(entry["submitted_at"])
    fresh_record = record is not None and record["ended_at"] >= submitted
    if (
        record is not None
        and fresh_record
        and entry.get("packed_with")
        and not (record["error"] or "").startswith(STOPPED)
    ):
        return "failed"  # its packed task goes on with the other runs, and will not run it again
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
    return "failed" if fresh_record or (record and entry["executor"] == "slurm") else "lost"


def _described(spec: dict) -> dict:
    """The fields of a run that status shows, from its spec as a manifest stores it (``RunSpec.to_dict``)."""
    recipe = spec["recipe"]
    return {
        "model": spec["model"],
        "dataset": spec["dataset"],
        "recipe": recipe["name"],
        "batch_size": spec["batch_size"],
        "seed": spec["seed"],
        "epochs": spec.get("epochs") or recipe["epochs"],
    }


# what status reads of each record's summary
FIELDS = ("run_id", "status", "ended_at", "epochs_done", "error")


def collect_status(
    results: str | os.PathLike, specs: list[RunSpec] | None = None, *, summaries: dict[str, dict] | None = None
) -> list[RunStatus]:
    """Every run submitted to ``results`` (and, with ``specs``, every run of a grid, submitted or not).
    ``summaries``: the records' summaries (FIELDS at least) where the caller has read them already."""
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
    out = []
    for run_id, desc in described.items():
        record = summaries.get(run_id)
        entry = entries.get(run_id)
        progress = None if record else read_progress(results, run_id)
        job_state = None
        if entry and entry["executor"] == "slurm":
            job_state = states.get(entry["job_id"])
        elif entry:
            job_state = "RUNNING" if alive.get(entry["job_id"]) and progress else None
        status = classify(
            record=record, entry=entry, job_state=job_state, alive=alive.get(entry["job_id"]) if entry else None
        )
        done = record["epochs_done"] if record else (progress or {}).get("epochs_done")
        out.append(
            RunStatus(
                run_id=run_id,
                **desc,
                status=status,
                epochs_done=done,
                job_id=entry["job_id"] if entry else None,
                slurm_state=job_state,
                error=record["error"] if record and status == "failed" else _never_started(entry, status),
                log=_log(entry, status),
                resources=entry.get("resources") if entry else None,
            )
        )
    return out


def _log(entry: dict | None, status: str) -> str | None:
    """The job's log, for a run that did not complete, where there is one."""
    if entry is None or status not in ("failed", "lost", "cancelled") or not os.path.exists(entry["stderr"]):
        return None
    return entry["stderr"]


def _never_started(entry: dict | None, status: str) -> str | None:
    if entry is not None and status in ("lost", "cancelled") and not os.path.exists(entry["stderr"]):
        return f"{status} before it started (no log was written)"
    return None


def state_map(
    results: str | os.PathLike, specs: list[RunSpec], *, summaries: dict[str, dict] | None = None
) -> dict[str, str]:
    return {s.run_id: s.status for s in collect_status(results, specs, summaries=summaries)}


def summary(statuses: list[RunStatus]) -> dict[str, int]:
    counts = {k: 0 for k in ORDER}
    for s in statuses:
        counts[s.status] += 1
    return {k: v for k, v in counts.items() if v}


def render(statuses: list[RunStatus]) -> str:
    lines = ["  ".join(f"{k}: {v}" for k, v in summary(statuses).items()) or "no runs", ""]
    header = f"{'run id':<40} {'status':<13} {'epochs':>9} {'job':<12} detail"
    lines.append(header)
    for s in sorted(statuses, key=lambda s: (ORDER.index(s.status), s.run_id)):
        epochs = f"{s.epochs_done or 0}/{s.epochs}"
        detail = "; ".join(x for x in (s.error, f"log: {s.log}" if s.log else None) if x)
        lines.append(f"{s.run_id:<40} {s.status:<13} {epochs:>9} {s.job_id or '-':<12} {detail}".rstrip())
    return "\n".join(lines)


def as_json(statuses: list[RunStatus]) -> dict:
    return {"summary": summary(statuses), "runs": [asdict(s) for s in statuses]}


def wait(
    results: str | os.PathLike, specs: list[RunSpec], *, interval: float = 2.0, stream=sys.stderr
) -> list[RunStatus]:
    """Follow the runs until every one has ended, with a progress line (redrawn in place on a terminal)."""
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
