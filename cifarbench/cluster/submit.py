"""Submitting runs: the plan (what to submit, what to skip), then submitit job arrays on SLURM (one sbatch call
per array chunk) or local jobs, and the submission manifest that maps every run to its job.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError

from cifarbench.cluster import queue
from cifarbench.cluster.estimate import Planned
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec
from cifarbench.errors import UsageError, plural
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import write_manifest
from cifarbench.system import local_gpus
from cifarbench.train.job import RunJob, RunSequence

# SLURM sends USR2 this long before the time limit: enough to finish writing an epoch's checkpoint.
SIGNAL_DELAY_S = 60


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a submission would do: the runs to submit and those skipped, with why."""

    submit: tuple[RunSpec, ...]
    skipped_completed: tuple[RunSpec, ...]
    skipped_active: tuple[RunSpec, ...]
    skipped_other: tuple[RunSpec, ...]  # --retry-failed: runs that never failed or were never submitted


def plan(specs, states: dict[str, str], *, force: bool = False, retry_failed: bool = False) -> Plan:
    """Pure: ``states`` maps run id -> status (completed, failed, lost, cancelled, pending, running, ...)."""
    buckets: dict[str, list[RunSpec]] = {"submit": [], "completed": [], "active": [], "other": []}
    for spec in specs:
        state = states.get(spec.run_id, "not submitted")
        if state in ("pending", "running"):
            buckets["active"].append(spec)
        elif state == "completed" and not force:
            buckets["completed"].append(spec)
        elif retry_failed and not force and state not in ("failed", "lost", "cancelled"):
            buckets["other"].append(spec)
        else:
            buckets["submit"].append(spec)
    return Plan(
        submit=tuple(buckets["submit"]),
        skipped_completed=tuple(buckets["completed"]),
        skipped_active=tuple(buckets["active"]),
        skipped_other=tuple(buckets["other"]),
    )


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def check_results_writable(results: str | os.PathLike, *, min_free_mb: int = 100) -> None:
    """Refuse to submit when no record could be written: unwritable folder or (nearly) full disk."""
    folder = Path(results)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"results folder {folder} is a file; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(
            f"results folder {folder} is not writable ({e.strerror}); fix its permissions or "
            "choose another with `results:`"
        ) from None
    free_mb = shutil.disk_usage(folder).free // 2**20
    if free_mb < min_free_mb:
        raise UsageError(f"results folder {folder} has only {free_mb} MB free; records and checkpoints need more")


def _slurm_executor(resources: Resources, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=resources.max_requeues)
    extra = {key.replace("-", "_"): value for key, value in resources.extra}
    if resources.account:
        extra["account"] = resources.account
    if resources.qos:
        extra["qos"] = resources.qos
    executor.update_parameters(
        name="cifarbench",
        timeout_min=resources.timeout_min,
        gpus_per_node=resources.gpus_per_node,
        cpus_per_task=resources.cpus_per_task,
        mem_gb=resources.mem_gb,
        tasks_per_node=1,
        nodes=1,
        slurm_partition=resources.partition,
        slurm_constraint=resources.constraint,
        slurm_array_parallelism=resources.array_parallelism,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
        slurm_setup=list(resources.setup),
        slurm_additional_parameters=extra or None,
    )
    return executor


# What SLURM says when sbatch refuses, and the hint that fits it.
_HINTS = (
    ("invalid partition", "`sinfo -s` lists the partitions; set slurm.partition"),
    ("invalid account", "`sacctmgr show assoc user=$USER` lists your accounts; set slurm.account"),
    ("invalid qos", "`sacctmgr show assoc user=$USER` lists your QOS; set slurm.qos"),
    ("time limit", "the partition's MaxTime (`scontrol show partition`) caps it; lower slurm.time or use time: auto"),
    ("node configuration is not available", "no node has that many GPUs, CPUs or that much memory (`sinfo -N -l`)"),
    ("unable to contact slurm controller", "is the cluster up (`sinfo`)? Without SLURM use --executor local"),
    ("memory specification", "no node has that much memory; lower slurm.mem_gb"),
    ("gres", "no node offers those GPUs; check slurm.gpus_per_node and the partition"),
)


def refusal(error: str) -> str:
    """Pure: sbatch's reason in one line, with the hint that fits it (none when nothing does)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    said = [line for line in lines if "error" in line.lower()] or lines or ["no reason given"]
    reason = said[-1].removeprefix("sbatch: error: ")
    hint = next((h for key, h in _HINTS if key in error.lower()), None)
    return f"sbatch refused the job: {reason}" + (f"; {hint}" if hint else "")


def _entry(spec: RunSpec, job, index: int, planned: Planned, *, array: bool) -> dict:
    return {
        "run_id": spec.run_id,
        "job_id": job.job_id,
        "array_job_id": job.job_id.split("_")[0] if array else job.job_id,
        "array_index": index,
        "stdout": str(job.paths.stdout).replace("%t", "0"),
        "stderr": str(job.paths.stderr).replace("%t", "0"),
        "spec": spec.to_dict(),
        "resources": planned.resources.to_dict(),
        "budget": planned.budget.to_dict(),
    }


def groups(planned: list[Planned]) -> dict[Resources, list[Planned]]:
    """Pure: the runs by the resources they ask for, in the order they first appear: one job array each."""
    out: dict[Resources, list[Planned]] = {}
    for p in planned:
        out.setdefault(p.resources, []).append(p)
    return out


def submit(
    planned: list[Planned],
    results: str | os.PathLike,
    *,
    executor: str = "auto",
    grid_source: str | None = None,
) -> dict:
    """Queue the runs, one job array per group of equal resources (chunked by MaxArraySize, one sbatch call per
    chunk), and return the manifest (also written under ``results/submissions/``). Never waits."""
    results = Path(results)
    layout = Layout(results)
    check_results_writable(results)
    kind = ("slurm" if queue.slurm_available() else "local") if executor == "auto" else executor
    if kind == "slurm" and not queue.slurm_available():
        raise UsageError("--executor slurm: sbatch is not on the PATH; use --executor local")
    entries: list[dict] = []
    if kind == "slurm":
        size = queue.max_array_size()
        for resources, members in groups(planned).items():
            ex = _slurm_executor(resources, layout.slurm_logs)
            for chunk in chunks(members, size):
                jobs = _submit_chunk(ex, chunk, results, grid_source, entries)
                entries += [_entry(p.spec, job, i, p, array=True) for i, (p, job) in enumerate(zip(chunk, jobs))]
    else:
        # One sequence of runs per device keeps a CPU-only machine to one training run at a time.
        ex = submitit.AutoExecutor(folder=layout.local_logs, cluster="local")
        n = min(max(local_gpus(), 1), len(planned))
        for share in (planned[d::n] for d in range(n)):
            minutes = sum(p.resources.timeout_min for p in share)
            ex.update_parameters(timeout_min=max(minutes, 60), gpus_per_node=1)
            job = ex.submit(RunSequence([p.spec for p in share], [p.budget for p in share]))
            entries += [_entry(p.spec, job, i, p, array=False) for i, p in enumerate(share)]
    return write_manifest(results, kind, grid_source, entries)


def _submit_chunk(ex, chunk: list[Planned], results: Path, grid_source: str | None, entries: list[dict]) -> list:
    """One sbatch call for ``chunk``. When sbatch refuses, the runs queued before (``entries``) keep their
    manifest, the files submitit wrote for this chunk (the job script, one pickle per run) are removed, and the
    error is one line."""
    logs = Layout(results).logs
    before = set(os.listdir(logs)) if logs.is_dir() else None
    try:
        # submitit prints sbatch's complaint before it raises it: the error below says it once, in one line
        with contextlib.redirect_stderr(io.StringIO()), ex.batch():
            return [ex.submit(RunJob(p.spec, p.budget)) for p in chunk]
    except (FailedJobError, OSError) as e:
        with contextlib.suppress(OSError):
            for name in set(os.listdir(logs)) - (before or set()):
                (logs / name).unlink()
            if before is None:  # made for this submission, which queued nothing
                logs.rmdir()
        write_manifest(results, "slurm", grid_source, entries)
        done = f" (already queued, and in the manifest: {plural(len(entries), 'run')})" if entries else ""
        raise UsageError(refusal(str(e)) + done) from None


def _hours(planned: list[Planned], seconds) -> tuple[float, str]:
    """Device-hours of ``planned`` (all of one group): GPU-hours, or CPU core-hours where no GPU is asked for."""
    r = planned[0].resources
    per = r.gpus_per_node or r.cpus_per_task
    return sum(seconds(p) for p in planned) * per / 3600, "GPU-h" if r.gpus_per_node else "CPU-core-h"


def describe(planned: list[Planned], *, max_array_size: int) -> list[str]:
    """Pure: a line per group of equal resources (runs, resources, estimated and reserved hours, where the
    estimates came from), then the total; and a warning per group whose ``time: auto`` limit the partition's
    MaxTime cut."""
    lines: list[str] = []
    totals: dict[str, float] = {}
    arrays = 0
    for i, (r, members) in enumerate(groups(planned).items(), 1):
        estimated, unit = _hours(members, lambda p: p.estimate.seconds)
        reserved, _ = _hours(members, lambda p: p.budget.time_limit_s or 0)
        sources: dict[str, int] = {}
        for p in members:
            sources[p.estimate.source] = sources.get(p.estimate.source, 0) + 1
        mem = f"{r.mem_gb:g} GB" if r.mem_gb is not None else "default memory"
        auto = " (auto)" if members[0].auto else ""
        n_arrays = -(-len(members) // max_array_size)
        arrays += n_arrays
        lines.append(
            f"group {i}: {plural(len(members), 'run')}, {plural(r.gpus_per_node, 'GPU')}, "
            f"{plural(r.cpus_per_task, 'CPU')}, {mem}, time {r.time}{auto}, partition {r.partition or '(default)'}"
            + (f", constraint {r.constraint}" if r.constraint else "")
            + f"; {plural(n_arrays, 'array')}; estimated {estimated:.1f} {unit}, reserved "
            f"{reserved:.1f} {unit}; estimates: " + ", ".join(f"{n} from {src}" for src, n in sources.items())
        )
        if any(p.capped for p in members):
            lines.append(
                f"  warning: group {i}'s runs are estimated to need more than the partition's MaxTime; they are "
                f"limited to {r.time} and carried across limits by requeue and resume"
            )
        for key, value in ((f"estimated {unit}", estimated), (f"reserved {unit}", reserved)):
            totals[key] = totals.get(key, 0.0) + value
    hours = ", ".join(f"{k} {v:.1f}" for k, v in totals.items())
    groups_n = len(groups(planned))
    lines.append(
        f"total: {plural(len(planned), 'run')} in {plural(groups_n, 'group')}, {plural(arrays, 'array')}; {hours}"
    )
    return lines
