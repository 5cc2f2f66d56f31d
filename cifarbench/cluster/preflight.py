"""What a grid asks SLURM for, checked against what the cluster offers before anything is queued.

The cluster's limits are read once for a whole grid, in at most three calls: ``scontrol`` for the partitions and
for the nodes, and ``sacctmgr`` for the accounts and QOS when accounting is on. The parsers and the checks are
pure functions of that text (unit-tested on recorded output); ``read_limits`` is the only part that runs
anything.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cifarbench.cluster.memory import Memory
from cifarbench.cluster.plan import Task
from cifarbench.config.resources import Resources, parse_time
from cifarbench.errors import UsageError, did_you_mean, plural
from cifarbench.store.datasets import DataError, check_dataset

# --all: hidden partitions take jobs too, and without it scontrol leaves them out
PARTITIONS_CMD = ["scontrol", "--all", "--oneliner", "show", "partition"]
NODES_CMD = ["scontrol", "--all", "--oneliner", "show", "node"]
# One call for both names: every account has an association on the cluster, and each association lists the
# QOS it may use. Associations of other clusters that share the database count as known.
ASSOCIATIONS_CMD = ["sacctmgr", "--noheader", "--parsable2", "show", "association", "format=account,qos"]
_NO_LIMIT = ("UNLIMITED", "INFINITE")
_CLOSED = ("DRAIN", "INACTIVE")  # sbatch refuses jobs for these; a DOWN partition queues them
_LISTED = 10  # names shown after a did-you-mean; a big site has thousands of accounts


class ClusterError(UsageError):
    """The cluster did not say what its limits are."""


@dataclass(frozen=True, kw_only=True)
class Partition:
    name: str
    default: bool
    state: str
    max_time: int | None  # seconds; None: no limit
    max_cpus_per_node: int | None
    max_mem_per_node_mb: int | None
    max_mem_per_cpu_mb: int | None = None  # MaxMemPerCPU: a job asking more per CPU is given more CPUs


@dataclass(frozen=True, kw_only=True)
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    partitions: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ClusterLimits:
    partitions: dict[str, Partition]
    nodes: tuple[Node, ...]
    accounts: frozenset[str] | None = None  # None: not known (accounting off, or not asked)
    qos: frozenset[str] | None = None

    def partition(self, name: str | None) -> Partition | None:
        """The partition ``name``, or the default one for None; None where there is no such partition."""
        if name is not None:
            return self.partitions.get(name)
        return next((p for p in self.partitions.values() if p.default), None)

    def capacities(self, partition: Partition) -> list[tuple[int, int, int]]:
        """(GPUs, CPUs, memory in MB) one job may have on each node of ``partition``."""
        cpus, mem = partition.max_cpus_per_node, partition.max_mem_per_node_mb
        return [
            (
                n.gpus,
                n.cpus if cpus is None else min(n.cpus, cpus),
                n.memory_mb if mem is None else min(n.memory_mb, mem),
            )
            for n in self.nodes
            if partition.name in n.partitions
        ]


# --- parsing ----------------------------------------------------------------------------------------------------


def parse_fields(line: str) -> dict[str, str]:
    """One record of ``scontrol --oneliner``: ``Key=value`` words. Some values hold spaces (``OS=Linux 6.1 #1 SMP``,
    ``Reason=Not responding``): a word that does not start a new key belongs to the value before it."""
    fields: dict[str, str] = {}
    key = None
    for word in line.split():
        name, eq, value = word.partition("=")
        if eq and name.isidentifier():
            key, fields[name] = name, value
        elif key is not None:
            fields[key] += " " + word
    return fields


def _number(text: str | None) -> int | None:
    return None if text is None or text in _NO_LIMIT else int(text)


def parse_partitions(text: str) -> dict[str, Partition]:
    """``scontrol --all --oneliner show partition`` -> partition name -> Partition."""
    partitions = {}
    for line in text.splitlines():
        f = parse_fields(line)
        if "PartitionName" not in f:
            continue
        time = f.get("MaxTime", "UNLIMITED")
        partitions[f["PartitionName"]] = Partition(
            name=f["PartitionName"],
            default=f.get("Default") == "YES",
            state=f.get("State", "UP"),
            max_time=None if time in _NO_LIMIT else parse_time(time),
            max_cpus_per_node=_number(f.get("MaxCPUsPerNode")),
            max_mem_per_node_mb=_number(f.get("MaxMemPerNode")),
            max_mem_per_cpu_mb=_number(f.get("MaxMemPerCPU")),
        )
    return partitions


def gpu_count(gres: str) -> int:
    """GPUs in a node's ``Gres``: "gpu:2", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2,shard:8", "(null)"."""
    count = 0
    for item in gres.split(","):  # a "(S:0,1)" socket list splits too; its pieces name no gpu
        kind, _, rest = item.partition(":")
        if kind == "gpu" and rest:
            number = rest.split("(")[0].rsplit(":", 1)[-1]
            count += int(number) if number.isdigit() else 0
    return count


def parse_nodes(text: str) -> list[Node]:
    """``scontrol --all --oneliner show node`` -> one Node per node."""
    nodes = []
    for line in text.splitlines():
        f = parse_fields(line)
        if "NodeName" not in f:
            continue
        nodes.append(
            Node(
                name=f["NodeName"],
                # CPUEfctv leaves out the cores a node reserves for its daemons (SLURM >= 22.05)
                cpus=int(f.get("CPUEfctv", f.get("CPUTot", "0"))),
                memory_mb=int(f.get("RealMemory", "0")),
                gpus=gpu_count(f.get("Gres", "")),
                partitions=tuple(p for p in f.get("Partitions", "").split(",") if p),
            )
        )
    return nodes


def parse_associations(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """``sacctmgr -nP show association format=account,qos`` -> (account names, QOS names)."""
    accounts: set[str] = set()
    qos: set[str] = set()
    for line in text.splitlines():
        account, _, names = line.strip().partition("|")
        if account:
            accounts.add(account)
        qos.update(q for q in names.split(",") if q)
    return frozenset(accounts), frozenset(qos)


# --- asking the cluster -----------------------------------------------------------------------------------------


def _run(args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(args, 127, stdout="", stderr=str(e))


def read_limits(
    *, run: Callable[[list[str]], subprocess.CompletedProcess] | None = None, accounting: bool = True
) -> ClusterLimits:
    """The cluster's partitions and nodes, and with ``accounting`` its accounts and QOS (False saves the sacctmgr
    call for a grid that names neither). ``run`` runs a command (tests give recorded output); by default the real
    binaries. Raises ClusterError when scontrol does not answer."""
    run = run or _run
    texts = []
    for args in (PARTITIONS_CMD, NODES_CMD):
        out = run(args)
        if out.returncode != 0:
            said = " ".join((out.stderr or out.stdout).split()) or f"exit code {out.returncode}"
            raise ClusterError(
                f"cannot read the cluster's limits: `{' '.join(args)}` failed ({said}); "
                "check that SLURM answers with `scontrol ping`"
            )
        texts.append(out.stdout)
    accounts = qos = None
    if accounting:
        out = run(ASSOCIATIONS_CMD)
        # sacctmgr fails without accounting storage; a database always holds root's association, so empty
        # output means nothing is known either, not that every account is unknown
        if out.returncode == 0 and out.stdout.strip():
            accounts, qos = parse_associations(out.stdout)
    return ClusterLimits(
        partitions=parse_partitions(texts[0]), nodes=tuple(parse_nodes(texts[1])), accounts=accounts, qos=qos
    )


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
    partition = limits.partition(resources.partition)
    if partition is None:
        problems.append(_no_partition(resources.partition, limits))
    else:
        problems += _partition_problems(resources, partition, limits, memory)
    for key, name, known, what in (
        ("account", resources.account, limits.accounts, "account"),
        ("qos", resources.qos, limits.qos, "QOS"),
    ):
        if name is not None and known is not None and name not in known:
            problems.append(f"slurm.{key}: unknown {what} {name!r}{did_you_mean(name, known)}; known: {_list(known)}")
    return problems


def _no_partition(name: str | None, limits: ClusterLimits) -> str:
    names = list(limits.partitions)
    if name is None:
        return f"slurm.partition: not set, and the cluster has no default partition; set it to one of: {_list(names)}"
    return (
        f"slurm.partition: no partition {name!r} on this cluster{did_you_mean(name, names)}; partitions: {_list(names)}"
    )


def _partition_problems(
    resources: Resources, partition: Partition, limits: ClusterLimits, memory: Memory | None = None
) -> list[str]:
    where = f"partition {partition.name!r}" if resources.partition else f"the default partition {partition.name!r}"
    others = [p.name for p in limits.partitions.values() if p is not partition and _fits(resources, p, limits)]
    if partition.state in _CLOSED or not limits.capacities(partition):
        why = f"is {partition.state} and takes no jobs" if partition.state in _CLOSED else "has no nodes"
        return [f"slurm.partition: {where} {why}; choose another" + (f": {_list(others)}" if others else "")]
    elsewhere = f", or use a partition where it fits: {_list(others)}" if others else ""
    problems = []
    seconds, capped = cap_time(parse_time(resources.time), partition)
    if capped:
        problems.append(
            f'slurm.time: "{resources.time}" is longer than {where} allows; set it to at most "{_clock(seconds)}"'
            + elsewhere
        )
    problems += [p + elsewhere for p in _node_problems(resources, limits.capacities(partition), where, memory)]
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
        has = f"at most {plural(most_gpus, 'GPU')}" if most_gpus else "no GPUs"
        fix = f"ask for at most {most_gpus}" if most_gpus else "set it to 0"
        problems.append(f"slurm.gpus_per_node: {gpus}, but the nodes of {where} have {has}; {fix}")
    if cpus > most_cpus:
        problems.append(
            f"slurm.cpus_per_task: {cpus}, but the nodes of {where} have at most {plural(most_cpus, 'CPU')}; "
            f"ask for at most {most_cpus}"
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
        parts = [plural(gpus, "GPU"), plural(cpus, "CPU")] + ([f"{resources.mem_gb:g} GB"] if resources.mem_gb else [])
        problems.append(
            f"slurm: no node of {where} has {', '.join(parts[:-1])} and {parts[-1]} at once; ask for less of one"
        )
    return problems


def _asked(resources: Resources) -> tuple[int, int, int]:
    # submitit writes --mem in whole MB (1 GB = 1024 MB) and one task per node
    mem = resources.mem_gb
    mem_mb = int(mem * 1024) if isinstance(mem, (int, float)) else 0  # "auto" is planned per task before this
    return resources.gpus_per_node, resources.cpus_per_task, mem_mb


def _fits(resources: Resources, partition: Partition, limits: ClusterLimits) -> bool:
    asked = _asked(resources)
    return (
        partition.state not in _CLOSED
        and not cap_time(parse_time(resources.time), partition)[1]
        and any(_within(asked, cap) for cap in limits.capacities(partition))
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


def max_times(limits: ClusterLimits) -> dict[str | None, int | None]:
    """Partition name (None: the default one) -> its MaxTime in seconds (None: no limit), for ``time: auto``."""
    out: dict[str | None, int | None] = {name: p.max_time for name, p in limits.partitions.items()}
    default = limits.partition(None)
    out[None] = default.max_time if default else None
    return out


def without_gpus(resources: Mapping[str, Resources], limits: ClusterLimits) -> tuple[dict[str, Resources], list[str]]:
    """Pure: for a grid that never says how many GPUs its runs take (each has Resources' default, 1), the runs whose
    partition has no GPU on any node ask for none and train on CPUs; with a line per such partition saying so.
    Runs whose resources cannot train on CPUs (a GPU type, ``pack: auto``) are left for preflight to refuse."""
    changed: dict[Resources, Resources] = {}
    said: list[str] = []
    for r in dict.fromkeys(resources.values()):
        partition = limits.partition(r.partition)
        if not r.gpus_per_node or partition is None or any(gpus for gpus, _, _ in limits.capacities(partition)):
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


def problems(tasks: Iterable[Task], limits: ClusterLimits | None, *, data: bool = True) -> list[str]:
    """Everything that would make these array tasks fail once queued: resources this cluster refuses or cannot run
    (with ``limits``), and data missing or corrupt under the runs' roots as this host sees them (with ``data``).
    Each resource set and each dataset is checked once, however many runs share it."""
    tasks = list(tasks)
    out = []
    if limits is not None:
        for resources, memory in {t.resources: t.memory for t in tasks}.items():
            out += [p for p in check_resources(resources, limits, memory=memory) if p not in out]
    if data:
        # with the results folder, whose records say which size a missing synthetic dataset had
        datasets = dict.fromkeys((s.dataset, s.data_root, s.verify, s.results) for t in tasks for s in t.specs)
        for dataset, root, verify, results in datasets:
            try:
                check_dataset(dataset, root, verify=verify, results=results)
            except DataError as e:
                out.append(str(e))
    return out
