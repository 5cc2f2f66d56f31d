"""What runs on a compute node: one run, requeue-safe, always leaving a record.

SLURM signals the job (``--signal=USR2@...``) before its time limit or on preemption; submitit's handler calls
``checkpoint`` and requeues the job. Training state is already on disk (``last.ckpt`` after every epoch), so the
requeued job simply calls the same run again and ``fit`` resumes from it. Lightning's own SLURM auto-requeue is
switched off so that only submitit handles the signal. A run on several processes (DDP: one SLURM task per rank)
runs this on every rank; submitit's rank 0 requeues the job, which restarts every task, and each resumes from the
same ``last.ckpt``. Only rank 0 takes the run's lock (``run_rank``).

Importing this module does not import torch: ``cifarbench.cluster.submit`` names these classes to pickle them,
and only a job that runs pays for the training stack.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timezone

import submitit

from cifarbench.config.resources import Budget, Packing
from cifarbench.config.spec import RunSpec
from cifarbench.errors import plural
from cifarbench.store import records
from cifarbench.store.layout import Layout
from cifarbench.store.locks import run_lock
from cifarbench.system import task_ended
from cifarbench.train import ranks


def completed_record(spec: RunSpec) -> dict | None:
    record = records.read_record(Layout(spec.results).record(spec.run_id))
    return record if record and record["status"] == "completed" else None


def run_one(
    spec: RunSpec, budget: Budget | None = None, *, packing: Packing | None = None, threads: int | None = None
) -> str:
    """Train ``spec`` unless it already has a completed record (duplicate submissions then cost nothing).
    ``threads``: torch's threads where the run gets a share of the job's CPUs (packed runs)."""
    import torch
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from cifarbench.train.fit import fit

    def waiting():
        print(f"[{spec.run_id}] another job is running this run; waiting for it", flush=True)

    # CPU results depend on the number of threads (summation order): pin it to the CPUs SLURM granted, so
    # every attempt of a run, and a rerun elsewhere with the same resources, computes the same numbers.
    if threads is not None:
        torch.set_num_threads(threads)
    elif os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    if spec.world_size > 1:
        return run_rank(spec, budget)
    with run_lock(spec.results, spec.run_id, on_wait=waiting):
        if completed_record(spec):
            print(f"[{spec.run_id}] already completed; nothing to do", flush=True)
            return str(Layout(spec.results).record(spec.run_id))
        plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
        return str(fit(spec, plugins=plugins, budget=budget, packing=packing))


def run_rank(spec: RunSpec, budget: Budget | None = None) -> str:
    """``run_one`` on one rank of a run on several processes (one SLURM task each; see ``cifarbench.train.ranks``):
    rank 0 alone takes the run's lock and decides, the others follow its decision; every rank trains, or none. A
    failed run's record names each rank's error."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from cifarbench.train.fit import error_text, fit, record_death

    record = str(Layout(spec.results).record(spec.run_id))
    # A completed record is final, so every rank may read it without the lock: a run done costs no rank anything.
    if completed_record(spec):
        print(f"[{spec.run_id}] already completed; nothing to do", flush=True)
        return record
    rank, timeout = ranks.global_rank(), ranks.collective_timeout_s()
    folder, started = ranks.attempt_dir(spec.results, spec.run_id), datetime.now(timezone.utc)
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None  # as in run_one
    if rank == 0:
        ranks.begin(folder)
        with contextlib.ExitStack() as beat:

            def waiting():
                print(f"[{spec.run_id}] another job is running this run; waiting for it", flush=True)
                beat.enter_context(ranks.waiting(folder, timeout))  # the other ranks wait as long as rank 0 does

            with run_lock(spec.results, spec.run_id, on_wait=waiting):
                beat.close()
                train = completed_record(spec) is None
                ranks.decide(folder, train)
                if not train:
                    print(f"[{spec.run_id}] already completed; nothing to do", flush=True)
                    return record
                try:
                    path = fit(spec, plugins=plugins, budget=budget)
                except Exception as exc:
                    ranks.report_error(folder, 0, error_text(exc))
                    _leave_process_group()
                    errors = ranks.await_errors(folder, set(range(spec.world_size)), ranks.GRACE_S)
                    _name_ranks(spec, ranks.failure(spec.world_size, errors))
                    raise
                except BaseException as exc:  # the job is ending (SIGTERM, the time-limit signal): no time to wait
                    ranks.report_error(folder, 0, error_text(exc))
                    raise
                ranks.end(folder)
                return str(path)
    try:
        if not ranks.await_decision(folder, timeout):
            print(f"[{spec.run_id}] already completed; nothing to do", flush=True)
            return record
        return str(fit(spec, plugins=plugins, budget=budget))
    except Exception as exc:
        ranks.report_error(folder, rank, error_text(exc))
        _leave_process_group()
        # a live rank 0 fails within one collective timeout, and writes the record; a dead one leaves it to us
        if 0 not in ranks.await_errors(folder, {0}, timeout + ranks.GRACE_S):
            error = ranks.failure(spec.world_size, ranks.rank_errors(folder))
            record_death(spec, error, started=started, budget=budget or Budget(), packing=Packing())
        raise
    except BaseException as exc:
        ranks.report_error(folder, rank, error_text(exc))
        raise


def _leave_process_group() -> None:
    """Close this rank's connections after its failure, so that the ranks still in a collective with it fail now
    (and write their errors) rather than at the timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # the group may be broken already: nothing more to close
            dist.destroy_process_group()


def _name_ranks(spec: RunSpec, error: str) -> None:
    """Put the ranks' errors in rank 0's failed record (written by ``fit`` with rank 0's error alone)."""
    row = records.read_record(Layout(spec.results).record(spec.run_id))
    if row and row["status"] == "failed":
        records.write_record({**row, "error": error}, spec.results)


def run_fused(specs: list[RunSpec], budgets: list[Budget | None] | None = None) -> list[str]:
    """Train ``specs`` (one run but for the seed) as one fused group, holding every member's lock. Members that
    completed (elsewhere, or in an earlier job of this group) are left out; the others make the group, whose
    checkpoint is named after them, so a requeued group finds it again. Where the precision resolves to
    16-mixed, whose loss scaling is one scale per step, the members train one after another instead."""
    import torch
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from cifarbench.train.fit import default_device, fit, fit_group, resolve_precision

    budgets = budgets if budgets is not None else [None] * len(specs)
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():  # as in run_one
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    with contextlib.ExitStack() as locks:
        for spec in sorted(specs, key=lambda s: s.run_id):  # one order for every job: no two wait on each other

            def waiting(spec=spec):
                print(f"[{spec.run_id}] another job is running this run; waiting for it", flush=True)

            locks.enter_context(run_lock(spec.results, spec.run_id, on_wait=waiting))
        todo = [(s, b) for s, b in zip(specs, budgets) if not completed_record(s)]
        plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None  # as in run_one
        if len(todo) > 1 and resolve_precision(specs[0].precision, default_device()) == "16-mixed":
            print(f"{plural(len(todo), 'run')}: 16-mixed cannot be fused; training them one by one", flush=True)
        if len(todo) > 1 and resolve_precision(specs[0].precision, default_device()) != "16-mixed":
            fit_group([s for s, _ in todo], budgets=[b for _, b in todo], plugins=plugins)
        else:  # a group of one left is a run alone
            for s, b in todo:
                fit(s, plugins=plugins, budget=b)
        failed = [s.run_id for s in specs if not completed_record(s)]
        if failed:
            raise RuntimeError(f"{plural(len(failed), 'run')} of the fused group failed: {', '.join(failed)}")
        return [str(Layout(s.results).record(s.run_id)) for s in specs]


class RunJob(submitit.helpers.Checkpointable):
    """The submitit callable for one run (one SLURM array task). Requeued as itself: state lives in last.ckpt."""

    def __init__(self, spec: RunSpec, budget: Budget | None = None):
        self.spec = spec
        self.budget = budget

    def __call__(self) -> str:
        return run_one(self.spec, getattr(self, "budget", None))  # jobs pickled by earlier versions have none


class FusedJob(submitit.helpers.Checkpointable):
    """The submitit callable for one fused group (one SLURM array task). Requeued as itself: state lives in the
    group's checkpoint."""

    def __init__(self, specs: list[RunSpec], budgets: list[Budget | None] | None = None):
        self.specs = list(specs)
        self.budgets: list[Budget | None] = list(budgets) if budgets is not None else [None] * len(self.specs)

    def __call__(self) -> list[str]:
        return run_fused(self.specs, self.budgets)


class TaskSequence(submitit.helpers.Checkpointable):
    """Several array tasks (``RunJob``, ``FusedJob`` or a pack's ``PackJob``) one after another in one job: local
    execution keeps one task per device at a time."""

    def __init__(self, tasks: list):
        self.tasks = list(tasks)

    def __call__(self) -> list[str]:
        paths, errors, failed = [], [], 0
        specs = [s for t in self.tasks for s in _specs(t)]
        for task in self.tasks:
            try:
                done = task()
                paths += done if isinstance(done, list) else [done]
            except Exception as exc:  # the failed records are written; go on with the other tasks
                if hasattr(task, "specs"):  # a group: its error names its runs
                    failed += sum(completed_record(s) is None for s in task.specs)
                    errors.append(str(exc))
                else:
                    failed += 1
                    errors.append(f"{task.spec.run_id}: {exc}")
            finally:  # the next task's wall-clock time starts here (a pack's workers are processes of their own)
                task_ended()
        if errors:
            raise RuntimeError(f"{failed} of {plural(len(specs), 'run')} failed: " + "; ".join(errors))
        return paths


def _specs(task) -> list[RunSpec]:
    return list(task.specs) if hasattr(task, "specs") else [task.spec]
