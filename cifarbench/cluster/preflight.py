"""What a grid asks SLURM for, checked against what the cluster offers and allows (``inventory``) before anything
is queued: one line per problem, saying what to do. The checks are pure functions of the cluster's limits and the
grid's tasks; notes and throttles change what is asked where the cluster would otherwise refuse it or leave it
pending.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from cifarbench.cluster.inventory import (
    ClusterLimits,
    Constraint,
    Partition,
    Qos,
    feature_names,
    node_capacity,
    parse_constraint,
    satisfies,
)
from cifarbench.cluster.memory import Memory
from cifarbench.cluster.plan import Task
from cifarbench.config.resources import Resources, parse_time
from cifarbench.errors import did_you_mean, plural
from cifarbench.store.datasets import DataError, check_dataset

_LISTED = 10  # names shown after a did-you-mean; a big site has thousands of accounts


# --- checks -----------------------------------------------------------------------------------------------------


def cap_time(seconds: int, partition: Partition) -> tuple[int, bool]:
    """``seconds`` within the partition's MaxTime: (seconds to ask for, whether they were cut down)."""
    if partition.max_time is not None and seconds > partition.max_time:
        return partition.max_time, True
    return seconds, False


def check_resources(resources: Resources, limits: ClusterLimits, *, memory: Memory | None = None) -> list[str]:
    """What in ``resources`` this cluster would refuse or could never run, one line each saying what to do.
    ``memory``: where ``mem_gb: auto`` planned the memory, which the lines then name."""
    problems = []
    constraint = None
    if resources.constraint is not None:
        try:
            constraint = parse_constraint(resources.constraint)
        except ValueError as e:
            problems.append(
                f"slurm.constraint: {resources.constraint!r} is not a feature expression ({e}); join feature names "
                'with "&" (and) or "|" (or), grouped by "( )"'
            )
    partition = limits.partition(resources.partition)
    if partition is None:
        problems.append(_no_partition(resources.partition, limits))
    else:
        problems += _partition_problems(resources, partition, limits, memory, constraint)
    problems += _accounting_problems(resources, limits, memory)
    return problems


def _accounting_problems(resources: Resources, limits: ClusterLimits, memory: Memory | None = None) -> list[str]:
    """The account and QOS ``resources`` name, checked against the user's associations, and the limits of its QOS
    that one task breaks alone (MaxWall, MaxTRESPU)."""
    problems = []
    for key, name, known, what in (
        ("account", resources.account, limits.accounts, "account"),
        ("qos", resources.qos, limits.qos, "QOS"),
    ):
        if name is not None and known is not None and name not in known:
            problems.append(f"slurm.{key}: unknown {what} {name!r}{did_you_mean(name, known)}; known: {_list(known)}")
    mine = limits.associations
    if problems or mine is None:
        return problems
    account = resources.account
    if account is not None and account not in mine:
        return [f"slurm.account: {account!r} is not one of your accounts (user {limits.user}); yours: {_list(mine)}"]
    association = limits.association(account)
    if resources.qos is not None and association and association.qos and resources.qos not in association.qos:
        problems.append(
            f"slurm.qos: your account {association.account!r} may not use QOS {resources.qos!r} (user {limits.user}); "
            f"its QOS: {_list(association.qos)}"
        )
    qos = limits.qos_of(resources)
    if qos is None:
        return problems
    if qos.max_wall is not None and parse_time(resources.time) > qos.max_wall:
        problems.append(
            f'slurm.time: "{resources.time}" is longer than QOS {qos.name!r} allows (MaxWall); set it to at most '
            f'"{_clock(qos.max_wall)}", or use time: auto'
        )
    held = _task_tres(resources)
    for name, most in qos.max_tres.items():
        if held.get(name, 0) > most:
            problems.append(_too_much(resources, memory, qos, name, held[name], most))
    return problems


# The Resources field that asks for each TRES a QOS may limit
_TRES_FIELDS = {"cpu": "cpus_per_task", "mem": "mem_gb", "gres/gpu": "gpus_per_node"}


def _task_tres(resources: Resources) -> dict[str, int]:
    """The TRES one task of ``resources`` holds, by the names QOS limits use; memory in MB, where it is set."""
    gpus, cpus, mem_mb = (n * resources.nodes for n in _asked(resources))
    tres = {"cpu": cpus, "node": resources.nodes}
    if gpus:
        tres["gres/gpu"] = gpus
        if resources.gpu_type:  # counted both ways where the site accounts GPUs by type
            tres[f"gres/gpu:{resources.gpu_type}"] = gpus
    if mem_mb:
        tres["mem"] = mem_mb
    return tres


def _tres_said(name: str, amount: int) -> str:
    return f"{name}={amount}M" if name == "mem" else f"{name}={amount}"


def _too_much(resources: Resources, memory: Memory | None, qos: Qos, name: str, held: int, most: int) -> str:
    """The line for a task that holds more of TRES ``name`` than ``qos`` lets a user hold at once: SLURM would keep it
    pending for ever."""
    limit = f"QOS {qos.name!r} lets each user hold at most {_tres_said(name, most)} at once (MaxTRESPU)"
    key = _TRES_FIELDS.get(name.split(":")[0])
    if key is None:
        return f"slurm.qos: each task holds {name}={held}, but {limit}; choose another QOS"
    said, fix = (_mem_said(resources, memory), f"{most * 10 // 1024 / 10:g}") if key == "mem_gb" else (held, most)
    return f"slurm.{key}: {said}, but {limit}, so no task would ever start; ask for at most {fix}"


def _no_partition(name: str | None, limits: ClusterLimits) -> str:
    names = list(limits.partitions)
    if name is None:
        return f"slurm.partition: not set, and the cluster has no default partition; set it to one of: {_list(names)}"
    return (
        f"slurm.partition: no partition {name!r} on this cluster{did_you_mean(name, names)}; partitions: {_list(names)}"
    )


def _partition_problems(
    resources: Resources,
    partition: Partition,
    limits: ClusterLimits,
    memory: Memory | None = None,
    constraint: Constraint | None = None,
) -> list[str]:
    where = f"partition {partition.name!r}" if resources.partition else f"the default partition {partition.name!r}"
    others = [
        p.name for p in limits.partitions.values() if p is not partition and _fits(resources, p, limits, constraint)
    ]
    unable, total, said = _unable(partition, limits)
    if partition.closed or unable == total:
        if partition.closed:
            why = f"is {partition.state} and takes no jobs"
        else:
            why = (
                f"has no node that takes jobs: {plural(total, 'node')} down or drained ({said})"
                if total
                else "has no nodes"
            )
        return [f"slurm.partition: {where} {why}; choose another" + (f": {_list(others)}" if others else "")]
    elsewhere = f", or use a partition where it fits: {_list(others)}" if others else ""
    problems = []
    seconds, capped = cap_time(parse_time(resources.time), partition)
    if capped:
        problems.append(
            f'slurm.time: "{resources.time}" is longer than {where} allows; set it to at most "{_clock(seconds)}"'
            + elsewhere
        )
    kinds = _kind_problems(resources, partition, limits, where, constraint)
    if kinds:  # GPUs of a type or features no node that takes jobs has: the capacities would say "no GPUs"
        return problems + [p + (f"; partitions where it fits: {_list(others)}" if others else "") for p in kinds]
    capacities = limits.capacities(partition, resources.gpu_type)
    problems += [p + elsewhere for p in _node_problems(resources, capacities, where, memory)]
    if not problems and resources.nodes > 1:
        able = _fitting_nodes(resources, partition, limits, constraint)
        if able < resources.nodes:
            problems.append(
                f"slurm: nodes: {resources.nodes}, but {where} has {able} that take jobs and have "
                f"{_said_asked(resources)}; ask for at most nodes: {able}" + elsewhere
            )
    if not problems and constraint is not None and not _a_node_fits(resources, partition, limits, constraint):
        problems.append(
            f"slurm: no node of {where} that matches constraint {resources.constraint!r} has "
            f"{_said_asked(resources)} at once; ask for less, or loosen the constraint" + elsewhere
        )
    per_cpu = partition.max_mem_per_cpu_mb
    _, cpus, mem_mb = _asked(resources)
    if not problems and per_cpu is not None and mem_mb > per_cpu * cpus:
        needed = -(-mem_mb // per_cpu)
        problems.append(
            f"slurm.mem_gb: {_mem_said(resources, memory)} is more than {where}'s MaxMemPerCPU ({per_cpu} MB) x "
            f"{plural(cpus, 'CPU')}, so SLURM would give each task more CPUs than it asks for; ask for "
            f"cpus_per_task: {needed}, or at most {per_cpu * cpus * 10 // 1024 / 10:g} GB"
        )
    return problems


def _unable(partition: Partition, limits: ClusterLimits) -> tuple[int, int, str]:
    """How many nodes of ``partition`` take no jobs now, how many it has, and which they are with their states.
    The nodes that scontrol does not list are FUTURE ones (it lists them only with --future), which take none."""
    listed = limits.nodes_of(partition)
    total = max(partition.total_nodes or 0, len(listed))
    unlisted = total - len(listed)
    down = [f"{n.name} {n.state}" for n in listed if not n.able]
    said = ", ".join(([_list(down)] if down else []) + ([f"{unlisted} FUTURE"] if unlisted else []))
    return len(down) + unlisted, total, said


def _kind_problems(
    resources: Resources, partition: Partition, limits: ClusterLimits, where: str, constraint: Constraint | None
) -> list[str]:
    """The GPU type and the features ``resources`` asks for where no node of ``partition`` has them, or only nodes
    that take no jobs; and a constraint no node matches."""
    nodes = limits.nodes_of(partition)
    problems = []
    gpu_type = resources.gpu_type
    if gpu_type is not None:
        types = {t for n in nodes for t in n.gpu_types if t}
        if gpu_type not in types:
            there = _list(types) or ("none (its GPUs have no type)" if any(n.gpus for n in nodes) else "none")
            problems.append(
                f"slurm.gpu_type: no node of {where} has GPUs of type {gpu_type!r}{did_you_mean(gpu_type, types)}; "
                f"GPU types there: {there}"
            )
        elif not any(n.able and gpu_type in n.gpu_types for n in nodes):
            problems.append(f"slurm.gpu_type: the nodes of {where} with {gpu_type} GPUs are down or drained")
    if constraint is not None:
        features = {f for n in nodes for f in n.features}
        unknown = [
            f"slurm.constraint: no node of {where} has feature {name!r}{did_you_mean(name, features)}; "
            f"features there: {_list(features) or 'none'}"
            for name in feature_names(constraint)
            if name not in features
        ]
        problems += unknown
        if not unknown and not any(satisfies(constraint, n.features) for n in nodes):
            sets = {"&".join(sorted(n.features)) or "none" for n in nodes}
            problems.append(
                f"slurm.constraint: {resources.constraint!r} matches no node of {where}; the features of its nodes: "
                + _list(sets)
            )
        elif not unknown and not any(n.able and satisfies(constraint, n.features) for n in nodes):
            problems.append(
                f"slurm.constraint: the nodes of {where} that match {resources.constraint!r} are down or drained"
            )
    return problems


def _mem_said(resources: Resources, memory: Memory | None) -> str:
    if memory is not None:
        return f"auto asks {memory.gb:g} GB ({memory.source}: {memory.detail})"
    return f"{resources.mem_gb:g}"


def _node_problems(
    resources: Resources, capacities: list[tuple[int, int, int]], where: str, memory: Memory | None = None
) -> list[str]:
    gpus, cpus, mem_mb = asked = _asked(resources)
    most_gpus, most_cpus, most_mb = (max(c[i] for c in capacities) for i in range(3))
    most_gb = most_mb * 10 // 1024 / 10  # rounded down to 0.1 GB, so that asking for it fits
    problems = []
    if gpus > most_gpus:
        gpu = f"{resources.gpu_type} GPU" if resources.gpu_type else "GPU"
        has = f"at most {plural(most_gpus, gpu)}" if most_gpus else f"no {gpu}s"
        key = "gpus_per_run" if resources.tasks_per_node > 1 else "slurm.gpus_per_node"  # one GPU per process
        zero = "set slurm.gpus_per_node: 0 (its processes train on CPUs)" if key == "gpus_per_run" else "set it to 0"
        fix = f"ask for at most {most_gpus}" if most_gpus else zero
        problems.append(f"{key}: {gpus}, but the nodes of {where} have {has}; {fix}")
    if cpus > most_cpus:
        n = resources.tasks_per_node
        each = f" x {n} processes of a run = {cpus}" if n > 1 else ""
        problems.append(
            f"slurm.cpus_per_task: {resources.cpus_per_task}{each}, but the nodes of {where} have at most "
            f"{plural(most_cpus, 'CPU')}; ask for at most {max(most_cpus // n, 1)}"
        )
    if mem_mb > most_mb:
        fix = (
            f"a smaller batch_size or pack, or mem_gb: {most_gb:g} if the peak is overstated"
            if memory
            else f"ask for at most {most_gb:g}"
        )
        problems.append(
            f"slurm.mem_gb: {_mem_said(resources, memory)}, but the nodes of {where} have at most {most_gb:g} GB "
            f"({most_mb} MB); {fix}"
        )
    if not problems and not any(_within(asked, cap) for cap in capacities):
        problems.append(f"slurm: no node of {where} has {_said_asked(resources)} at once; ask for less of one")
    return problems


def _said_asked(resources: Resources) -> str:
    """What a task asks for of each node as the checks say it: "2 GPUs, 8 CPUs and 64 GB"."""
    gpu = f"{resources.gpu_type} GPU" if resources.gpu_type else "GPU"
    parts = [plural(resources.gpus_per_node, gpu), plural(_asked(resources)[1], "CPU")]
    parts += [f"{resources.mem_gb:g} GB"] if resources.mem_gb else []
    return f"{', '.join(parts[:-1])} and {parts[-1]}"


def _asked(resources: Resources) -> tuple[int, int, int]:
    """What a task asks for of each of its nodes: GPUs, CPUs (every task's there) and memory in MB."""
    # submitit writes --mem (per node) in whole MB (1 GB = 1024 MB)
    mem = resources.mem_gb
    mem_mb = int(mem * 1024) if isinstance(mem, (int, float)) else 0  # "auto" is planned per task before this
    return resources.gpus_per_node, resources.cpus_per_task * resources.tasks_per_node, mem_mb


def _fits(resources: Resources, partition: Partition, limits: ClusterLimits, constraint: Constraint | None) -> bool:
    return (
        not partition.closed
        and not cap_time(parse_time(resources.time), partition)[1]
        and _a_node_fits(resources, partition, limits, constraint)
    )


def _a_node_fits(
    resources: Resources, partition: Partition, limits: ClusterLimits, constraint: Constraint | None
) -> bool:
    """Whether a node of ``partition`` takes jobs, has what ``resources`` asks for and matches ``constraint``."""
    return _fitting_nodes(resources, partition, limits, constraint) > 0


def _fitting_nodes(
    resources: Resources, partition: Partition, limits: ClusterLimits, constraint: Constraint | None
) -> int:
    """How many nodes of ``partition`` take jobs, have what ``resources`` asks of each node and match
    ``constraint``: a run of several nodes needs ``resources.nodes`` of them."""
    asked = _asked(resources)
    return sum(
        n.able
        and _within(asked, node_capacity(n, partition, resources.gpu_type))
        and (constraint is None or satisfies(constraint, n.features))
        for n in limits.nodes_of(partition)
    )


def _within(asked: tuple[int, int, int], capacity: tuple[int, int, int]) -> bool:
    return all(a <= c for a, c in zip(asked, capacity))


def _clock(seconds: int) -> str:
    """Seconds as a SLURM time limit: "HH:MM:SS", or "D-HH:MM:SS" from a day on."""
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _list(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


# --- a submission's checks --------------------------------------------------------------------------------------


def max_times(limits: ClusterLimits, resources: Iterable[Resources]) -> dict[tuple[str | None, str | None], int | None]:
    """(partition, QOS) as ``resources`` name them (None: the default partition, the QOS the association gives) ->
    the longest limit ``time: auto`` may ask for there, in seconds (None: no limit): the smaller of the partition's
    MaxTime and the QOS's MaxWall."""
    out: dict[tuple[str | None, str | None], int | None] = {}
    for r in dict.fromkeys(resources):
        partition = limits.partition(r.partition)
        caps = [partition.max_time if partition else None]
        qos = limits.qos_of(r)
        caps.append(qos.max_wall if qos is not None else None)
        known = [c for c in caps if c is not None]
        out[(r.partition, r.qos)] = min(known) if known else None
    return out


def without_gpus(resources: Mapping[str, Resources], limits: ClusterLimits) -> tuple[dict[str, Resources], list[str]]:
    """Pure: for a grid that never says how many GPUs its runs take (each has Resources' default, 1), the runs whose
    partition has no GPU on any node ask for none and train on CPUs; with a line per such partition saying so.
    Runs whose resources cannot train on CPUs (a GPU type, ``pack: auto``) are left for preflight to refuse."""
    changed: dict[Resources, Resources] = {}
    said: list[str] = []
    for r in dict.fromkeys(resources.values()):
        partition = limits.partition(r.partition)
        # GPUs on nodes that are down or drained count: the partition has GPUs, and its runs wait for them
        if not r.gpus_per_node or partition is None or any(n.gpus for n in limits.nodes_of(partition)):
            continue
        try:
            changed[r] = dataclasses.replace(r, gpus_per_node=0)
        except ValueError:
            continue
        line = (
            f"note: the grid does not set gpus_per_node and the nodes of partition {partition.name!r} have no GPUs: "
            "its runs ask for none and train on CPUs (set slurm.gpus_per_node to choose)"
        )
        if line not in said:
            said.append(line)
    return {run_id: changed.get(r, r) for run_id, r in resources.items()}, said


def node_notes(resources: Iterable[Resources], limits: ClusterLimits) -> list[str]:
    """Pure: a line for each partition that ``resources`` use where some nodes, but not all, take no jobs now (all:
    check_resources refuses it); the checks count only the others, and only they take its runs."""
    said = []
    for partition in dict.fromkeys(limits.partition(r.partition) for r in resources):
        if partition is None:
            continue
        unable, total, which = _unable(partition, limits)
        if 0 < unable < total:
            said.append(
                f"note: {unable} of {total} nodes of partition {partition.name!r} are down or drained ({which}); "
                f"only the other {plural(total - unable, 'node')} can take its runs"
            )
    return said


def throttle(resources: Mapping[str, Resources], limits: ClusterLimits) -> tuple[dict[str, Resources], list[str]]:
    """Pure: ``array_parallelism`` lowered to the tasks the runs' QOS lets one user run at once (MaxJobsPU, and
    MaxTRESPU over what each task holds), rather than leaving the rest pending on the QOS; with a note line for
    each change. A task that alone holds more than MaxTRESPU is left for the checks to refuse."""
    changed: dict[Resources, Resources] = {}
    said: list[str] = []
    for r in dict.fromkeys(resources.values()):
        qos = limits.qos_of(r)
        if qos is None:
            continue
        held = _task_tres(r)
        fits = [
            (n // held[name], f"MaxTRESPU {_tres_said(name, n)}") for name, n in qos.max_tres.items() if held.get(name)
        ]
        fits += [(qos.max_jobs, f"MaxJobsPU {qos.max_jobs}")] if qos.max_jobs is not None else []
        most = min((n for n, _ in fits if n >= 1), default=r.array_parallelism)
        if most >= r.array_parallelism:
            continue
        changed[r] = dataclasses.replace(r, array_parallelism=most)
        why = ", ".join(w for n, w in fits if n == most)
        line = (
            f"note: QOS {qos.name!r} lets each user run {plural(most, 'such task')} at once ({why}): array_parallelism "
            f"{r.array_parallelism} -> {most} for its runs"
        )
        if line not in said:
            said.append(line)
    return {run_id: changed.get(r, r) for run_id, r in resources.items()}, said


def _submit_problems(tasks: list[Task], limits: ClusterLimits) -> list[str]:
    """A line for each QOS whose MaxSubmitJobsPU the array tasks break, counted with the user's jobs already queued
    in it: to SLURM each array task is a job, so sbatch refuses the array however few tasks run at once."""
    by_qos: dict[str, tuple[int, list[Task]]] = {}  # QOS name -> (its MaxSubmitJobsPU, its tasks)
    for t in tasks:
        qos = limits.qos_of(t.resources)
        if qos is not None and qos.max_submit is not None:
            by_qos.setdefault(qos.name, (qos.max_submit, []))[1].append(t)
    out = []
    for name, (most, members) in by_qos.items():
        queued = limits.queued.get(name, 0)
        allowed = max(most - queued, 0)
        if len(members) <= allowed:
            continue
        runs = sum(len(t.specs) for t in members)
        now = f"; {queued} {'is' if queued == 1 else 'are'} queued now, so {allowed} more" if queued else ""
        fix = (
            f"put more runs in each task (pack: {-(-runs // allowed)} or more), or submit fewer runs"
            if allowed
            else "wait until some of them end"
        )
        out.append(
            f"slurm.qos: QOS {name!r} lets user {limits.user} have {plural(most, 'job')} queued or running "
            f"(MaxSubmitJobsPU; each array task is one job){now}, but this grid makes "
            f"{plural(len(members), 'array task')}; {fix}; array_parallelism does not help (it limits running tasks, "
            "not queued ones)"
        )
    return out


def problems(tasks: Iterable[Task], limits: ClusterLimits | None, *, data: bool = True) -> list[str]:
    """Everything that would make these array tasks fail once queued: resources this cluster refuses or cannot run
    (with ``limits``), and data missing or corrupt under the runs' roots as this host sees them (with ``data``).
    Each resource set and each dataset is checked once, however many runs share it."""
    tasks = list(tasks)
    out = []
    if limits is not None:
        for resources, memory in {t.resources: t.memory for t in tasks}.items():
            out += [p for p in check_resources(resources, limits, memory=memory) if p not in out]
        out += _submit_problems(tasks, limits)
    if data:
        # with the results folder, whose records say which size a missing synthetic dataset had
        datasets = dict.fromkeys((s.dataset, s.data_root, s.verify, s.results) for t in tasks for s in t.specs)
        for dataset, root, verify, results in datasets:
            try:
                check_dataset(dataset, root, verify=verify, results=results)
            except DataError as e:
                out.append(str(e))
    return out
