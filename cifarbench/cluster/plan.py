"""Planning a submission, all pure: which runs to submit and which to skip, the job arrays they make (one per
group of equal resources, chunked by MaxArraySize), and the lines ``submit`` and ``--dry-run`` print about
them. Nothing here imports submitit: a dry run never pays for it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from cifarbench.cluster.estimate import Planned
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec
from cifarbench.errors import plural


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


def groups(planned: list[Planned]) -> dict[Resources, list[Planned]]:
    """Pure: the runs by the resources they ask for, in the order they first appear: one job array each."""
    out: dict[Resources, list[Planned]] = {}
    for p in planned:
        out.setdefault(p.resources, []).append(p)
    return out


def packs(members: list[Planned]) -> list[list[Planned]]:
    """Pure: the runs of one group of equal resources, ``pack`` at a time (the last pack may be smaller): one
    array task each."""
    return chunks(members, members[0].resources.pack)


def tasks(planned: list[Planned], fuse: Mapping[str, int]) -> list[list[Planned]]:
    """Pure: the array tasks of ``planned``. Runs with fusion on (``fuse``: run id -> the largest group) that
    differ only in their seed and ask for the same resources share a task, up to that many, in the order they
    come; every other run is a task of its own."""
    out: list[list[Planned]] = []
    filling: dict[tuple, list[Planned]] = {}
    for p in planned:
        most = fuse.get(p.spec.run_id, 0)
        if most < 2:
            out.append([p])
            continue
        key = (dataclasses.replace(p.spec, seed=0), p.resources, most)
        task = filling.get(key)
        if task is None or len(task) >= most:
            task = filling[key] = []
            out.append(task)
        task.append(p)
    return out


@dataclass(frozen=True)
class Task:
    """One array task: a fused group (its members train as one vectorised model), or runs trained side by side
    (``pack`` of them; one where pack is 1)."""

    runs: list[Planned]
    fused: bool


def array_tasks(members: list[Planned], fuse: Mapping[str, int]) -> list[Task]:
    """Pure: the array tasks of one group of equal resources. Runs that fuse make a task per group; the others
    are packed ``pack`` at a time. A fused group already shares the device's kernels, so it is not packed too."""
    fused, alone = [], []
    for task in tasks(members, fuse):
        if len(task) > 1:
            fused.append(Task(runs=task, fused=True))
        else:
            alone.append(task[0])
    return fused + [Task(runs=pack, fused=False) for pack in (packs(alone) if alone else [])]


def _hours(planned: list[Planned], seconds) -> tuple[float, str]:
    """Device-hours of ``planned`` (all of one group): GPU-hours, or CPU core-hours where no GPU is asked for. A
    packed task's runs share its allocation: each counts for its share."""
    r = planned[0].resources
    per = r.gpus_per_node or r.cpus_per_task
    return sum(seconds(p) for p in planned) * per / r.pack / 3600, "GPU-h" if r.gpus_per_node else "CPU-core-h"


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
        tasks = len(packs(members))
        n_arrays = -(-tasks // max_array_size)
        arrays += n_arrays
        lines.append(
            f"group {i}: {plural(len(members), 'run')}, {plural(r.gpus_per_node, 'GPU')}, "
            f"{plural(r.cpus_per_task, 'CPU')}, {mem}, time {r.time}{auto}, partition {r.partition or '(default)'}"
            + (f", constraint {r.constraint}" if r.constraint else "")
            + (f", packed {r.pack} per task: {plural(tasks, 'task')}" if r.pack > 1 else "")
            + f"; {plural(n_arrays, 'array')}; estimated {estimated:.1f} {unit}, reserved "
            f"{reserved:.1f} {unit}; estimates: " + ", ".join(f"{n} from {src}" for src, n in sources.items())
        )
        if any(p.capped for p in members):
            lines.append(
                f"  warning: group {i}'s runs are estimated to need more than the partition's MaxTime; they are "
                f"limited to {r.time} and carried across limits by requeue and resume"
            )
        if r.pack > 1 and len(members) % r.pack:
            lines.append(
                f"  note: group {i}'s last task packs {plural(len(members) % r.pack, 'run')}, not {r.pack}: "
                f"{plural(len(members), 'run')} do not divide into packs of {r.pack}"
            )
        for key, value in ((f"estimated {unit}", estimated), (f"reserved {unit}", reserved)):
            totals[key] = totals.get(key, 0.0) + value
    hours = ", ".join(f"{k} {v:.1f}" for k, v in totals.items())
    groups_n = len(groups(planned))
    lines.append(
        f"total: {plural(len(planned), 'run')} in {plural(groups_n, 'group')}, {plural(arrays, 'array')}; {hours}"
    )
    return lines
