"""Packed runs: one job trains several runs at once in its allocation, each in a worker process of its own.

The job process (the submitit callable, ``PackJob``) starts one worker per run, ``python -m
cifarbench.train.pack``, which is the single-run path unchanged (``job.run_one``: the run's lock, its checkpoint
after every epoch, its record), with torch's threads pinned to the run's share of the job's CPUs and, where there
are enough of them, its own cores. Worker processes rather than one SLURM task per run (``tasks_per_node``)
because then Lightning sees one process with one device and never sets up DDP; a worker that dies (an
exception, out of memory, SIGKILL) takes only its own run with it; and submitit keeps one process to signal and
requeue.

Requeue: on SLURM's USR2 submitit calls ``PackJob.checkpoint``, which stops every worker (SIGTERM: the run's
record says it was stopped; its last checkpoint stays) and requeues the job with the runs that have not ended, so
each resumes from its checkpoint and a finished or failed run is not run again. SLURM's own SIGTERM (scancel,
``scontrol requeue``, the kill at the time limit) reaches the workers directly and stops them the same way.

On a GPU node the runs share the GPU: through a CUDA MPS server that the job starts and stops (``mps: auto``
where ``nvidia-cuda-mps-control`` exists, or ``on``), its pipe and log folders in the job's temporary folder;
otherwise they time-slice it.

Importing this module does not import torch: ``cifarbench.cluster.submit`` names ``PackJob`` to pickle it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import submitit

from cifarbench.config.resources import STOPPED, Budget, Packing
from cifarbench.config.spec import RunSpec
from cifarbench.errors import plural
from cifarbench.store import records
from cifarbench.store.layout import Layout
from cifarbench.system import allocation_cpus, allocation_gpus, allowed_cores, local_gpus, visible_devices
from cifarbench.train.job import completed_record

STOP_WAIT_S = 40  # SLURM signals 60 s ahead of the limit: time for each worker to leave its epoch and exit
EXIT_STOPPED = 75  # a worker's exit status when its job stopped it (EX_TEMPFAIL: try again later)
_PR_SET_PDEATHSIG = 1


def shares(runs: int, cpus: int, cores: list[int]) -> tuple[int, list[list[int]] | None]:
    """Pure: (torch threads per run, each run's cores or None) for ``runs`` runs on ``cpus`` CPUs; cores of their
    own only where ``cores`` (the CPUs this process may use) has enough for every run."""
    threads = max(1, cpus // runs)
    if len(cores) < runs * threads:
        return threads, None
    return threads, [cores[i * threads : (i + 1) * threads] for i in range(runs)]


def visible_gpus() -> list[str]:
    """The GPUs this job may use, as CUDA_VISIBLE_DEVICES names them (SLURM sets it for the GPUs it granted), else
    numbered from 0."""
    visible = visible_devices()
    return visible if visible is not None else [str(i) for i in range(local_gpus())]


def gpu_shares(workers: int, gpus: list[str]) -> list[str | None]:
    """Pure: each worker's CUDA_VISIBLE_DEVICES, the allocation's GPUs round robin (8 workers on 4 GPUs: 2 on
    each); None where there is no GPU to give."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(workers)]


@contextlib.contextmanager
def mps_server(mode: str, folder: Path, *, shared: bool = True) -> Iterator[tuple[str | None, dict[str, str]]]:
    """(how the runs share the GPU: "on", "off" or None where no GPU is shared, the environment of an MPS
    client). ``shared``: whether any GPU gets more than one run."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not local_gpus() or not shared:
        yield None, {}
        return
    if mode == "off" or (mode == "auto" and control is None):
        yield "off", {}
        return
    if control is None:
        raise RuntimeError("mps: on, but nvidia-cuda-mps-control is not on this node's PATH; use mps: auto or off")
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "mps-log")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    started = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    if started.returncode != 0:
        said = " ".join((started.stderr or started.stdout).split()) or f"exit {started.returncode}"
        if mode == "on":
            raise RuntimeError(f"mps: on, but the MPS control daemon did not start: {said}")
        print(f"MPS control daemon did not start ({said}); the runs time-slice the GPU", flush=True)
        yield "off", {}
        return
    try:
        yield "on", env
    finally:
        subprocess.run([control], input="quit\n", env={**os.environ, **env}, text=True, timeout=60, check=False)


@dataclass
class _Worker:
    spec: RunSpec
    budget: Budget
    proc: subprocess.Popen
    started: datetime
    readers: list[threading.Thread] = field(default_factory=list)
    outcome: str | None = None  # completed, failed, stopped


def _relay(stream, out, run_id: str) -> None:
    """A worker's output, each line prefixed with its run id (lines that already start with it stay as they are)."""
    prefix = f"[{run_id}]"
    for line in stream:
        out.write(line if line.startswith(prefix) else f"{prefix} {line}")
        out.flush()


def worker_env(job: Mapping[str, str], mps: dict[str, str], device: str | None) -> dict[str, str]:
    """Pure: a worker's environment: the job's, the MPS client's, and its own GPU where it has one."""
    own = {"CUDA_VISIBLE_DEVICES": device} if device is not None else {}
    return {**job, **mps, **own, "PYTHONUNBUFFERED": "1"}


class PackJob(submitit.helpers.Checkpointable):
    """The submitit callable of one packed array task: its runs, trained concurrently in one allocation."""

    def __init__(
        self,
        specs: list[RunSpec],
        budgets: list[Budget],
        *,
        pack: int | None = None,
        mps: str = "auto",
        cpus: int | None = None,
        members: tuple[str, ...] | None = None,
    ):
        self.specs = list(specs)
        self.budgets = list(budgets)
        self.members = members or tuple(s.run_id for s in self.specs)  # the task's runs, for the records
        # The CPUs are split in `pack` shares however many runs are left to train (a smaller last pack, a retry,
        # runs already completed): a run's thread count, and so its numbers, never depend on its company.
        self.pack = pack or len(self.specs)
        self.mps = mps
        self.cpus = cpus  # None: the allocation's; local execution gives each device's share
        self._workers: list[_Worker] = []
        self._packing = Packing()

    def __getstate__(self) -> dict:  # the workers of one attempt are not part of the job
        return {k: v for k, v in self.__dict__.items() if k not in ("_workers", "_packing")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _workers=[], _packing=Packing())

    def __call__(self) -> list[str]:
        shared = self.pack > len(visible_gpus())  # else one run per GPU: nothing to share, no MPS server
        with (
            tempfile.TemporaryDirectory(prefix="cifarbench-pack-") as tmp,
            mps_server(self.mps, Path(tmp), shared=shared) as mps,
        ):
            label, env = mps
            cpus = self.cpus or allocation_cpus()
            self._start(Packing(runs=self.members, mps=label, alloc_gpus=allocation_gpus(), alloc_cpus=cpus), env)
            try:
                while any(w.outcome is None for w in self._workers):
                    for worker in self._workers:
                        if worker.outcome is None and worker.proc.poll() is not None:
                            self._ended(worker)
                    time.sleep(0.5)
            finally:
                self._stop()
        failed = [w.spec.run_id for w in self._workers if w.outcome != "completed"]
        if failed:
            said = ", ".join(failed)
            raise RuntimeError(f"{plural(len(failed), 'run')} of {len(self.specs)} did not complete: {said}")
        return [str(Layout(s.results).record(s.run_id)) for s in self.specs]

    def _start(self, packing: Packing, env: dict[str, str]) -> None:
        self._packing = packing
        todo = [(s, b) for s, b in zip(self.specs, self.budgets) if not completed_record(s) and not _failed_here(s)]
        if not todo:
            return
        threads, cores = shares(max(self.pack, len(todo)), packing.alloc_cpus or allocation_cpus(), allowed_cores())
        gpus = visible_gpus()
        if packing.mps == "on":  # an MPS server numbers the GPUs it was started with from 0: its clients name those
            gpus = [str(i) for i in range(len(gpus))]
        devices = gpu_shares(len(todo), gpus)
        print(
            f"packed job: {plural(len(todo), 'run')} to train ({len(self.specs) - len(todo)} completed or failed), "
            f"{plural(threads, 'thread')} each"
            + (f", GPUs {','.join(d for d in devices if d)} round robin" if any(devices) else "")
            + {"on": ", GPUs shared through MPS", "off": ", GPUs time-sliced"}.get(packing.mps or "", ""),
            flush=True,
        )
        for i, (spec, budget) in enumerate(todo):
            task = {
                "spec": spec.to_dict(),
                "budget": budget.to_dict(),
                "runs": list(packing.runs),
                "mps": packing.mps,
                "alloc_gpus": packing.alloc_gpus,
                "alloc_cpus": packing.alloc_cpus,
                "threads": threads,
                "cores": cores[i] if cores else None,
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "cifarbench.train.pack", json.dumps(task)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=worker_env(os.environ, env, devices[i]),
            )
            worker = _Worker(spec=spec, budget=budget, proc=proc, started=datetime.now(timezone.utc))
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                reader = threading.Thread(target=_relay, args=(stream, out, spec.run_id), daemon=True)
                reader.start()
                worker.readers.append(reader)
            self._workers.append(worker)

    def _ended(self, worker: _Worker, *, stopping: bool = False) -> None:
        code = worker.proc.wait()
        for reader in worker.readers:
            reader.join(timeout=10)
        run_id = worker.spec.run_id
        if code == 0:
            worker.outcome = "completed"
        elif code == EXIT_STOPPED or stopping:  # stopping: one that outlived STOP_WAIT_S was killed, not failed
            worker.outcome = "stopped"
        else:
            worker.outcome = "failed"
        if worker.outcome == "failed" and code < 0:  # killed by a signal: nothing in it could write its record
            name = signal.Signals(-code).name
            print(f"[{run_id}] its process was killed by {name}; the other runs go on", file=sys.stderr, flush=True)
            from cifarbench.train.fit import record_death

            record_death(
                worker.spec,
                f"WorkerKilled: the run's process was killed by {name} (out of memory, or killed from outside)",
                started=worker.started,
                budget=worker.budget,
                packing=self._packing,
            )

    def _stop(self) -> None:
        """Stop the workers still training (each keeps its last checkpoint) and wait for them, SIGKILL at last."""
        alive = [w for w in self._workers if w.outcome is None]
        for worker in alive:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        for worker in alive:
            try:
                worker.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
            self._ended(worker, stopping=True)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:  # type: ignore[override]
        """Called by submitit on SLURM's USR2 (time limit, preemption): stop the workers, then requeue the runs
        that neither completed nor failed."""
        self._stop()
        left = [(w.spec, w.budget) for w in self._workers if w.outcome == "stopped"]
        started = {w.spec.run_id for w in self._workers}
        left += [(s, b) for s, b in zip(self.specs, self.budgets) if s.run_id not in started]
        if not left:
            return None  # every run ended: nothing to requeue
        specs, budgets = [s for s, _ in left], [b for _, b in left]
        job = PackJob(specs, budgets, pack=self.pack, mps=self.mps, cpus=self.cpus, members=self.members)
        return submitit.helpers.DelayedSubmission(job)


def _failed_here(spec: RunSpec) -> bool:
    """Whether the run failed in an earlier attempt of this very array task (``scontrol requeue`` starts the
    task's first callable again): it waits for ``submit --retry-failed`` rather than running again here."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    record = records.read_record(Layout(spec.results).record(spec.run_id))
    return bool(
        job
        and record
        and record["status"] == "failed"
        and not (record["error"] or "").startswith(STOPPED)
        and (record["slurm_job_id"], record["slurm_array_task_id"]) == (job, os.environ.get("SLURM_ARRAY_TASK_ID"))
    )


class Stopped(BaseException):  # its name starts the record's error: config.resources.STOPPED says so
    """The job stopped this run; it resumes from its last checkpoint when the job is requeued."""


def _stop(signum, frame):
    raise Stopped(f"stopped by its job ({signal.Signals(signum).name}); it resumes from its last checkpoint")


def worker(argv: list[str]) -> int:
    """One packed run, in a process of its own (``python -m cifarbench.train.pack TASK``)."""
    from cifarbench.train.job import run_one

    task = json.loads(argv[0])
    if sys.platform == "linux":  # the job process gone (SIGKILL, node trouble): stop as if it had asked
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if task["cores"] and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, task["cores"])
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # SLURM's warning is the job process's to act on
    spec = RunSpec.from_dict(task["spec"])
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        print(f"[{spec.run_id}] CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", flush=True)
    try:
        run_one(
            spec,
            Budget(**task["budget"]),
            packing=Packing(
                runs=tuple(task["runs"]), mps=task["mps"], alloc_gpus=task["alloc_gpus"], alloc_cpus=task["alloc_cpus"]
            ),
            threads=task["threads"],
        )
    except Stopped as stop:
        print(f"[{spec.run_id}] {stop}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
