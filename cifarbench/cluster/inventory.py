"""What the cluster offers and allows, as SLURM's commands print it: its partitions and nodes (their GPUs by type,
features and states), the submitting user's associations, every QOS's limits and the jobs the user has queued.

The cluster is asked once for a whole grid, in three calls: one ``scontrol`` for the partitions and the nodes, and
when accounting is on ``sacctmgr`` for the users' associations and for the QOS limits (the two at once); and a
fourth, ``squeue`` for the user's queued jobs, only where a QOS caps how many they may have. The parsers are pure
functions of that text (unit-tested on recorded output); ``read_limits`` is the only part that runs anything.
``preflight`` checks a grid against what it returns.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeAlias

from cifarbench.config.resources import Resources, parse_time
from cifarbench.errors import UsageError

# One scontrol process for the partitions and the nodes: without a command on its command line it reads commands
# from its standard input (and echoes a "scontrol: ..." prompt line the parsers skip). --all: hidden partitions take
# jobs too, and without it scontrol leaves them out.
SCONTROL_CMD = ["scontrol", "--all", "--oneliner"]
SCONTROL_INPUT = "show partition\nshow node\n"
_SACCTMGR = ["sacctmgr", "--noheader", "--parsable2", "show"]
# Every user's associations, one line each (user|default account|account|QOS|default QOS): other users' lines tell
# an account that is not the submitting user's from one that does not exist, and only this listing says which
# account is a user's default. Associations of other clusters that share the database count as known.
ASSOCIATIONS_CMD = [*_SACCTMGR, "user", "withassoc", "format=user,defaultaccount,account,qos,defaultqos"]
# Every QOS, with the limits a submission can break (an empty field: no limit)
QOS_CMD = [*_SACCTMGR, "qos", "format=name,maxwall,maxsubmitpu,maxjobspu,maxtrespu"]
_NO_LIMIT = ("UNLIMITED", "INFINITE")
_CLOSED = ("DRAIN", "INACTIVE")  # sbatch refuses jobs for these; a DOWN partition queues them
# Node states (a base state and flags joined by "+": IDLE+DRAIN, DOWN+NOT_RESPONDING) in which a node takes no new
# job: down, drained or draining (MIXED+DRAIN still runs its jobs), failing, not in service yet (FUTURE), or
# registered with less than slurm.conf says. A powered-down node is resumed for a job, a reservation (RESERVED,
# MAINTENANCE) ends, and a node that stops answering is back or marked DOWN within SlurmdTimeout: those count.
_UNABLE = frozenset(
    ("DOWN", "DRAIN", "DRAINED", "DRAINING", "FAIL", "FAILING", "FUTURE", "INVAL", "INVALID", "INVALID_REG")
)


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
    # TotalNodes, FUTURE nodes included, which `scontrol show node` does not list; None: the nodes listed
    total_nodes: int | None = None

    @property
    def closed(self) -> bool:
        """Whether sbatch refuses jobs for the partition itself (whatever its nodes)."""
        return self.state in _CLOSED


@dataclass(frozen=True, kw_only=True)
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    partitions: tuple[str, ...]
    gpu_types: Mapping[str, int] = dataclasses.field(default_factory=dict)  # "" for GPUs of no type
    features: frozenset[str] = frozenset()
    state: str = ""  # as scontrol says it; "": not said

    @property
    def able(self) -> bool:
        """Whether the node takes new jobs (see _UNABLE)."""
        # older scontrol marks a node that does not answer with "*" (DOWN*)
        return not _UNABLE & {s.rstrip("*") for s in self.state.split("+")}

    def gpus_of(self, gpu_type: str | None) -> int:
        """The node's GPUs of ``gpu_type``; all of them for None."""
        return self.gpus if gpu_type is None else self.gpu_types.get(gpu_type, 0)


@dataclass(frozen=True, kw_only=True)
class Association:
    """One of the submitting user's accounts (its associations with single partitions merged): the QOS its jobs may
    ask for, and the one they are given when they ask for none."""

    account: str
    qos: frozenset[str]
    default_qos: str | None = None

    @property
    def given_qos(self) -> str:
        """The QOS of a job that names none: the default QOS, else the only one; else slurmctld gives "normal" (or
        the root association's default QOS, which a site rarely sets)."""
        if self.default_qos:
            return self.default_qos
        return next(iter(self.qos)) if len(self.qos) == 1 else "normal"


@dataclass(frozen=True, kw_only=True)
class Qos:
    """A QOS's limits on each job and on all of one user's jobs together; None: no limit."""

    name: str
    max_wall: int | None = None  # MaxWall: seconds, each job
    max_submit: int | None = None  # MaxSubmitJobsPU: jobs queued or running, each array task one job
    max_jobs: int | None = None  # MaxJobsPU: jobs running at once
    # MaxTRESPU: what the user's running jobs hold together, by TRES name: "cpu", "mem" (MB), "node", "gres/gpu",
    # "gres/gpu:a100"
    max_tres: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ClusterLimits:
    partitions: dict[str, Partition]
    nodes: tuple[Node, ...]
    accounts: frozenset[str] | None = None  # every user's; None: not known (accounting off, or not asked)
    qos: frozenset[str] | None = None  # every QOS's name
    user: str = ""  # who submits: whose associations and queued jobs these are
    associations: Mapping[str, Association] | None = None  # the user's, by account; None: not known
    default_account: str | None = None  # the user's
    qos_limits: Mapping[str, Qos] = dataclasses.field(default_factory=dict)  # every QOS's limits, by name
    queued: Mapping[str, int] = dataclasses.field(default_factory=dict)  # QOS -> the user's jobs in it now

    def association(self, account: str | None) -> Association | None:
        """The user's association with ``account`` (None: their default account); None where it is not theirs, or
        not known."""
        if self.associations is None:
            return None
        return self.associations.get(account if account is not None else self.default_account or "")

    def qos_of(self, resources: Resources) -> Qos | None:
        """The limits of the QOS a task of ``resources`` is given: the one it names, else its association's; None
        where not known."""
        association = self.association(resources.account)
        name = resources.qos or (association.given_qos if association else None)
        return self.qos_limits.get(name) if name else None

    def partition(self, name: str | None) -> Partition | None:
        """The partition ``name``, or the default one for None; None where there is no such partition."""
        if name is not None:
            return self.partitions.get(name)
        return next((p for p in self.partitions.values() if p.default), None)

    def nodes_of(self, partition: Partition) -> list[Node]:
        """The nodes of ``partition`` that scontrol listed, whatever their state."""
        return [n for n in self.nodes if partition.name in n.partitions]

    def capacities(self, partition: Partition, gpu_type: str | None = None) -> list[tuple[int, int, int]]:
        """(GPUs, CPUs, memory in MB) one job may have on each node of ``partition`` that takes jobs; with
        ``gpu_type``, GPUs of that type only."""
        return [node_capacity(n, partition, gpu_type) for n in self.nodes_of(partition) if n.able]


def node_capacity(node: Node, partition: Partition, gpu_type: str | None) -> tuple[int, int, int]:
    """(GPUs, CPUs, memory in MB) one job may have on ``node`` in ``partition``, whose caps apply to each node; with
    ``gpu_type``, GPUs of that type only: SLURM does not meet a typed request with GPUs of another type."""
    cpus, mem = partition.max_cpus_per_node, partition.max_mem_per_node_mb
    return (
        node.gpus_of(gpu_type),
        node.cpus if cpus is None else min(node.cpus, cpus),
        node.memory_mb if mem is None else min(node.memory_mb, mem),
    )


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
            total_nodes=_number(f.get("TotalNodes")),
        )
    return partitions


def gpu_types(gres: str) -> dict[str, int]:
    """GPUs by type in a node's ``Gres``, "" for GPUs of no type: "gpu:2", "gpu:a100:4(S:0-1)",
    "gpu:a100:2,gpu:v100:2,shard:8", "(null)"."""
    types: dict[str, int] = {}
    for item in gres.split(","):  # a "(S:0,1)" socket list splits too; its pieces name no gpu
        kind, _, rest = item.partition(":")
        if kind == "gpu" and rest:
            name, _, number = rest.split("(")[0].rpartition(":")
            if number.isdigit():
                types[name] = types.get(name, 0) + int(number)
    return types


def gpu_count(gres: str) -> int:
    """GPUs in a node's ``Gres``, of any type."""
    return sum(gpu_types(gres).values())


def _names(text: str) -> frozenset[str]:
    return frozenset(n for n in text.split(",") if n and n != "(null)")


def parse_nodes(text: str) -> list[Node]:
    """``scontrol --all --oneliner show node`` -> one Node per node."""
    nodes = []
    for line in text.splitlines():
        f = parse_fields(line)
        if "NodeName" not in f:
            continue
        types = gpu_types(f.get("Gres", ""))
        nodes.append(
            Node(
                name=f["NodeName"],
                # CPUEfctv leaves out the cores a node reserves for its daemons (SLURM >= 22.05)
                cpus=int(f.get("CPUEfctv", f.get("CPUTot", "0"))),
                memory_mb=int(f.get("RealMemory", "0")),
                gpus=sum(types.values()),
                partitions=tuple(p for p in f.get("Partitions", "").split(",") if p),
                gpu_types=types,
                # Available, not Active: a node_features plugin (KNL modes) reboots a node into an available
                # feature a job asks for, so the job runs there; without such a plugin the two are the same.
                # "Features" in older versions.
                features=_names(f.get("AvailableFeatures", f.get("Features", ""))),
                state=f.get("State", ""),
            )
        )
    return nodes


def parse_associations(text: str, user: str) -> tuple[frozenset[str], dict[str, Association], str | None]:
    """``sacctmgr -nP show user withassoc format=user,defaultaccount,account,qos,defaultqos`` -> (every user's
    accounts, ``user``'s associations by account, ``user``'s default account)."""
    accounts: set[str] = set()
    qos: dict[str, set[str]] = {}
    default_qos: dict[str, str] = {}
    default_account = None
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 5 or not fields[2]:
            continue
        name, default, account, names, default_name = fields[:5]
        accounts.add(account)
        if name.lower() != user.lower():  # SLURM keeps user names in lower case
            continue
        default_account = default or default_account
        qos.setdefault(account, set()).update(q for q in names.split(",") if q)
        if default_name:
            default_qos.setdefault(account, default_name)
    mine = {a: Association(account=a, qos=frozenset(q), default_qos=default_qos.get(a)) for a, q in qos.items()}
    return frozenset(accounts), mine, default_account


_MB = {"M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}  # sacctmgr prints memory with a unit


def parse_tres(text: str) -> dict[str, int]:
    """A TRES list as sacctmgr prints it, "cpu=16,gres/gpu=4,mem=100G" -> TRES name -> amount, memory in MB."""
    tres = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        number, unit = (value[:-1], value[-1]) if value[-1:] in _MB else (value, "M")
        if name and number.isdigit():
            tres[name] = int(number) * _MB[unit]
    return tres


def parse_qos(text: str) -> dict[str, Qos]:
    """``sacctmgr -nP show qos format=name,maxwall,maxsubmitpu,maxjobspu,maxtrespu`` -> QOS name -> Qos."""
    out = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 5 or not fields[0]:
            continue
        name, wall, submit, jobs, tres = fields[:5]
        out[name] = Qos(
            name=name,
            max_wall=None if not wall or wall in _NO_LIMIT else parse_time(wall),
            max_submit=_number(submit or None),
            max_jobs=_number(jobs or None),
            max_tres=parse_tres(tres),
        )
    return out


def parse_queued(text: str) -> dict[str, int]:
    """``squeue -h -r -u USER -o %q`` -> QOS -> the user's jobs in it, each array task one."""
    return dict(Counter(q for q in (line.strip() for line in text.splitlines()) if q))


# --- node features ----------------------------------------------------------------------------------------------

# slurm.constraint as sbatch reads it: a feature name, or (operator, left, right) with "&" (and) or "|" (or)
Constraint: TypeAlias = "str | tuple[str, Constraint, Constraint]"
_OPERATORS = {"&": "&", ",": "&", "|": "|"}  # "," is an older spelling of "&"
_GROUPS = {"(": ")", "[": "]"}
_CONSTRAINT_TOKEN = re.compile(r"[&,|()\[\]]|\*\d+|[^&,|()\[\]*]+")


def parse_constraint(text: str) -> Constraint:
    """``slurm.constraint`` -> a Constraint. SLURM gives "&" and "|" no precedence: "a|b&c" is "(a|b)&c". Node
    counts ("a*2") and brackets ("[rack1|rack2]": one rack for all the job's nodes) say how a job's nodes share
    features; a run takes one node, so a count is left out and brackets group like parentheses. Raises ValueError
    saying what is wrong where the text is no expression; sbatch's finer rules (no nested parentheses, counts on
    each feature inside "[ & ]") are left to sbatch."""
    tokens = _CONSTRAINT_TOKEN.findall(text)
    if "".join(tokens) != text:
        raise ValueError('"*" is a node count: a feature name, "*", then digits')
    return _group(iter(tokens), None)


def _group(tokens: Iterator[str], close: str | None) -> Constraint:
    expr: Constraint | None = None
    op = None
    for token in tokens:
        if token == close:
            break
        if token in _OPERATORS or token.startswith("*"):
            if expr is None or op is not None:
                raise ValueError(f"{token!r} follows no feature")
            op = _OPERATORS.get(token)  # a count is left out (see parse_constraint)
        elif token in (")", "]"):
            raise ValueError(f"{token!r} closes nothing")
        else:
            operand = _group(tokens, _GROUPS[token]) if token in _GROUPS else token
            if expr is None:
                expr = operand
            elif op is None:
                raise ValueError(f"no operator before {token!r}")
            else:
                expr, op = (op, expr, operand), None
    else:
        if close is not None:
            raise ValueError(f"no {close!r}")
    if expr is None:
        raise ValueError("an empty group")
    return expr  # a trailing operator is left out, as sbatch does


def satisfies(constraint: Constraint, features: frozenset[str]) -> bool:
    """Whether a node with ``features`` matches ``constraint``."""
    if isinstance(constraint, str):
        return constraint in features
    op, left, right = constraint
    if op == "&":
        return satisfies(left, features) and satisfies(right, features)
    return satisfies(left, features) or satisfies(right, features)


def feature_names(constraint: Constraint) -> list[str]:
    """The features ``constraint`` names, each once, in order."""
    if isinstance(constraint, str):
        return [constraint]
    return list(dict.fromkeys(feature_names(constraint[1]) + feature_names(constraint[2])))


# --- asking the cluster -----------------------------------------------------------------------------------------


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return subprocess.CompletedProcess(args, 127, stdout="", stderr=str(e))


def queued_cmd(user: str) -> list[str]:
    """The QOS of each of ``user``'s jobs in the queue, pending or running; an array's tasks one line each."""
    return ["squeue", "--noheader", "--array", "--user", user, "--format", "%q"]


def read_limits(
    *,
    run: Callable[..., subprocess.CompletedProcess] | None = None,
    accounting: bool = True,
    user: str | None = None,
) -> ClusterLimits:
    """The cluster's partitions and nodes, and with ``accounting`` the accounts and QOS of ``user`` (by default who
    runs this), every QOS's limits and, where a QOS caps the jobs a user may queue, how many ``user`` has queued
    (False saves those calls where only partitions and nodes matter): three calls, and a fourth where a QOS caps
    queued jobs. ``run(args, stdin=None)`` runs a command (tests give recorded output); by default the real
    binaries. Raises ClusterError when scontrol does not answer."""
    run = run or _run
    out = run(SCONTROL_CMD, SCONTROL_INPUT)
    if out.returncode != 0 or "PartitionName=" not in out.stdout:
        said = " ".join((out.stderr or out.stdout).split()) or f"exit code {out.returncode}"
        raise ClusterError(
            f"cannot read the cluster's limits: `{' '.join(SCONTROL_CMD)}` (show partition, show node) failed "
            f"({said}); check that SLURM answers with `scontrol ping`"
        )
    text = out.stdout  # partitions and nodes: each parser takes its own lines
    known: dict = {}
    if accounting:
        user = user or pwd.getpwuid(os.getuid()).pw_name  # SLURM knows a job's user by uid, whatever $USER says
        with ThreadPoolExecutor(2) as pool:  # each sacctmgr call waits about a quarter second on slurmdbd
            users, qos = pool.map(run, (ASSOCIATIONS_CMD, QOS_CMD))
        # sacctmgr fails without accounting storage; a database always holds root's association, so empty
        # output means nothing is known either, not that every account is unknown
        if users.returncode == 0 and users.stdout.strip() and qos.returncode == 0:
            accounts, mine, default_account = parse_associations(users.stdout, user)
            every = parse_qos(qos.stdout)
            queued = {}
            if any(q.max_submit is not None for q in every.values()):
                out = run(queued_cmd(user))
                queued = parse_queued(out.stdout) if out.returncode == 0 else {}
            known = dict(
                accounts=accounts,
                qos=frozenset(every),
                user=user,
                # a user with no association submits only where accounting does not enforce associations, and
                # there any account goes
                associations=mine or None,
                default_account=default_account,
                qos_limits=every,
                queued=queued,
            )
    return ClusterLimits(partitions=parse_partitions(text), nodes=tuple(parse_nodes(text)), **known)
