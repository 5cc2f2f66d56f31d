"""Planning a submission, all pure and all in allocations: which runs to submit and which to skip, the array tasks
they make (a run alone, a pack of runs side by side, or a fused group of seeds), each task's estimate and time
limit, the job arrays the tasks make (one per set of equal resources, chunked by MaxArraySize), and the lines
``submit`` and ``--dry-run`` print about them. Nothing here imports submitit: a dry run never pays for it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cifarbench.cluster.estimate import Estimate, Evidence, estimate_task, time_limit
from cifarbench.cluster.inventory import ClusterLimits, parse_constraint, satisfies
from cifarbench.cluster.memory import Memory, PlanError, pack_size, task_memory
from cifarbench.config.resources import AUTO, Budget, Resources, format_time
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


@dataclass(frozen=True, kw_only=True)
class Task:
    """One array task as it will be submitted: its runs (a fused group, whose members train as one vectorised
    model; or runs trained side by side, ``pack`` of them, one where pack is 1), the resources SLURM is asked for
    with any ``time: auto`` resolved, and the task's estimate."""

    specs: tuple[RunSpec, ...]
    fused: bool
    resources: Resources
    estimate: Estimate
    auto: bool  # the limit came from the estimate (``time: auto``)
    capped: bool  # the partition's MaxTime or the QOS's MaxWall cut the limit ``time: auto`` wanted
    memory: Memory | None = None  # the memory ``mem_gb: auto`` asked for, and why
    pack_detail: str | None = None  # why ``pack: auto`` packed this many

    @property
    def budget(self) -> Budget:
        """What each of its runs is told of the time it was given: the task's limit and estimate."""
        return Budget(
            time_limit_s=self.limit_s,
            estimated_s=round(self.estimate.seconds, 1),
            estimate_source=f"{self.estimate.source}: {self.estimate.detail}",
        )

    @property
    def limit_s(self) -> int:
        """The time limit as SLURM gets it: submitit asks for whole minutes, rounded up."""
        return self.resources.timeout_min * 60

    def hours(self, seconds: float) -> float:
        """Device-hours of ``seconds`` of this allocation, on all its nodes: GPU-hours, or CPU core-hours where it
        has no GPU (every task's cores)."""
        r = self.resources
        return seconds * (r.gpus_per_node * r.nodes or r.cpus_per_task * r.processes) / 3600

    @property
    def unit(self) -> str:
        return "GPU-h" if self.resources.gpus_per_node else "CPU-core-h"


def local_devices(gpus: int, tasks: int, *, whole: bool = False) -> int:
    """Pure: how many sequences local execution runs at once: one per GPU (one on a CPU-only machine), no more than
    the tasks there are; one where a task takes the whole machine (``whole``: some task is ``exclusive``)."""
    return 1 if whole else max(min(max(gpus, 1), tasks), 1)


def local_cpus(gpus: int, cores: int, tasks: int, *, whole: bool = False) -> int:
    """Pure: the cores each of local execution's sequences gets (``local_devices``) of this machine's ``cores``."""
    return max(cores // local_devices(gpus, tasks, whole=whole), 1)


def whole_node(r: Resources, *, gpus: int, cpus: int) -> Resources:
    """Pure: what an ``exclusive`` task of ``r`` asks for on a node of ``gpus`` GPUs and ``cpus`` CPUs: all of them,
    and ``pack: K`` runs on each GPU, K x ``gpus`` in all (on a node without GPUs, K runs share its CPUs); ``pack:
    auto`` is planned for all the GPUs (``memory.pack_size``). Raises ValueError where the node cannot hold it."""
    if isinstance(r.pack, int) and not gpus and r.pack > cpus:
        raise ValueError(
            f"pack: {r.pack} runs on a whole node of {plural(cpus, 'CPU')} leaves some run without a CPU of its own; "
            f"pack at most {cpus}"
        )
    pack = r.pack * max(gpus, 1) if isinstance(r.pack, int) else r.pack
    return dataclasses.replace(r, gpus_per_node=gpus, cpus_per_task=cpus, pack=pack)


def whole_nodes(
    resources: Mapping[str, Resources], limits: ClusterLimits | None
) -> tuple[dict[str, Resources], list[str]]:
    """Pure: runs whose resources are ``exclusive`` ask for whole nodes of their partition (``whole_node``), sized
    by its nodes that take jobs and could take the task (with GPUs of its ``gpu_type``, or any, where it asks for
    GPUs; matching its constraint): where those differ, by what every one of them has, with a line saying so.
    Resources that no node could take are left as they are, for preflight to refuse. Raises ValueError where the
    cluster's limits were not read (None) and a run is exclusive, or where a node cannot hold a task."""

    out: dict[Resources, Resources] = {}
    said: list[str] = []
    for r in dict.fromkeys(resources.values()):
        if not r.exclusive:
            continue
        if limits is None:
            raise ValueError(
                "exclusive: whole nodes take the size of the partition's nodes, and --no-preflight does not read "
                "them; submit without --no-preflight"
            )
        partition = limits.partition(r.partition)
        if partition is None:
            continue
        try:
            constraint = parse_constraint(r.constraint) if r.constraint else None
        except ValueError:  # preflight says what is wrong with it
            constraint = None
        able = [n for n in limits.nodes_of(partition) if n.able]
        sizes = [
            (gpus if r.gpus_per_node else 0, cpus)
            for node, (gpus, cpus, _) in zip(able, limits.capacities(partition, r.gpu_type))
            if (gpus or not r.gpus_per_node) and (constraint is None or satisfies(constraint, node.features))
        ]
        if not sizes:
            continue
        gpus, cpus = min(g for g, _ in sizes), min(c for _, c in sizes)
        out[r] = whole_node(r, gpus=gpus, cpus=cpus)
        if len(set(sizes)) > 1:
            line = (
                f"note: the nodes of partition {partition.name!r} differ ({_span(g for g, _ in sizes)} GPUs, "
                f"{_span(c for _, c in sizes)} CPUs): exclusive tasks ask for what every one has, "
                f"{plural(gpus, 'GPU')} and {plural(cpus, 'CPU')}, and leave the rest of a larger node idle "
                "(a constraint can pick the larger nodes)"
            )
            if line not in said:
                said.append(line)
    return {run_id: out.get(r, r) for run_id, r in resources.items()}, said


def _span(values: Iterable[int]) -> str:
    values = sorted(set(values))
    return f"{values[0]}-{values[-1]}" if len(values) > 1 else f"{values[0]}"


def local_resources(r: Resources, *, gpus: int, cpus: int) -> Resources:
    """Pure: what a task of ``r`` gets from local execution (``--executor local``): one of the machine's ``gpus``
    (none: its CPUs), ``cpus`` cores, no partition, no memory limit; the time limit is kept. An ``exclusive`` task
    gets the whole machine: all its ``gpus`` and ``cpus`` (``local_cpus`` with ``whole``), ``pack`` runs on each
    GPU. Raises ValueError where ``r`` cannot train so (``pack: auto`` without a GPU, a run of several processes)."""
    check_local(r)
    if not gpus and r.pack == AUTO:
        raise ValueError("pack: auto packs runs onto a GPU, and this machine has none; write pack: K to run locally")
    pack = r.pack if isinstance(r.pack, int) else 1
    local = dataclasses.replace(
        r,
        partition=None,
        account=None,
        qos=None,
        constraint=None,
        gpus_per_node=1 if gpus else 0,
        gpu_type=None,
        gpu_mem_gb=r.gpu_mem_gb if gpus else None,
        cpus_per_task=cpus if gpus else max(cpus, pack),
        mem_gb=None,
        extra=(),
    )
    return whole_node(local, gpus=gpus, cpus=local.cpus_per_task) if r.exclusive else local


def check_local(r: Resources) -> None:
    """Raises ValueError where local execution cannot run a task of ``r``: a run of several processes, which SLURM
    starts (srun) and connects (its environment tells each process its rank)."""
    if r.processes > 1:
        raise ValueError(
            f"gpus_per_run/nodes: a run of {r.processes} processes is started by srun on SLURM, "
            "and --executor local has none; run it on SLURM (--executor slurm), or with gpus_per_run: 1"
        )


def groups_of_runs(specs: Iterable[RunSpec], resources: Mapping[str, Resources]) -> dict[Resources, list[RunSpec]]:
    """Pure: the runs by the resources the grid gives them, in the order they first appear."""
    out: dict[Resources, list[RunSpec]] = {}
    for spec in specs:
        out.setdefault(resources[spec.run_id], []).append(spec)
    return out


def fused_groups(specs: Iterable[RunSpec], fuse: Mapping[str, int]) -> list[list[RunSpec]]:
    """Pure: runs with fusion on (``fuse``: run id -> the largest group) that differ only in their seed share a
    group, up to that many, in the order they come; every other run is a list of its own."""
    out: list[list[RunSpec]] = []
    filling: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        most = fuse.get(spec.run_id, 0)
        if most < 2:
            out.append([spec])
            continue
        key = (dataclasses.replace(spec, seed=0), most)
        group = filling.get(key)
        if group is None or len(group) >= most:
            group = filling[key] = []
            out.append(group)
        group.append(spec)
    return out


def make_tasks(
    specs: Iterable[RunSpec],
    resources: Mapping[str, Resources],
    fuse: Mapping[str, int],
    evidence: Evidence,
    max_time: Mapping[tuple[str | None, str | None], int | None] | None = None,
    data: Mapping[tuple[str, str], tuple[int, int]] | None = None,
) -> list[Task]:
    """Pure: the array tasks of ``specs``, each with its estimate and ``time: auto`` turned into its limit.
    Within each set of equal resources, runs that fuse make a task per group; the others are packed ``pack`` at a
    time, longest first, so that a pack holds runs of like length (a fused group already shares the device's
    kernels, so it is not packed too). ``max_time``: (partition, QOS) as resources name them -> the longest limit
    there in seconds (``preflight.max_times``; None: unlimited); empty where the cluster is not asked (local runs).
    ``data``: (dataset, data root) -> its training and test images (``estimate.planned_images``)."""
    out = []
    for r, members in groups_of_runs(specs, resources).items():
        fused: list[list[RunSpec]] = []
        alone: list[list[RunSpec]] = []
        for group in fused_groups(members, fuse):
            (fused if len(group) > 1 else alone).append(group)
        if fused and r.exclusive and r.gpus_per_node > 1:
            raise PlanError(
                f"exclusive: a fused group trains on one GPU, and a whole node here has {r.gpus_per_node}; set "
                "exclusive: false for the fused runs (each group a task of one GPU), or fuse: false"
            )
        why = None
        if r.pack == AUTO:
            choice = pack_size([s for [s] in alone], r, evidence) if alone else None
            r = dataclasses.replace(r, pack=choice.k if choice else 1)
            why = choice and choice.detail
        assert isinstance(r.pack, int)
        if r.pack > 1:  # a pack's allocation lasts as long as its longest run: pack runs of like length together
            one = dataclasses.replace(r, pack=1)
            single = {s.run_id: estimate_task([s], one, evidence, data=data).seconds for [s] in alone}
            ordered = sorted((s for [s] in alone), key=lambda s: -single[s.run_id])
            alone = chunks(ordered, r.pack)
        out += [_task(g, r, evidence, max_time, data, fused=True) for g in fused]
        out += [_task(g, r, evidence, max_time, data, fused=False, pack_detail=why) for g in alone]
    return out


def _task(specs, r: Resources, evidence: Evidence, max_time, data, *, fused: bool, pack_detail=None) -> Task:
    est = estimate_task(specs, r, evidence, fused=fused, data=data)
    capped, auto = False, r.time == AUTO
    if auto:
        seconds, capped = time_limit(est.seconds, r.time_margin, (max_time or {}).get((r.partition, r.qos)))
        r = dataclasses.replace(r, time=format_time(seconds))
    memory = None
    if r.mem_gb == AUTO:
        memory = task_memory(specs, r, evidence, fused=fused, data=data)
        r = dataclasses.replace(r, mem_gb=memory.gb)
    return Task(
        specs=tuple(specs),
        fused=fused,
        resources=r,
        estimate=est,
        auto=auto,
        capped=capped,
        memory=memory,
        pack_detail=pack_detail,
    )


def arrays(tasks: Iterable[Task]) -> dict[Resources, list[Task]]:
    """Pure: the tasks by the resources they ask for (time limit included), in the order they first appear: one
    job array each (chunked by MaxArraySize when submitted)."""
    out: dict[Resources, list[Task]] = {}
    for task in tasks:
        out.setdefault(task.resources, []).append(task)
    return out


def _short_limit(i: int, r: Resources, members: list[Task]) -> str | None:
    """Pure: why set ``i``'s fixed time limit is below its longest task's estimate x ``time_margin``, if it is:
    such tasks reach their limit and requeue again and again (each resuming from its last checkpoint, but paying
    start-up and a part-epoch each time)."""
    if members[0].auto:
        return None
    longest = max(members, key=lambda t: t.estimate.seconds)
    wanted = longest.estimate.seconds * r.time_margin
    if wanted <= longest.limit_s:
        return None
    estimated = format_time(round(longest.estimate.seconds))
    return (
        f"group {i}'s time {r.time} is below its longest task's estimate, {estimated} ({longest.estimate.source}), "
        f"x time_margin {r.time_margin:g} = {format_time(round(wanted))}: its tasks would reach the limit and "
        "requeue; use time: auto, or a longer time"
    )


def short_limits(tasks: list[Task]) -> list[str]:
    """Pure: ``_short_limit`` of every set of equal resources that has one."""
    found = (_short_limit(i, r, members) for i, (r, members) in enumerate(arrays(tasks).items(), 1))
    return [line for line in found if line]


def _per_gpu(runs: int, gpus: int) -> str:
    """ "2 per GPU, 4 per task": how a whole node's task spreads its runs over the node's GPUs (round robin)."""
    fewest, most = runs // gpus, -(-runs // gpus)
    return f"{fewest if fewest == most else f'{fewest}-{most}'} per GPU, {runs} per task"


def describe(tasks: list[Task], *, max_array_size: int, local: bool = False) -> list[str]:
    """Pure: a line per set of equal resources (its array tasks and the runs they hold, the resources, estimated
    and reserved device-hours, where the estimates came from), then the total; and a warning per set whose
    ``time: auto`` limit the partition's MaxTime (or the QOS's MaxWall) cut. Reserved is tasks x time limit x GPUs
    (CPUs) per task: what the sbatch calls ask for. ``local``: the tasks run on this machine (``local_resources``),
    in no partition and no job array."""
    lines: list[str] = []
    totals: dict[str, float] = {}
    n_arrays = 0
    by_resources = arrays(tasks)
    for i, (r, members) in enumerate(by_resources.items(), 1):
        unit = members[0].unit
        estimated = sum(t.hours(t.estimate.seconds) for t in members)
        reserved = sum(t.hours(t.limit_s) for t in members)
        sources: dict[str, int] = {}
        for t in members:
            sources[t.estimate.source] = sources.get(t.estimate.source, 0) + 1
        runs = sum(len(t.specs) for t in members)
        fused = [t for t in members if t.fused]
        held = (
            f"fused groups of up to {max(len(t.specs) for t in fused)}"
            if fused
            else _per_gpu(r.runs_per_task, r.gpus_per_node)
            if r.exclusive and r.gpus_per_node and r.runs_per_task > 1
            else f"packed {r.pack} per task"
            if r.runs_per_task > 1
            else "one run each"
        )
        memory = members[0].memory
        mem = (
            ("all the node's memory" if r.exclusive else "default memory")
            if r.mem_gb is None
            else f"{r.mem_gb:g} GB" + (" (auto)" if memory else "")
        )
        auto = " (auto)" if members[0].auto else ""
        arrays_here = 0 if local else -(-len(members) // max_array_size)
        n_arrays += arrays_here
        gpus = plural(r.gpus_per_node, "GPU") + (f" ({r.gpu_type})" if r.gpu_type else "")
        cpus = plural(r.cpus_per_task, "CPU")
        if r.processes > 1:  # one run on several processes: "2 nodes x 4 GPUs per run, 8 CPUs per process"
            processes = f"{r.tasks_per_node} process" + "es" * (r.tasks_per_node != 1)
            each = gpus if r.gpus_per_node else f"{processes} on CPUs (gloo)"
            gpus, cpus = f"{plural(r.nodes, 'node')} x {each} per run", f"{cpus} per process"
        where = (
            "this machine"
            if local
            else f"{mem}, time {r.time}{auto}, partition {r.partition or '(default)'}"
            + (f", constraint {r.constraint}" if r.constraint else "")
            + f"; {plural(arrays_here, 'array')}"
        )
        whole = " (exclusive)" if r.exclusive else ""
        lines.append(
            f"group {i}: {plural(len(members), 'whole-node task' if whole else 'task')}{whole} holding "
            f"{plural(runs, 'run')} ({held}), {gpus}, "
            f"{cpus}, {where}; estimated {estimated:.1f} {unit}, reserved "
            f"{reserved:.1f} {unit}; estimates: " + ", ".join(f"{n} from {src}" for src, n in sources.items())
        )
        if memory:
            lines.append(f"  memory: {memory.source}: {memory.detail}")
        if members[0].pack_detail:
            lines.append(f"  {members[0].pack_detail}")
        if short := _short_limit(i, r, members):
            lines.append(f"  warning: {short}")
        if any(t.capped for t in members):
            lines.append(
                f"  warning: group {i}'s tasks are estimated to need more than the partition's MaxTime (or the QOS's "
                f"MaxWall); they are limited to {r.time} and carried across limits by requeue and resume"
            )
        for t in members:
            if r.exclusive and not t.fused and len(t.specs) < r.gpus_per_node:
                lines.append(
                    f"  note: group {i} has a task of {plural(len(t.specs), 'run')} on a whole node of "
                    f"{plural(r.gpus_per_node, 'GPU')}: it leaves {r.gpus_per_node - len(t.specs)} of them idle"
                )
            elif not t.fused and len(t.specs) < r.runs_per_task:
                lines.append(
                    f"  note: group {i} has a task of {plural(len(t.specs), 'run')}, not {r.pack}: the runs of its "
                    f"resources do not divide into packs of {r.pack}"
                )
        for key, value in ((f"estimated {unit}", estimated), (f"reserved {unit}", reserved)):
            totals[key] = totals.get(key, 0.0) + value
    hours = ", ".join(f"{k} {v:.1f}" for k, v in totals.items())
    runs = sum(len(t.specs) for t in tasks)
    arrays_said = "" if local else f", {plural(n_arrays, 'array')}"
    lines.append(
        f"total: {plural(runs, 'run')} in {plural(len(tasks), 'task')}, {plural(len(by_resources), 'group')}"
        f"{arrays_said}; {hours}"
    )
    return lines
