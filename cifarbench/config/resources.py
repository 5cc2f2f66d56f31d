"""What a run asks SLURM for: partition, GPUs, CPUs, memory, time limit, and the checks on each value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cifarbench.errors import check_int, check_name, plural

# sbatch options a grid may add beyond the fields of Resources. An allow-list: any other option either fights
# one that submitit already writes (--time, --array, --gpus-per-node ...) or changes what the job is (--wrap,
# --export, --chdir).
SBATCH_EXTRA = (
    "comment",
    "exclude",
    "hold",
    "mail-type",
    "mail-user",
    "mem-per-gpu",
    "nodelist",
    "reservation",
)
# Options that have a field of their own; the error names the field to use instead.
_SBATCH_FIELDS = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "time": "time",
    "gpus-per-node": "gpus_per_node",
    "gpus": "gpus_per_node",
    "gres": "gpus_per_node",
    "cpus-per-task": "cpus_per_task",
    "cpus-per-gpu": "cpus_per_task",
    "mem": "mem_gb",
    "array": "array_parallelism",
    "exclusive": "exclusive",
}
# Names and option values land on "#SBATCH --key=value" lines: sbatch splits those on whitespace, and a
# newline would end the comment and start a shell command.
_UNSAFE = set(";&|$`<>\\'\"() \t\r\n\x00")
_NEWLINE = set("\r\n\x00")
TIME_FORMATS = '"MM:SS", "HH:MM:SS" or "D-HH:MM:SS"'


def parse_time(text: str) -> int:
    """Seconds in a SLURM time limit written as "MM:SS", "HH:MM:SS" or "D-HH:MM:SS"."""
    days, dash, clock = text.partition("-") if "-" in text else ("0", "", text)
    parts = clock.split(":")
    digits = [days, *parts]
    if len(parts) not in ((3,) if dash else (2, 3)) or not all(p.isascii() and p.isdigit() for p in digits):
        raise ValueError(f"time: {text!r} is not a time limit; write {TIME_FORMATS}")
    if any(len(p) != 2 for p in parts[1:]):
        raise ValueError(f"time: {text!r}: minutes and seconds take two digits; write {TIME_FORMATS}")
    values = [int(p) for p in parts]
    if any(v >= 60 for v in values[1:]) or (dash and values[0] >= 24):
        raise ValueError(f"time: {text!r} is out of range: minutes and seconds < 60, hours < 24 after a day count")
    seconds = int(days) * 86400 + sum(v * 60**i for i, v in enumerate(reversed(values)))
    if seconds == 0:
        raise ValueError(f"time: {text!r} is zero; give the job some time")
    return seconds


def _line(value, key: str, bad: set) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: must be a non-empty string, got {value!r}")
    if bad & set(value):
        shown = "".join(sorted(bad & set(value)))
        raise ValueError(f"{key}: {value!r} contains {shown!r}, which is not allowed here")


# container_runtime: the command that runs a container image; None: the first of these on the submitting host's PATH
# (apptainer where neither is found there: the nodes may have it)
CONTAINER_RUNTIMES = ("apptainer", "singularity")
AUTO = "auto"  # time, mem_gb, pack: planned from evidence (cifarbench.cluster.estimate, cifarbench.cluster.memory)
DEFAULT_TIME_MARGIN = 1.5
# mps: whether the runs packed onto one GPU share it through a CUDA MPS server that the job starts (auto: where the
# node has nvidia-cuda-mps-control), or time-slice it
MPS_MODES = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What one SLURM array task asks for, and how the array is run. A grid's ``slurm:`` block is the default;
    its ``resources:`` rules and include entries change fields for some runs.

    Invalid values raise ValueError with a message that starts with the field name (``"time: ..."``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 1
    gpu_type: str | None = None  # the GRES type SLURM knows the GPUs by (e.g. a100): --gres=gpu:a100:N
    gpu_mem_gb: float | None = None  # each GPU's memory, for pack: auto where gpu_type does not say it
    cpus_per_task: int = 4
    mem_gb: float | str | None = None  # None: the partition's default memory; "auto": planned from evidence
    time: str = "04:00:00"  # or "auto"
    time_margin: float = DEFAULT_TIME_MARGIN  # time: auto asks for the estimate times this
    constraint: str | None = None
    array_parallelism: int = 16
    max_requeues: int = 10
    setup: tuple[str, ...] = ()  # shell lines run before the job, e.g. "module load cuda"
    pack: int | str = 1  # runs trained concurrently in one array task, sharing its GPU (or splitting its CPUs); "auto"
    mps: str = "auto"
    exclusive: bool = False  # whole nodes: every GPU and CPU of the node, with pack: K runs on each GPU
    # One run on several processes (DDP): tasks_per_node tasks on each of nodes nodes, one GPU (or none) and
    # cpus_per_task CPUs each. Set from the grid's gpus_per_run and nodes (``config.grid``), not written in a grid.
    tasks_per_node: int = 1
    nodes: int = 1
    # The node's environment: the command that runs Python there (an interpreter, or a launcher prefix such as
    # "conda run -n bench python"; None: this host's sys.executable), and a container image each task runs in
    python: str | None = None
    container: str | None = None  # an Apptainer/Singularity image (IMAGE.sif), run with `exec --nv`
    container_runtime: str | None = None  # "apptainer", "singularity" or a path to one; None: found on the PATH
    extra: tuple[tuple[str, str | int | bool], ...] = ()  # (sbatch option, value); True: a bare flag

    def __post_init__(self):
        for key in ("partition", "account", "qos"):
            if getattr(self, key) is not None:
                _line(getattr(self, key), key, _UNSAFE)
        if self.constraint is not None:
            _line(self.constraint, "constraint", _NEWLINE)  # "a100&ib" and "[rack1|rack2]" are constraint syntax
        for key in ("python", "container", "container_runtime"):
            if getattr(self, key) is not None:
                _line(getattr(self, key), key, _NEWLINE)  # a launcher prefix has spaces; a newline ends the line
        if self.container_runtime is not None and self.container is None:
            raise ValueError("container_runtime: says how to run a container, but no container is set")
        if not isinstance(self.exclusive, bool):
            raise ValueError(f"exclusive: must be true or false, got {self.exclusive!r}")
        check_int(self.gpus_per_node, "gpus_per_node", 0)
        if self.gpu_type is not None:
            _line(self.gpu_type, "gpu_type", _UNSAFE | set(":,"))
            if not self.gpus_per_node:
                raise ValueError("gpu_type: names the type of GPUs, but gpus_per_node is 0; ask for GPUs or remove it")
        check_int(self.cpus_per_task, "cpus_per_task", 1)
        check_int(self.tasks_per_node, "tasks_per_node", 1)
        check_int(self.nodes, "nodes", 1)
        check_int(self.array_parallelism, "array_parallelism", 1)
        check_int(self.max_requeues, "max_requeues", 0)
        if self.pack == AUTO:
            if not self.gpus_per_node:
                raise ValueError(
                    "pack: auto fits runs into a GPU's memory, but gpus_per_node is 0; on CPUs write pack: K "
                    f"(at most cpus_per_task, {self.cpus_per_task})"
                )
        else:
            check_int(self.pack, "pack", 1)
        if isinstance(self.mps, bool):  # YAML 1.1 reads an unquoted on/off as true/false
            object.__setattr__(self, "mps", "on" if self.mps else "off")
        if self.mps not in MPS_MODES:
            raise ValueError(f"mps: must be one of {', '.join(MPS_MODES)}, got {self.mps!r}")
        # a whole node's CPUs are known once the plan sizes the node (cluster.plan.whole_node checks them there)
        if isinstance(self.pack, int) and self.pack > self.cpus_per_task and not (self.gpus_per_node or self.exclusive):
            raise ValueError(
                f"pack: {self.pack} runs on {plural(self.cpus_per_task, 'CPU')} leaves some run without a CPU of its "
                f"own; ask for cpus_per_task >= {self.pack} or pack fewer runs"
            )
        if (
            self.mem_gb is not None
            and self.mem_gb != AUTO
            and (
                isinstance(self.mem_gb, bool)
                or not isinstance(self.mem_gb, (int, float))
                or not 0 < self.mem_gb < float("inf")
            )
        ):
            raise ValueError(f'mem_gb: must be a positive number of gigabytes or "auto", got {self.mem_gb!r}')
        if self.gpu_mem_gb is not None and (
            isinstance(self.gpu_mem_gb, bool)
            or not isinstance(self.gpu_mem_gb, (int, float))
            or not 0 < self.gpu_mem_gb < float("inf")
        ):
            raise ValueError(f"gpu_mem_gb: must be a positive number of gigabytes, got {self.gpu_mem_gb!r}")
        if self.gpu_mem_gb is not None and not self.gpus_per_node:
            raise ValueError("gpu_mem_gb: gives the GPUs' memory, but gpus_per_node is 0; ask for GPUs or remove it")
        if not isinstance(self.time, str):
            raise ValueError(f'time: must be a string such as "01:00:00" or "auto", got {self.time!r}')
        if self.time != AUTO:
            parse_time(self.time)
        if (
            isinstance(self.time_margin, bool)
            or not isinstance(self.time_margin, (int, float))
            or not 1 <= self.time_margin <= 100
        ):
            raise ValueError(f"time_margin: must be a number from 1 to 100, got {self.time_margin!r}")
        if isinstance(self.setup, str):
            raise ValueError("setup: must be a list of shell lines, not one string")
        object.__setattr__(self, "setup", tuple(self.setup))
        for line in self.setup:
            _line(line, "setup", _NEWLINE)
        object.__setattr__(self, "extra", tuple(dict(self.extra).items()))
        for key, value in self.extra:
            if key in _SBATCH_FIELDS:
                raise ValueError(f"extra: {key!r} has its own field; set slurm.{_SBATCH_FIELDS[key]} instead")
            try:
                check_name(key, SBATCH_EXTRA, "sbatch option")
            except ValueError as e:
                raise ValueError(f"extra: {e}") from None
            if value is not True and type(value) is not int:
                _line(value, f"extra.{key}", _UNSAFE)
        if self.mem_gb is not None and "mem-per-gpu" in dict(self.extra):
            raise ValueError("extra: mem-per-gpu and mem_gb both set the job's memory; keep one")

    @property
    def seconds(self) -> int:
        """The time limit in seconds; a limit still "auto" has none until ``cluster.estimate`` sets it."""
        if self.time == AUTO:
            raise ValueError("time: auto has no limit until it is estimated")
        return parse_time(self.time)

    @property
    def processes(self) -> int:
        """The processes of one array task: tasks_per_node x nodes, those of one run where it has several."""
        return self.tasks_per_node * self.nodes

    @property
    def runs_per_task(self) -> int:
        """``pack`` as a number; a pack still "auto" has none until ``cluster.memory`` plans it."""
        if not isinstance(self.pack, int):
            raise ValueError("pack: auto has no size until it is planned")
        return self.pack

    @property
    def timeout_min(self) -> int:
        """The time limit in whole minutes (rounded up), as submitit's ``timeout_min`` wants it."""
        return -(-self.seconds // 60)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {
            "setup": list(self.setup),
            "extra": dict(self.extra),
        }


def format_time(seconds: int) -> str:
    """A SLURM time limit, "HH:MM:SS" or "D-HH:MM:SS" from a day on."""
    days, rest = divmod(int(seconds), 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


@dataclass(frozen=True, kw_only=True)
class Budget:
    """The time a run was given: its SLURM limit and, with ``time: auto``, the estimate the limit came from. The
    job writes it into the record, so that ``collect`` can set estimates against the minutes runs took."""

    time_limit_s: int | None = None
    estimated_s: float | None = None
    estimate_source: str | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class Packing:
    """How a run shared its allocation, for its record: the runs of its array task (itself included, in order)
    and whether a GPU was shared through MPS ("on"), time-sliced ("off"), or not shared at all (None)."""

    runs: tuple[str, ...] = ()  # empty: trained alone
    mps: str | None = None
    # The allocation's GPUs and CPUs, as the job process saw them before it gave each worker its share (None: the
    # process that trains sees the whole allocation itself)
    alloc_gpus: int | None = None
    alloc_cpus: int | None = None

    def to_dict(self, run_id: str, *, on_gpu: bool) -> dict:
        return {
            "pack_size": max(len(self.runs), 1),
            "packed_with": [r for r in self.runs if r != run_id],
            "mps": self.mps if on_gpu and len(self.runs) > 1 else None,
        }


# The error a packed run's record holds when its job stopped it (time limit, preemption, requeue, cancel) rather
# than the run failing: it resumes when the job is requeued. The worker's exception class is named so.
STOPPED = "Stopped"
