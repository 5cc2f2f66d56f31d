"""Probing the compute nodes before a grid is queued: one short job per distinct environment and partition of
the grid's array tasks, run with the grid's own ``setup:``, ``python:``/``container:``, account, QOS and kind of
GPU, that reports what the runs would find there (``cifarbench.train.probe.node_report``): the interpreter, the
training stack's versions, the GPU, and whether the data and the results folder are visible and writable.

A wrong environment otherwise fails every array task after hours in the queue; a probe fails in minutes. The
choice of probes and the reading of their answers are pure; ``run_probes`` submits and waits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cifarbench.cluster.plan import Task
from cifarbench.config.resources import Resources
from cifarbench.errors import plural

PROBE_TIME = "00:05:00"
PROBE_MEM_GB = 4  # the node's Python with torch and lightning imported takes about 0.7 GB
POLL_S = 2.0
# sbatch options of the runs a probe does not take: a held probe never starts, and the probe's memory is its own
_NOT_PROBED = ("hold", "mem-per-gpu")
# What every node must import for a run to start there (cifarbench.train.probe.STACK)
REQUIRED = ("torch", "torchvision", "lightning", "submitit", "cifarbench")


@dataclass(frozen=True, kw_only=True)
class Probe:
    """One probe job: what it asks SLURM for, the runs' data it looks for, and how the table names it."""

    resources: Resources
    label: str
    gpus: int  # GPUs the runs ask for (the probe takes one of them, of the same type, to read it)
    results: str
    datasets: tuple[tuple[str, str], ...]  # (dataset, data root)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What became of a probe: the node's report, or why there is none."""

    probe: Probe
    report: dict | None = None
    error: str | None = None
    job_id: str | None = None


def probe_resources(r: Resources) -> Resources:
    """Pure: what a probe of the runs asking for ``r`` asks for: the runs' partition, account, QOS, environment,
    constraint and kind of GPU, one CPU, one GPU where the runs take any, a few minutes, a node of its own never."""
    return dataclasses.replace(
        r,
        gpus_per_node=min(r.gpus_per_node, 1),
        gpu_mem_gb=None,
        cpus_per_task=1,
        mem_gb=PROBE_MEM_GB,
        time=PROBE_TIME,
        array_parallelism=1,
        max_requeues=0,
        pack=1,
        exclusive=False,
        extra=tuple((k, v) for k, v in r.extra if k not in _NOT_PROBED),
    )


def _label(r: Resources) -> str:
    where = r.partition or "default partition"
    if r.container:
        env = f"{Path(r.container).name}" + (f" ({r.python})" if r.python else "")
    else:
        env = r.python or "this python"
    gpu = f", {r.gpu_type or 'gpu'}" if r.gpus_per_node else ""
    return f"{where}: {env}{gpu}"


def probes(tasks: Iterable[Task]) -> list[Probe]:
    """Pure: one probe per distinct probe resources among ``tasks`` (runs that differ in anything but their
    environment and partition share one), each looking for the data of every run it stands for."""
    found: dict[Resources, tuple[Resources, str, set]] = {}
    for task in tasks:
        key = probe_resources(task.resources)
        datasets = found.setdefault(key, (task.resources, str(task.specs[0].results), set()))[2]
        datasets.update((s.dataset, str(s.data_root)) for s in task.specs)
    return [
        Probe(resources=key, label=_label(key), gpus=r.gpus_per_node, results=results, datasets=tuple(sorted(ds)))
        for key, (r, results, ds) in found.items()
    ]


# --- reading the answers ----------------------------------------------------------------------------------------


def problems(outcomes: Iterable[Outcome]) -> list[str]:
    """Pure: what stops a submission, one line each: a probe that did not run, a module the node lacks, a GPU the
    runs ask for that torch does not see there, data missing there, a results folder not writable there."""
    out = []
    for o in outcomes:
        where = f"probe of {o.probe.label}"
        if o.report is None:
            out.append(f"{where}: {o.error or 'no report'}")
            continue
        r = o.report
        on = f"{where} on {r['node']}"
        for name in REQUIRED:
            version = r["versions"].get(name)
            if version is None or version.startswith("missing"):
                out.append(
                    f"{on}: {r['python']} cannot import {name} ({version or 'missing'}); install it there, or set "
                    "slurm.python or slurm.container"
                )
        if o.probe.gpus and not r["gpu_count"] and not r["versions"]["torch"].startswith("missing"):
            given = ",".join(r["visible_devices"] or []) or "none"
            out.append(
                f"{on}: torch {r['versions']['torch']} sees no GPU (CUDA_VISIBLE_DEVICES: {given}), so the runs would "
                "train on CPUs; use a CUDA build of torch there, or gpus_per_node: 0"
            )
        out += [f"{on}: {error}" for error in r["data"].values() if error]
        if r["results"]:
            out.append(f"{on}: {r['results']}")
    return out


def notes(outcomes: Iterable[Outcome], *, here: tuple[str, str | None]) -> list[str]:
    """Pure: what differs between a node and this host without stopping anything: cifarbench's version or
    commit (jobs unpickle this host's job with the node's cifarbench). ``here``: this host's (version, commit)."""
    out = []
    mine = here
    for o in outcomes:
        if o.report is None:
            continue
        r = o.report
        theirs = (r["versions"].get("cifarbench"), r.get("git_commit"))
        if _differs(mine, theirs):
            out.append(
                f"note: cifarbench on {r['node']} ({o.probe.label}) is {_cifarbench(theirs)}, here "
                f"{_cifarbench(mine)}: runs there train with that one"
            )
    return out


def _shown(version: str | None) -> str:
    return "missing" if version is None or version.startswith("missing") else version


def _differs(mine: tuple, theirs: tuple) -> bool:
    if mine[0] != theirs[0]:
        return True
    return bool(mine[1] and theirs[1] and mine[1] != theirs[1])


def _cifarbench(v: tuple) -> str:
    return v[0] + (f" at {v[1][:10]}" if v[1] else "")


COLUMNS = ("probe", "node", "python", "torch", "torchvision", "lightning", "cifarbench", "GPU", "data", "results")


def table(outcomes: Iterable[Outcome], *, here: tuple[str, str | None]) -> list[str]:
    """Pure: the probes' answers as an aligned text table, one row per probe; ``here`` as for ``notes``."""
    rows: list[tuple] = [COLUMNS]
    mine = here
    for o in outcomes:
        if o.report is None:
            rows.append((o.probe.label, "-", "failed", *["-"] * (len(COLUMNS) - 3)))
            continue
        r = o.report
        versions = {
            name: _shown(r["versions"].get(name)) for name in ("torch", "torchvision", "lightning", "cifarbench")
        }
        differs = _differs(mine, (r["versions"].get("cifarbench"), r.get("git_commit")))
        if differs and versions["cifarbench"] != "missing":
            versions["cifarbench"] += " (differs)"
        gpu = (
            f"{r['gpu_count']}x {r['gpu_name']} ({r['gpu_memory_gb']:g} GB)"
            if r["gpu_count"]
            else ("none" if o.probe.gpus else "not asked")
        )
        data = "ok" if not any(r["data"].values()) else "missing"
        writable = "writable" if not r["results"] else "not writable"
        python = f"{r['python_version']} {r['python']}"
        rows.append((o.probe.label, r["node"], python, *versions.values(), gpu, data, writable))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


# --- running them -----------------------------------------------------------------------------------------------


def run_probes(
    todo: list[Probe],
    submit_one: Callable[[Probe], object],
    *,
    timeout_s: float,
    failure: Callable[[object], str],
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
) -> list[Outcome]:
    """Submit every probe (``submit_one`` returns a submitit job), wait for all of them up to ``timeout_s`` and
    return their outcomes in order. A probe still waiting at the deadline is cancelled and says so;
    ``failure(job)`` says in one line why a job that ended gave no report."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    jobs = [(p, submit_one(p)) for p in todo]
    deadline = clock() + timeout_s
    while not _all_done([job for _, job in jobs]) and clock() < deadline:
        time.sleep(poll_s)
    out = []
    for probe, job in jobs:
        job_id = getattr(job, "job_id", None)
        if not job.done():  # type: ignore[attr-defined]
            state = job.state  # type: ignore[attr-defined]
            job.cancel(check=False)  # type: ignore[attr-defined]
            out.append(
                Outcome(
                    probe=probe,
                    job_id=job_id,
                    error=f"job {job_id} was still {state} after {timeout_s:g} s and was cancelled; "
                    "wait longer with --probe-timeout",
                )
            )
            continue
        # without its result file the job failed (submitit's result() would wait 15 s for the file to appear)
        if job.paths.result_pickle.exists():  # type: ignore[attr-defined]
            try:
                out.append(Outcome(probe=probe, report=job.result(), job_id=job_id))  # type: ignore[attr-defined]
                continue
            except (FailedJobError, UncompletedJobError):  # its log says why
                pass
        out.append(Outcome(probe=probe, error=f"job {job_id} failed: {failure(job)}", job_id=job_id))
    return out


def _all_done(jobs: list) -> bool:
    """Whether every job ended. A job that succeeded has its result file; one that failed is only known from the
    queue, which submitit reads less and less often (2, 4, 8, 16 s ...): force one read per poll, which refreshes
    every job's state."""
    left = [job for job in jobs if not job.done()]
    return not left or (left[0].done(force_check=True) and all(job.done() for job in left[1:]))


def said(stderr: str, *, state: str = "") -> str:
    """Pure: the one line of a failed probe's stderr that says why (the last that names an error, else the last),
    at most 300 characters."""
    # srun's own "task 0: Exited with exit code 2" follows the line that says why
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and "Exited with exit code" not in line]
    errors = [line for line in lines if "error" in line.lower() or "no such file" in line.lower()]
    line = (errors or lines or [f"no output ({state or 'ended'})"])[-1]
    return line[:300]


def summary(outcomes: list[Outcome]) -> str:
    ok = sum(o.report is not None for o in outcomes)
    return f"probed {plural(len(outcomes), 'environment')}: {ok} answered"


def start(probe: Probe, results: str | Path, kind: str):
    """Submit ``probe`` as one job ("slurm" or "local"), its files under the results folder's probe logs."""
    from cifarbench.cluster import submit
    from cifarbench.store.layout import Layout
    from cifarbench.train.probe import node_report

    binds = [probe.results, *dict.fromkeys(root for _, root in probe.datasets)]
    ex = submit.probe_executor(probe.resources, Layout(results).probe_logs, kind, binds=binds)
    return ex.submit(node_report, probe.results, [list(d) for d in probe.datasets])


def failure(job) -> str:
    """Why ``job`` (a submitit job that ended without a report) failed, in one line from its stderr."""
    try:
        text = Path(job.paths.stderr).read_text(errors="replace")
    except OSError:
        text = ""
    return said(text, state=str(job.state))
