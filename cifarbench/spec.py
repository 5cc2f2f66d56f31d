"""Frozen run specs: what one run is, the optimisation recipes, and the stable run id."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from cifarbench.errors import check_name

# Bump when the meaning of a spec field changes: every run id changes with it.
SPEC_VERSION = 1

DATASETS = {"cifar10": 10, "cifar100": 100, "synthetic10": 10, "synthetic100": 100}
LOADERS = ("device", "torchvision")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")
SCHEDULES = ("step", "cos")
# torch.compile's modes; "reduce-overhead" also captures CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """SGD with momentum and an epoch-wise LR schedule ("step": MultiStepLR, "cos": CosineAnnealingLR)."""

    name: str
    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float
    schedule: str
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self):
        check_name(self.schedule, SCHEDULES, "schedule")
        if self.epochs < 1:
            raise ValueError(f"recipe {self.name!r}: epochs must be >= 1, got {self.epochs}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def shortened(self, epochs: int) -> "Recipe":
        """The same recipe over ``epochs`` epochs: milestones (and T_max, which is ``epochs``) scale
        proportionally, rounded, so a 2-epoch smoke run keeps the shape of the 200-epoch schedule."""
        if epochs == self.epochs:
            return self
        scale = epochs / self.epochs
        # Repeats are kept: MultiStepLR applies gamma once per repeat, so no decay is lost when two collide.
        milestones = tuple(sorted(max(1, round(m * scale)) for m in self.milestones))
        return dataclasses.replace(self, epochs=epochs, milestones=milestones)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="step-160", epochs=160, weight_decay=1e-4, schedule="step", milestones=(80, 120), gamma=0.1),
        Recipe(name="step-200", epochs=200, weight_decay=5e-4, schedule="step", milestones=(60, 120, 160), gamma=0.2),
        Recipe(name="cos-200", epochs=200, weight_decay=5e-4, schedule="cos"),
    )
}


def get_recipe(name: str) -> Recipe:
    return RECIPES[check_name(name, RECIPES, "recipe")]


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run: everything that decides its result, plus where its data and results live."""

    model: str
    dataset: str
    recipe: Recipe
    batch_size: int
    seed: int
    epochs: int | None = None  # None: the recipe's own length
    precision: str = "auto"
    loader: str = "device"
    deterministic: bool = False
    compile: str | None = None  # a torch.compile mode, or None: eager
    data_root: str = "data"
    verify: bool = True
    results: str = "results"
    # Not part of the run id: bookkeeping that never changes the numbers.
    _id_excluded = ("data_root", "verify", "results")

    def __post_init__(self):
        if self.epochs == self.recipe.epochs:  # the recipe's own length: the same run, so the same id
            object.__setattr__(self, "epochs", None)
        from cifarbench.models import MODELS  # torch: only where a spec is built, not for every command

        check_name(self.model, MODELS, "model")
        check_name(self.dataset, DATASETS, "dataset")
        check_name(self.loader, LOADERS, "loader")
        check_name(self.precision, PRECISIONS, "precision")
        if self.compile is not None:
            check_name(self.compile, COMPILE_MODES, "compile mode")
        for key in ("batch_size", "epochs"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]

    @property
    def schedule(self) -> Recipe:
        """The recipe as it is actually run (shortened when ``epochs`` overrides it)."""
        return self.recipe.shortened(self.epochs) if self.epochs else self.recipe

    def identity(self) -> dict:
        """The fields that change the result, as plain JSON-able values."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._id_excluded}
        fields["recipe"] = dataclasses.asdict(self.recipe)
        fields["recipe"]["milestones"] = list(self.recipe.milestones)
        if self.compile is None:  # compile came after v1: an eager run keeps the id it had before
            del fields["compile"]
        return {"spec_version": SPEC_VERSION, **fields}

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return f"{self.model}-{self.dataset}-v{SPEC_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"]["milestones"] = list(self.recipe.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["recipe"] = Recipe(**d["recipe"])
        return cls(**d)


# sbatch options a grid may add beyond the fields of Resources. An allow-list: any other option either fights
# one that submitit already writes (--time, --array, --gpus-per-node ...) or changes what the job is (--wrap,
# --export, --chdir).
SBATCH_EXTRA = ("comment", "exclude", "exclusive", "mail-type", "mail-user", "mem-per-gpu", "nodelist", "reservation")
# Options that have a field of their own; the error names the field to use instead.
_SBATCH_FIELDS = {
    "partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint", "time": "time",
    "gpus-per-node": "gpus_per_node", "gpus": "gpus_per_node", "gres": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "cpus-per-gpu": "cpus_per_task", "mem": "mem_gb", "array": "array_parallelism",
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


def _count(value, key: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{key}: must be an integer >= {lo}, got {value!r}")


def _line(value, key: str, bad: set) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: must be a non-empty string, got {value!r}")
    if bad & set(value):
        shown = "".join(sorted(bad & set(value)))
        raise ValueError(f"{key}: {value!r} contains {shown!r}, which is not allowed here")


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What one SLURM array task asks for, and how the array is run. Every run of a grid gets the same.

    Invalid values raise ValueError with a message that starts with the field name (``"time: ..."``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int = 4
    mem_gb: float | None = None
    time: str = "04:00:00"
    constraint: str | None = None
    array_parallelism: int = 16
    max_requeues: int = 10
    setup: tuple[str, ...] = ()  # shell lines run before the job, e.g. "module load cuda"
    extra: tuple[tuple[str, str | int | bool], ...] = ()  # (sbatch option, value); True: a bare flag

    def __post_init__(self):
        for key in ("partition", "account", "qos"):
            if getattr(self, key) is not None:
                _line(getattr(self, key), key, _UNSAFE)
        if self.constraint is not None:
            _line(self.constraint, "constraint", _NEWLINE)  # "a100&ib" and "[rack1|rack2]" are constraint syntax
        _count(self.gpus_per_node, "gpus_per_node", 0)
        _count(self.cpus_per_task, "cpus_per_task", 1)
        _count(self.array_parallelism, "array_parallelism", 1)
        _count(self.max_requeues, "max_requeues", 0)
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float))
                                        or not 0 < self.mem_gb < float("inf")):
            raise ValueError(f"mem_gb: must be a positive number of gigabytes, got {self.mem_gb!r}")
        if not isinstance(self.time, str):
            raise ValueError(f"time: must be a string such as \"01:00:00\", got {self.time!r}")
        parse_time(self.time)
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
    def timeout_min(self) -> int:
        """The time limit in whole minutes (rounded up), as submitit's ``timeout_min`` wants it."""
        return -(-parse_time(self.time) // 60)
