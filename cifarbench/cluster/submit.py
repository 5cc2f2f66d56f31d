"""Submitting runs: the plan (what to submit, what to skip), then submitit job arrays on SLURM (one sbatch call
per array chunk) or local jobs, and the submission manifest that maps every run to its job.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError

from cifarbench.cluster import queue
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec
from cifarbench.errors import UsageError
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


def submit(
    specs: list[RunSpec],
    resources: Resources,
    results: str | os.PathLike,
    *,
    executor: str = "auto",
    grid_source: str | None = None,
) -> dict:
    """Queue ``specs`` and return the manifest (also written under ``results/submissions/``). Never waits."""
    results = Path(results)
    layout = Layout(results)
    check_results_writable(results)
    kind = ("slurm" if queue.slurm_available() else "local") if executor == "auto" else executor
    if kind == "slurm" and not queue.slurm_available():
        raise UsageError("--executor slurm: sbatch is not on the PATH; use --executor local")
    entries: list[dict] = []
    if kind == "slurm":
        ex = _slurm_executor(resources, layout.slurm_logs)
        for chunk in chunks(specs, queue.max_array_size()):
            try:
                with ex.batch():
                    jobs = [ex.submit(RunJob(spec)) for spec in chunk]
            except (FailedJobError, OSError) as e:
                done = f" ({len(entries)} runs were queued before; their manifest is written)" if entries else ""
                write_manifest(results, "slurm", grid_source, entries)
                raise UsageError(
                    f"sbatch failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}{done}; "
                    "is the cluster up (sinfo)? Without SLURM use --executor local"
                ) from None
            for index, (spec, job) in enumerate(zip(chunk, jobs)):
                entries.append(
                    {
                        "run_id": spec.run_id,
                        "job_id": job.job_id,
                        "array_job_id": job.job_id.split("_")[0],
                        "array_index": index,
                        "stdout": str(job.paths.stdout).replace("%t", "0"),
                        "stderr": str(job.paths.stderr).replace("%t", "0"),
                        "spec": spec.to_dict(),
                    }
                )
    else:
        # One sequence of runs per device keeps a CPU-only machine to one training run at a time.
        ex = submitit.AutoExecutor(folder=layout.local_logs, cluster="local")
        ex.update_parameters(timeout_min=max(resources.timeout_min * len(specs), 60), gpus_per_node=1)
        n = min(max(local_gpus(), 1), len(specs))
        for share in (specs[d::n] for d in range(n)):
            # `job` is typed Job[str] by the SLURM branch; this one returns list[str], and only its ids and paths
            # are read below
            job = ex.submit(RunSequence(list(share)))  # type: ignore[arg-type]
            for index, spec in enumerate(share):
                entries.append(
                    {
                        "run_id": spec.run_id,
                        "job_id": job.job_id,
                        "array_job_id": job.job_id,
                        "array_index": index,
                        "stdout": str(job.paths.stdout),
                        "stderr": str(job.paths.stderr),
                        "spec": spec.to_dict(),
                    }
                )
    return write_manifest(results, kind, grid_source, entries)
