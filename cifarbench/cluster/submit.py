"""Submitting runs: the plan (what to submit, what to skip), then submitit job arrays on SLURM (one sbatch call
per array chunk) or local jobs, and the submission manifest that maps every run to its job.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterable
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, JobPaths

from cifarbench.cluster import queue
from cifarbench.cluster.environment import find_runtime, python_command
from cifarbench.cluster.plan import Task, arrays, check_local, chunks, local_cpus, local_devices
from cifarbench.config.resources import Budget, Resources
from cifarbench.config.spec import RunSpec
from cifarbench.errors import UsageError, plural
from cifarbench.store.atomic import check_results_writable
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import write_manifest
from cifarbench.system import local_gpus, usable_cores
from cifarbench.train.job import FusedJob, RunJob, TaskSequence
from cifarbench.train.pack import PackJob

# SLURM sends USR2 this long before the time limit: enough to finish writing an epoch's checkpoint.
SIGNAL_DELAY_S = 60


def _python(resources: Resources, binds: Iterable[str]) -> str | None:
    """The command that runs Python in the jobs of ``resources`` (``cluster.environment``); None: this interpreter."""
    try:
        return python_command(resources, binds=binds, runtime=find_runtime(resources))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _binds(tasks: list[Task]) -> list[str]:
    """What a container must see of the host: each run's results folder and data root, as absolute paths."""
    paths = dict.fromkeys(p for task in tasks for spec in task.specs for p in (spec.results, spec.data_root))
    return [os.path.abspath(p) for p in paths]


def _slurm_executor(resources: Resources, folder: Path, *, binds: Iterable[str] = ()) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(
        folder=folder,
        cluster="slurm",
        slurm_max_num_timeout=resources.max_requeues,
        slurm_python=_python(resources, binds),
    )
    extra = {key.replace("-", "_"): value for key, value in resources.extra}
    if resources.account:
        extra["account"] = resources.account
    if resources.qos:
        extra["qos"] = resources.qos
    if resources.exclusive:  # a whole node; --mem=0 is all of its memory, where the grid does not say how much
        extra |= {"exclusive": True} | ({"mem": "0"} if resources.mem_gb is None else {})
    if resources.gpu_type:  # a GPU type is a GRES request: --gpus-per-node takes a count only in submitit
        gpus: dict = {"slurm_gres": f"gpu:{resources.gpu_type}:{resources.gpus_per_node}"}
    else:
        gpus = {"gpus_per_node": resources.gpus_per_node}
    executor.update_parameters(
        name="cifarbench",
        timeout_min=resources.timeout_min,
        **gpus,
        cpus_per_task=resources.cpus_per_task,
        mem_gb=resources.mem_gb,
        # a run of several processes: submitit's srun starts the callable once per task, and SLURM's environment
        # tells each its rank (Lightning reads it)
        tasks_per_node=resources.tasks_per_node,
        nodes=resources.nodes,
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


_ID = "@JOB_ID@"


def _entry(spec: RunSpec, job, index: int, task: Task, *, array: bool, logs: tuple[str, str]) -> dict:
    """A manifest entry. ``logs``: the job's stdout and stderr paths with _ID for the job id (submitit's own
    path objects cost more than the rest of a 5,000-run submission put together)."""
    company = [s.run_id for s in task.specs if s is not spec]
    shared = {"fused_with": company} if task.fused else {"pack_size": len(task.specs), "packed_with": company}
    return {
        "run_id": spec.run_id,
        "job_id": job.job_id,
        "array_job_id": job.job_id.split("_")[0] if array else job.job_id,
        "array_index": index,
        "stdout": logs[0].replace(_ID, job.job_id),
        "stderr": logs[1].replace(_ID, job.job_id),
        "spec": spec.to_dict(),
        "resources": _as_dict(task.resources),
        "budget": _as_dict(task.budget),
    } | (shared if len(task.specs) > 1 else {})


@functools.lru_cache(maxsize=1024)
def _as_dict(value: Resources | Budget) -> dict:
    """``value.to_dict()``, made once per distinct value: thousands of runs share a handful (the manifest is
    written from these dicts and never changes them)."""
    return value.to_dict()


def _log_paths(folder: Path) -> tuple[str, str]:
    paths = JobPaths(folder, job_id=_ID, task_id=0)
    return str(paths.stdout), str(paths.stderr)


def submit(
    tasks: list[Task],
    results: str | os.PathLike,
    *,
    executor: str = "auto",
    grid_source: str | None = None,
) -> dict:
    """Queue the array tasks, one job array per set of equal resources (chunked by MaxArraySize, one sbatch call
    per chunk), and return the manifest (also written under ``results/submissions/``). Never waits. Every run of a
    task (a pack, a fused group) has its manifest entry with that task's job."""
    results = Path(results)
    layout = Layout(results)
    check_results_writable(results)
    kind = ("slurm" if queue.slurm_available() else "local") if executor == "auto" else executor
    if kind == "slurm" and not queue.slurm_available():
        raise UsageError("--executor slurm: sbatch is not on the PATH; use --executor local")
    entries: list[dict] = []
    binds = _binds(tasks)
    if kind == "slurm":
        size = queue.max_array_size()
        for resources, members in arrays(tasks).items():
            ex = _slurm_executor(resources, layout.slurm_logs, binds=binds)
            for chunk in chunks(members, size):  # a run, a pack or a fused group each
                jobs = _submit_chunk(ex, [_job(task) for task in chunk], results, grid_source, entries)
                logs = _log_paths(layout.slurm_logs)
                entries += [
                    _entry(spec, job, i, task, array=True, logs=logs)
                    for i, (task, job) in enumerate(zip(chunk, jobs))
                    for spec in task.specs
                ]
    else:
        for resources in {task.resources for task in tasks}:
            try:
                check_local(resources)
            except ValueError as e:
                raise UsageError(str(e)) from None
        # One sequence of runs (or of packs) per device keeps a CPU-only machine to one training task at a time.
        pythons = {_python(resources, binds) for resources in {task.resources for task in tasks}}
        if len(pythons) > 1:
            raise UsageError(
                "--executor local runs every run in one environment, but python: or container: differ between "
                "the runs; submit them as separate grids"
            )
        ex = submitit.AutoExecutor(folder=layout.local_logs, cluster="local", local_python=next(iter(pythons), None))
        gpus = local_gpus()  # may ask nvidia-smi: once
        whole = any(task.resources.exclusive for task in tasks)  # a task of the whole machine: one at a time
        n = local_devices(gpus, len(tasks), whole=whole)
        cpus = local_cpus(gpus, usable_cores(), len(tasks), whole=whole)
        for share in (tasks[d::n] for d in range(n)):
            minutes = sum(task.resources.timeout_min for task in share)
            ex.update_parameters(timeout_min=max(minutes, 60), gpus_per_node=gpus if whole else 1)
            job = ex.submit(TaskSequence([_job(task, cpus=cpus) for task in share]))
            logs = _log_paths(layout.local_logs)
            placed = [(task, spec) for task in share for spec in task.specs]
            entries += [_entry(spec, job, i, task, array=False, logs=logs) for i, (task, spec) in enumerate(placed)]
    return write_manifest(results, kind, grid_source, entries)


def _job(task: Task, *, cpus: int | None = None) -> RunJob | FusedJob | PackJob:
    """What one array task runs: a run as before, a fused group, or a pack of runs trained concurrently."""
    specs, r, budget = list(task.specs), task.resources, task.budget
    if task.fused:
        return FusedJob(specs, [budget] * len(specs))
    if r.pack == 1:
        return RunJob(specs[0], budget)
    return PackJob(specs, [budget] * len(specs), pack=r.runs_per_task, mps=r.mps, cpus=cpus)


def _submit_chunk(ex, chunk: list, results: Path, grid_source: str | None, entries: list[dict]) -> list:
    """One sbatch call for ``chunk``, the callables of its array tasks (a run, a pack or a fused group each). When
    sbatch refuses, the runs queued before (``entries``) keep their manifest, the files submitit wrote for this
    chunk (the job script, one pickle per task) are removed, and the error is one line."""
    logs = Layout(results).logs
    before = set(os.listdir(logs)) if logs.is_dir() else None
    try:
        # submitit prints sbatch's complaint before it raises it: the error below says it once, in one line
        with contextlib.redirect_stderr(io.StringIO()), ex.batch():
            return [ex.submit(task) for task in chunk]
    except (FailedJobError, OSError) as e:
        with contextlib.suppress(OSError):
            for name in set(os.listdir(logs)) - (before or set()):
                (logs / name).unlink()
            if before is None:  # made for this submission, which queued nothing
                logs.rmdir()
        write_manifest(results, "slurm", grid_source, entries)
        done = f" (already queued, and in the manifest: {plural(len(entries), 'run')})" if entries else ""
        raise UsageError(refusal(str(e)) + done) from None


def probe_executor(resources: Resources, folder: Path, kind: str, *, binds: Iterable[str]) -> submitit.AutoExecutor:
    """The executor of one probe job (``cifarbench.cluster.probe``): on SLURM with ``resources`` as a run's task
    would have them, else a local job; in the runs' environment either way (``binds``: as for their jobs)."""
    binds = [os.path.abspath(p) for p in binds]
    if kind == "slurm":
        return _slurm_executor(resources, folder, binds=binds)
    ex = submitit.AutoExecutor(folder=folder, cluster="local", local_python=_python(resources, binds))
    ex.update_parameters(timeout_min=resources.timeout_min)
    return ex
