"""The only place that talks to submitit and SLURM: job arrays, the submission manifest, job states.

A submission writes ``<results>/submissions/<time>-<n>.json`` mapping every run id to its job id, array index and
log files; ``status`` reads those manifests back and asks SLURM (one ``sacct`` call for all arrays) what
became of each job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError

from cifarbench.errors import UsageError
from cifarbench.job import RunJob, RunSequence
from cifarbench.spec import Resources, RunSpec

# SLURM sends USR2 this long before the time limit: enough to finish writing an epoch's checkpoint.
SIGNAL_DELAY_S = 60
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING", "PREEMPTED"}


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What a submission would do: the runs to submit and those skipped, with why."""

    submit: tuple[RunSpec, ...]
    skipped_completed: tuple[RunSpec, ...]
    skipped_active: tuple[RunSpec, ...]
    skipped_other: tuple[RunSpec, ...]  # --retry-failed: runs that never failed or were never submitted


def plan(specs, states: dict[str, str], *, force: bool = False, retry_failed: bool = False) -> Plan:
    """Pure: ``states`` maps run id -> status (completed, failed, lost, cancelled, pending, running, ...)."""
    buckets = {"submit": [], "completed": [], "active": [], "other": []}
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
    return Plan(submit=tuple(buckets["submit"]), skipped_completed=tuple(buckets["completed"]),
                skipped_active=tuple(buckets["active"]), skipped_other=tuple(buckets["other"]))


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            return int(value.strip())
    return 1001  # SLURM's default


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


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
        raise UsageError(f"results folder {folder} is not writable ({e.strerror}); fix its permissions or "
                         "choose another with `results:`") from None
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
        name="cifarbench", timeout_min=resources.timeout_min, gpus_per_node=resources.gpus_per_node,
        cpus_per_task=resources.cpus_per_task, mem_gb=resources.mem_gb, tasks_per_node=1, nodes=1,
        slurm_partition=resources.partition, slurm_constraint=resources.constraint,
        slurm_array_parallelism=resources.array_parallelism, slurm_signal_delay_s=SIGNAL_DELAY_S,
        slurm_setup=list(resources.setup), slurm_additional_parameters=extra or None,
    )
    return executor


def local_devices() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def submit(specs: list[RunSpec], resources: Resources, results: str | os.PathLike, *, executor: str = "auto",
           grid_source: str | None = None) -> dict:
    """Queue ``specs`` and return the manifest (also written under ``results/submissions/``). Never waits."""
    results = Path(results)
    check_results_writable(results)
    kind = ("slurm" if slurm_available() else "local") if executor == "auto" else executor
    if kind == "slurm" and not slurm_available():
        raise UsageError("--executor slurm: sbatch is not on the PATH; use --executor local")
    logs = results / "logs"
    entries = []
    if kind == "slurm":
        ex = _slurm_executor(resources, logs / "%j")
        for chunk in chunks(specs, max_array_size()):
            try:
                with ex.batch():
                    jobs = [ex.submit(RunJob(spec)) for spec in chunk]
            except (FailedJobError, OSError) as e:
                done = f" ({len(entries)} runs were queued before; their manifest is written)" if entries else ""
                _write_manifest(results, "slurm", grid_source, entries)
                raise UsageError(f"sbatch failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}{done}; "
                                 "is the cluster up (sinfo)? Without SLURM use --executor local") from None
            for index, (spec, job) in enumerate(zip(chunk, jobs)):
                entries.append({"run_id": spec.run_id, "job_id": job.job_id, "array_job_id": job.job_id.split("_")[0],
                                "array_index": index, "stdout": str(job.paths.stdout).replace("%t", "0"),
                                "stderr": str(job.paths.stderr).replace("%t", "0"), "spec": spec.to_dict()})
    else:
        # One sequence of runs per device keeps a CPU-only machine to one training run at a time.
        ex = submitit.AutoExecutor(folder=logs / "local", cluster="local")
        ex.update_parameters(timeout_min=max(resources.timeout_min * len(specs), 60), gpus_per_node=1)
        n = min(local_devices(), len(specs))
        for device, share in enumerate(specs[d::n] for d in range(n)):
            job = ex.submit(RunSequence(list(share)))
            for index, spec in enumerate(share):
                entries.append({"run_id": spec.run_id, "job_id": job.job_id, "array_job_id": job.job_id,
                                "array_index": index, "stdout": str(job.paths.stdout),
                                "stderr": str(job.paths.stderr), "spec": spec.to_dict()})
    return _write_manifest(results, kind, grid_source, entries)


def _write_manifest(results: Path, kind: str, grid_source: str | None, entries: list[dict]) -> dict:
    manifest = {"submitted_at": datetime.now(timezone.utc).isoformat(), "executor": kind, "grid": grid_source,
                "results": str(results), "runs": entries}
    if not entries:
        return manifest
    folder = results / "submissions"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    path = folder / f"{stamp}-{os.getpid()}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    manifest["path"] = str(path)
    return manifest


def read_manifests(results: str | os.PathLike) -> dict[str, dict]:
    """run id -> its latest manifest entry (with the executor), over every submission to ``results``."""
    latest = {}
    for path in sorted((Path(results) / "submissions").glob("*.json")):
        try:
            manifest = json.loads(path.read_text())
            for entry in manifest["runs"]:
                latest[entry["run_id"]] = {**entry, "executor": manifest["executor"], "manifest": str(path),
                                           "submitted_at": manifest["submitted_at"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a manifest being written or damaged: its runs show as lost or not submitted
    return latest


def slurm_states(job_ids: set[str]) -> dict[str, str]:
    """job id ("123_4") -> SLURM state, from one ``sacct`` call for all arrays; ``squeue`` if accounting is off."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    states: dict[str, str] = {}
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)],
                         capture_output=True, text=True, timeout=60)
    accounted = out.returncode == 0
    if not accounted:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)
    for line in out.stdout.splitlines():
        job, _, state = line.partition("|")
        state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> "CANCELLED"
        for one in _expand(job):
            states[one] = state
    if accounted:
        states.update(_cancelled_before_start(job_ids, states))
    return states


def _cancelled_before_start(job_ids: set[str], states: dict[str, str]) -> dict[str, str]:
    """SLURM keeps no record of an array task cancelled while pending: it just drops out of the array's pending
    line in sacct. A task that starts is missing from sacct for a second too, but squeue shows it then."""
    listed = {j.split("_")[0] for j in states}
    missing = {j for j in job_ids if "_" in j and j not in states and j.split("_")[0] in listed}
    if not missing:
        return {}
    # all jobs, not -j: squeue refuses a list of ids that have all left the queue
    queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=60)
    if queue.returncode != 0:
        return {}
    return {j: "CANCELLED" for j in missing - set(queue.stdout.split())}


def _expand(job: str) -> list[str]:
    """sacct shows array tasks that have not started yet as one line: "12_[3-5,7%2]" -> 12_3, 12_4, 12_5, 12_7."""
    m = re.fullmatch(r"(\d+)_\[([^\]%]+)(?:%\d+)?\]", job)
    if not m:
        return [job]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def local_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    # a finished controller that nobody reaped yet is a zombie: not alive
    try:
        return Path(f"/proc/{int(job_id)}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True
