"""YAML grid file -> validated run specs and SLURM resources.

A grid names axes (``models``, ``datasets``, ``opts``, ``batch_sizes``, ``seeds``) whose cartesian product is the
list of runs, in the order the axes are written (first written varies slowest), minus ``exclude`` entries, plus
``include`` entries, with duplicate runs dropped (the first is kept). ``fuse: seeds`` (at the top level or in an
include entry) asks for runs that differ only in their seed to train as one fused group of up to ``fuse_max``.
``gpus_per_run``, ``nodes`` and ``sync_bn`` (at the top level, in a ``resources:`` rule or an include entry) train
a run on several processes, one device each: they set both the run's fields and what its task asks SLURM for.
Everything is checked here, before anything is submitted; each problem is one line,
``<file>: <where>: <what is wrong and what to do>``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cifarbench.config.resources import AUTO, Resources
from cifarbench.config.spec import (
    ARCHS,
    COMPILE_MODES,
    DATASETS,
    LOADERS,
    LOGGERS,
    MAX_SEED,
    PRECISIONS,
    RECIPES,
    SCHEDULES,
    TRAIN_IMAGES,
    WARMUP_MODES,
    Recipe,
    RunSpec,
    unfusable,
)
from cifarbench.errors import GridError, UnknownNameError, check_int, check_name, did_you_mean, plural

AXES = {"models": "model", "datasets": "dataset", "opts": "opt", "batch_sizes": "batch_size", "seeds": "seed"}
# per run: an include entry may override them
RUN_OPTIONS = ("epochs", "precision", "loader", "deterministic", "compile", "val_split")
# pack and mps: SLURM fields that may also be written at the top level (and pack in an include entry), since they
# say how runs train together rather than what a node is asked for
PACKING_KEYS = ("pack", "mps")
# how runs train together, never part of a run's id: ``fuse: seeds`` and the largest group
FUSE_KEYS = ("fuse", "fuse_max")
FUSE_MODES = ("seeds",)
DEFAULT_FUSE_MAX = 8
# one run on several devices (DDP): fields of the run (RunSpec) that also size its task (``_task_resources``)
DDP_KEYS = ("gpus_per_run", "nodes", "sync_bn")
DDP_DEFAULTS = {"gpus_per_run": 1, "nodes": 1, "sync_bn": True}
MAX_GPUS_PER_NODE = 64  # no node has more: a larger number is a typo
MAX_NODES = 10_000
GRID_KEYS = (
    *AXES, *RUN_OPTIONS, "root", "verify", "results", "logger", "exclude", "include", "slurm", "resources",
    *PACKING_KEYS, *FUSE_KEYS, *DDP_KEYS,
)  # fmt: skip
# what a resources rule's `match` may name: every field of a run
MATCH_KEYS = (*AXES.values(), *RUN_OPTIONS)
RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))
# tasks_per_node and nodes come from gpus_per_run and nodes (DDP_KEYS), which also set the run's fields
SLURM_KEYS = tuple(f.name for f in dataclasses.fields(Resources) if f.name not in ("tasks_per_node", "nodes"))
# Sanity bounds that catch typos such as a stray zero. No batch can be larger than the 50000-image CIFAR training
# set, and a schedule of more than 10000 epochs is not a CIFAR recipe.
MAX_BATCH_SIZE = 50_000
MAX_EPOCHS = 10_000
MAX_ITERATIONS = 10_000_000
# What a data folder is, for the run id: (dataset, data root) -> None for checksum-verified CIFAR, else a
# fingerprint of the files (``cifarbench.store.datasets.fingerprint``, which the commands pass in).
Fingerprint = Callable[[str, str], "str | None"]


@dataclass(frozen=True, kw_only=True)
class Grid:
    specs: tuple[RunSpec, ...]
    resources: Mapping[str, Resources]  # run id -> what it asks SLURM for (time may still be "auto")
    results: str  # where records, logs and submission manifests go
    source: str  # the grid file, for messages
    # run id -> the largest fused group it may join, for the runs with ``fuse: seeds``; others train alone
    fuse: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # whether the grid says anywhere how many GPUs its runs take (else each has Resources' default, 1)
    gpus_set: bool = True


class _Problem(Exception):
    """(where, what): parse_grid prefixes the file name."""


def load_grid(path, *, fingerprint: Fingerprint | None = None) -> Grid:
    """The grid in the file ``path``. ``fingerprint``: what each run's data is, for its id (without it, every
    data folder counts as the checksum-verified CIFAR)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GridError(f"{path}: cannot read the grid file: {getattr(e, 'strerror', None) or e}") from None
    return parse_grid(text, source=str(path), fingerprint=fingerprint)


def parse_grid(text: str, *, source: str = "<grid>", fingerprint: Fingerprint | None = None) -> Grid:
    try:
        return _grid(_load_yaml(text), source, fingerprint)
    except _Problem as p:
        where, what = p.args
        raise GridError(f"{source}: {where}: {what}") from None


def _load_yaml(text: str):
    try:
        _reject_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark, what = e.problem_mark, "; ".join(filter(None, (e.context, e.problem)))
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "top level"
        raise _Problem(where, f"invalid YAML: {' '.join(what.split())}") from None
    except yaml.YAMLError as e:
        raise _Problem("top level", f"invalid YAML: {' '.join(str(e).split())}") from None


def _reject_duplicate_keys(root) -> None:
    """PyYAML keeps the last of two equal keys: the first would be a setting silently ignored."""
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in visited:  # an alias can make the node graph cyclic
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            seen = set()
            for key, child in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in seen:
                    mark = key.start_mark
                    raise _Problem(f"line {mark.line + 1}, column {mark.column + 1}", f"duplicate key {key.value!r}")
                seen.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
                stack.append(child)


def _keys(value, valid, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Problem(where, f"must be a mapping of keys to values, got {value!r}")
    for key in value:
        if key not in valid:
            raise _Problem(where, f"unknown key {key!r}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}")
    return value


def _name(value, valid, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise _Problem(where, f"must be a {what} name, got {value!r}")
    try:
        return check_name(value, valid, what)
    except UnknownNameError as e:
        raise _Problem(where, str(e)) from None


def _int(value, where: str, lo: int, hi: int, why: str = "") -> int:
    try:
        return check_int(value, where, lo, hi, why)
    except ValueError as e:
        raise _Problem(where, str(e).removeprefix(f"{where}: ")) from None


def _number(value, where: str, lo: float, *, above: bool = False) -> float:
    # PyYAML follows YAML 1.1, which reads 5e-4 (no dot) as a string: accept the spelling people write.
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float, str)) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number < lo or (above and number == lo):
        raise _Problem(where, f"must be a number {'>' if above else '>='} {lo}, got {value!r}")
    return number


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Problem(where, f"must be true or false, got {value!r}")
    return value


def _compile(value, where: str) -> str | None:
    """false (or null): eager; true: torch.compile's default mode; or a mode by name."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if not isinstance(value, str):
        raise _Problem(
            where, f"must be true, false or a torch.compile mode ({', '.join(COMPILE_MODES)}), got {value!r}"
        )
    return _name(value, COMPILE_MODES, "compile mode", where)


def _path(value, where: str) -> str:
    if not isinstance(value, str) or not value or set(value) & set("\r\n\x00"):
        raise _Problem(where, f"must be a folder path on one line, got {value!r}")
    return value


def _list(raw: dict, key: str, *, empty_ok: bool = False) -> list:
    value = raw.get(key)
    if value is None and empty_ok:
        return []
    if not isinstance(value, list) or not (value or empty_ok):
        kind = "list" if empty_ok else "non-empty list"
        raise _Problem(key, f"must be a {kind} (in YAML: [a, b] or one '- a' line each), got {value!r}")
    return value


def _matches(run: dict, entry: dict) -> bool:
    return all((run[key].name if key == "opt" else run[key]) == v for key, v in entry.items())


def _recipe(value, where: str, known: dict[str, Recipe]) -> Recipe:
    """A recipe name (built in, or defined inline earlier in the grid) or an inline recipe mapping."""
    if isinstance(value, str):
        if value in known:
            return known[value]
        return RECIPES[_name(value, [*RECIPES, *known], "recipe", where)]
    _keys(value, RECIPE_KEYS, where)
    required = [f.name for f in dataclasses.fields(Recipe) if f.default is dataclasses.MISSING]
    missing = [key for key in required if key not in value]
    if missing:
        needs = ", ".join(required).replace("name, ", "name, epochs or iterations, ")
        raise _Problem(where, f"inline recipe lacks {', '.join(missing)}; it needs {needs}")
    name = value["name"]
    if not isinstance(name, str) or not name or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name):
        raise _Problem(f"{where}.name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
    if ("epochs" in value) == ("iterations" in value):
        raise _Problem(where, "an inline recipe needs its length as epochs or as iterations (one of the two)")
    unit = "epochs" if "epochs" in value else "iterations"
    length = _int(value[unit], f"{where}.{unit}", 1, MAX_EPOCHS if unit == "epochs" else MAX_ITERATIONS)
    fields: dict[str, Any] = {"name": name, unit: length}
    fields["schedule"] = _name(value["schedule"], SCHEDULES, "schedule", f"{where}.schedule")
    for key, lo, above in (
        ("lr", 0, True),
        ("momentum", 0, False),
        ("weight_decay", 0, False),
        ("gamma", 0, True),
        ("warmup_lr", 0, True),
    ):
        if key in value:
            fields[key] = _number(value[key], f"{where}.{key}", lo, above=above)
    for key, hi in (
        ("warmup_epochs", length - 1 if unit == "epochs" else MAX_EPOCHS),
        ("warmup_iterations", length - 1 if unit == "iterations" else MAX_ITERATIONS),
        ("warmup_min_depth", 10_000),
        ("val_split", TRAIN_IMAGES - 1),
    ):
        if key in value:
            fields[key] = _int(value[key], f"{where}.{key}", 0, hi)
    if "warmup_mode" in value:
        fields["warmup_mode"] = _name(value["warmup_mode"], WARMUP_MODES, "warm-up mode", f"{where}.warmup_mode")
    if fields.get("warmup_epochs") and fields.get("warmup_iterations"):
        raise _Problem(where, "give the warm-up as warmup_epochs or as warmup_iterations, not both")
    if (fields.get("warmup_epochs") or fields.get("warmup_iterations")) and "warmup_lr" not in fields:
        raise _Problem(where, "a warm-up needs warmup_lr, the learning rate it starts at")
    milestones = value.get("milestones", [])
    if not isinstance(milestones, list):
        raise _Problem(f"{where}.milestones", f"must be a list of {unit}, got {milestones!r}")
    for i, m in enumerate(milestones):
        _int(m, f"{where}.milestones[{i}]", 1, length - 1, " (a milestone at or after the end never fires)")
    if milestones != sorted(set(milestones)):
        raise _Problem(f"{where}.milestones", f"must increase strictly, got {milestones}")
    if milestones and fields["schedule"] != "step":
        raise _Problem(f"{where}.milestones", "only the step schedule has milestones; remove them")
    recipe = Recipe(**fields, milestones=tuple(milestones))
    previous = known.get(name, RECIPES.get(name))
    if previous is not None and previous != recipe:
        raise _Problem(f"{where}.name", f"recipe {name!r} already means {previous}; give this one another name")
    known[name] = recipe
    return recipe


def _fuse(raw: dict, where: str, default: int) -> int:
    """``fuse: seeds`` (or false / null: off) and ``fuse_max``: the largest fused group, 0 for none."""
    mode = raw.get("fuse", "seeds" if default else None)
    if mode is not None and mode is not False:
        _name(mode, FUSE_MODES, "fuse mode", f"{where}fuse")
    most = _int(raw.get("fuse_max", default or DEFAULT_FUSE_MAX), f"{where}fuse_max", 1, 10_000)
    if "fuse_max" in raw and (mode is None or mode is False):
        raise _Problem(f"{where}fuse_max", "applies to fused runs only; add fuse: seeds or remove it")
    return 0 if mode is None or mode is False else most


def _ddp(raw: dict, where: str) -> dict:
    """``gpus_per_run``, ``nodes`` and ``sync_bn`` as written at ``where`` (the top level, a rule, an include)."""
    check = {
        "gpus_per_run": lambda v, w: _int(v, w, 1, MAX_GPUS_PER_NODE, " (one process per GPU of a node)"),
        "nodes": lambda v, w: _int(v, w, 1, MAX_NODES),
        "sync_bn": _bool,
    }
    return {key: check[key](raw[key], f"{where}{key}") for key in DDP_KEYS if key in raw}


def _task_resources(fields: dict, ddp: dict, where: str) -> Resources:
    """The Resources of the runs of ``ddp`` (DDP_KEYS' values) over resource ``fields``: ``nodes`` nodes of
    ``gpus_per_run`` tasks each, one GPU per task (none where the fields ask for no GPUs: the processes share the
    CPUs over gloo). What such a run cannot share its devices with is refused here."""
    n, m = ddp["gpus_per_run"], ddp["nodes"]
    if n * m > 1:
        ddp_said = f"gpus_per_run: {n} x nodes: {m}" if m > 1 else f"gpus_per_run: {n}"
        gpus = fields.get("gpus_per_node", 1)
        if gpus not in (0, 1, n):
            raise _Problem(
                where,
                f"gpus_per_node: {gpus}, but {ddp_said} takes one GPU per process, {n} per node; remove "
                "gpus_per_node (or set it to 0: the processes train on CPUs)",
            )
        pack = fields.get("pack", 1)
        if pack != 1:
            raise _Problem(
                where,
                f"pack: {pack} packs runs onto a task's devices, but a run of {ddp_said} uses all of them; set "
                "pack: 1 for these runs (packing serves many small runs, several GPUs one long run)",
            )
        if fields.get("exclusive"):
            raise _Problem(
                where,
                f"exclusive: whole nodes are sized by the node, a run of {ddp_said} by those two; set exclusive: "
                "false for these runs (gpus_per_run: the node's GPUs takes a whole node's GPUs)",
            )
        if n > 1 and fields.get("mem_gb") == AUTO:
            raise _Problem(
                where,
                f"mem_gb: auto plans one process's memory, and a node holds {n} of this run's; give mem_gb, the "
                "memory of a node's processes together",
            )
        fields = {**fields, "gpus_per_node": n if gpus else 0, "tasks_per_node": n, "nodes": m}
    try:
        return Resources(**fields)
    except ValueError as e:
        raise _Problem(where, str(e)) from None


def _run_options(raw: dict, where: str, defaults: dict) -> dict:
    check = {
        "epochs": lambda v, w: None if v is None else _int(v, w, 1, MAX_EPOCHS),  # null: the recipe's own length
        "precision": lambda v, w: _name(v, PRECISIONS, "precision", w),
        "loader": lambda v, w: _name(v, LOADERS, "loader", w),
        "deterministic": _bool,
        "compile": _compile,
        "val_split": lambda v, w: None if v is None else _int(v, w, 0, TRAIN_IMAGES - 1),  # null: the recipe's
    }
    return defaults | {key: check[key](raw[key], f"{where}{key}") for key in RUN_OPTIONS if key in raw}


def _grid(raw, source: str, fingerprint: Fingerprint | None) -> Grid:
    if raw is None:
        raise _Problem("top level", "the grid is empty; it needs models, datasets, opts and batch_sizes")
    _keys(raw, GRID_KEYS, "top level")
    missing = [key for key in ("models", "datasets", "opts", "batch_sizes") if key not in raw]
    if missing:
        raise _Problem("top level", f"missing {', '.join(missing)}; a grid needs models, datasets, opts, batch_sizes")
    raw = {**raw, "seeds": raw.get("seeds", [0])}
    known: dict[str, Recipe] = {}
    check: dict[str, Callable[[Any, str], Any]] = {
        "models": lambda v, w: _name(v, ARCHS, "model", w),
        "datasets": lambda v, w: _name(v, DATASETS, "dataset", w),
        "opts": lambda v, w: _recipe(v, w, known),
        "batch_sizes": lambda v, w: _int(v, w, 1, MAX_BATCH_SIZE, " (the CIFAR training set has 50000 images)"),
        "seeds": lambda v, w: _int(v, w, 0, MAX_SEED),
    }
    axes = {key: [check[key](v, f"{key}[{i}]") for i, v in enumerate(_list(raw, key))] for key in raw if key in AXES}
    defaults = _run_options(
        raw,
        "",
        {
            "epochs": None,
            "precision": "auto",
            "loader": "device",
            "deterministic": False,
            "compile": None,
            "val_split": None,
        },
    )
    fuse_default = _fuse(raw, "", 0)
    ddp_default = DDP_DEFAULTS | _ddp(raw, "")
    shared: dict[str, Any] = {
        "data_root": _path(raw.get("root", "data"), "root"),
        "verify": _bool(raw.get("verify", True), "verify"),
        "results": _path(raw.get("results", "results"), "results"),
        "logger": None if raw.get("logger") is None else _name(raw["logger"], LOGGERS, "logger", "logger"),
    }

    excludes = _list(raw, "exclude", empty_ok=True)
    for i, entry in enumerate(excludes):
        where = f"exclude[{i}]"
        _keys(entry, tuple(AXES.values()), where)
        if not entry:
            raise _Problem(where, f"an empty entry would exclude every run; name some of {', '.join(AXES.values())}")
        for axis, key in AXES.items():
            present = [v.name if axis == "opts" else v for v in axes[axis]]
            if key in entry and (isinstance(entry[key], bool) or entry[key] not in present):
                raise _Problem(f"{where}.{key}", f"{entry[key]!r} is not in this grid's {axis}: {present}")

    slurm = raw.get("slurm")
    base = _resource_fields({} if slurm is None else slurm, "slurm", {})
    base.update(_packing_fields(raw, "", base))
    rules = [
        _rule(rule, f"resources[{i}]", check, known, base)
        for i, rule in enumerate(_list(raw, "resources", empty_ok=True))
    ]
    own_slurm: dict[int, dict] = {}  # an include entry's own slurm: fields, by its run
    own_ddp: dict[int, dict] = {}  # and its own DDP_KEYS

    runs: list[tuple[dict[str, Any], str]] = []
    for combo in itertools.product(*axes.values()):
        run = {AXES[axis]: v for axis, v in zip(axes, combo)}
        if not any(_matches(run, entry) for entry in excludes):
            runs.append((run | defaults | {"fuse": fuse_default}, "top level"))
    if not runs:
        raise _Problem("exclude", "removes every run of the grid; nothing is left to submit")

    for i, entry in enumerate(_list(raw, "include", empty_ok=True)):
        where = f"include[{i}]"
        _keys(entry, (*AXES.values(), *RUN_OPTIONS, "slurm", "pack", *FUSE_KEYS, *DDP_KEYS), where)
        run = _run_options(entry, f"{where}.", defaults)
        own_ddp[id(run)] = _ddp(entry, f"{where}.")
        run["fuse"] = _fuse(entry, f"{where}.", fuse_default)
        if "slurm" in entry or "pack" in entry:
            own = _resource_fields(entry.get("slurm", {}), f"{where}.slurm", base)
            own_slurm[id(run)] = own | _packing_fields({**entry, "slurm": own}, f"{where}.", {**base, **own})
        for axis, key in AXES.items():
            if key not in entry and len(axes[axis]) > 1:
                raise _Problem(where, f"missing {key}; the grid has several {axis}, so name one")
            run[key] = check[axis](entry[key], f"{where}.{key}") if key in entry else axes[axis][0]
        runs.append((run, where))

    data: dict[str, str | None] = {}  # dataset -> its fingerprint: once per dataset, not once per run
    specs: dict[str, RunSpec] = {}
    resources: dict[str, Resources] = {}
    fuse: dict[str, int] = {}
    built: dict[tuple, Resources] = {}  # thousands of runs share a handful of resource sets
    for run, where in runs:
        matched = tuple(i for i, (match, _, _) in enumerate(rules) if _matches_rule(run, match))
        own = own_slurm.get(id(run), {})
        ddp = ddp_default.copy()
        for i in matched:
            ddp.update(rules[i][2])
        ddp.update(own_ddp.get(id(run), {}))
        shape = (matched, tuple(sorted((k, repr(v)) for k, v in own.items())), ddp["gpus_per_run"], ddp["nodes"])
        if shape not in built:
            fields = base.copy()
            for i in matched:
                fields.update(rules[i][1])
            built[shape] = _task_resources({**fields, **own}, ddp, where)
        recipe, epochs, fuse_max = run.pop("opt"), run.pop("epochs"), run.pop("fuse")
        if epochs == recipe.epochs:  # the same run as no override: keep the same run id
            epochs = None
        if fingerprint is not None and run["dataset"] not in data:
            data[run["dataset"]] = fingerprint(run["dataset"], shared["data_root"])
        try:
            spec = RunSpec(
                recipe=recipe, epochs=epochs, data_fingerprint=data.get(run["dataset"]), **run, **ddp, **shared
            )
        except ValueError as e:
            raise _Problem(where, str(e)) from None
        if fuse_max and (why := unfusable(spec)):
            raise _Problem(where, why)
        if fuse_max and spec.world_size > 1:
            raise _Problem(
                where,
                f"fuse: seeds trains a group on one device, and these runs take {spec.world_size} processes "
                "(gpus_per_run x nodes); set fuse: false for them",
            )
        if spec.run_id not in specs:
            specs[spec.run_id] = spec
            resources[spec.run_id] = built[shape]
            if fuse_max:
                fuse[spec.run_id] = fuse_max
    _check_packs(resources, fuse)
    gpus_set = any("gpus_per_node" in fields for fields in (base, *(r for _, r, _ in rules), *own_slurm.values()))
    return Grid(
        specs=tuple(specs.values()),
        resources=resources,
        results=shared["results"],
        source=source,
        fuse=fuse,
        gpus_set=gpus_set,
    )


def _packing_fields(raw: dict, where: str, base: dict) -> dict:
    """``pack`` and ``mps`` written beside ``slurm`` (at the top level, or ``pack`` in an include entry)."""
    fields = {key: raw[key] for key in PACKING_KEYS if key in raw}
    for key in fields:
        if key in (raw.get("slurm") or {}):
            raise _Problem(f"{where}{key}", f"set both here and in {where}slurm; keep one")
    _check_resources(fields, base, where)
    return fields


def _check_packs(resources: Mapping[str, Resources], fuse: Mapping[str, int]) -> None:
    """A pack larger than the runs that share its resources could never fill one task: most likely a typo. Every
    GPU of a task is used: a run trains on one GPU, so a task of several GPUs packs at least as many runs (each
    worker gets its own GPU, round robin); a fused group is one process on one GPU."""
    counts: dict[Resources, int] = {}
    for r in resources.values():
        counts[r] = counts.get(r, 0) + 1
    for r, n in counts.items():
        if r.pack == AUTO:  # planned from evidence, at most the runs there are and at least one per GPU
            continue
        pack = r.runs_per_task
        if pack > n:
            raise _Problem(
                "pack",
                f"{pack} runs per task, but the grid has only {plural(n, 'run')} with these resources; "
                f"set pack to at most {n}",
            )
        # exclusive: pack is per GPU; a run of several processes takes one GPU each
        if r.gpus_per_node > 1 and pack < r.gpus_per_node and not r.exclusive and r.processes == 1:
            raise _Problem(
                "gpus_per_node",
                f"{r.gpus_per_node} GPUs per task, but a run trains on one GPU and pack: {pack} would leave "
                f"{plural(r.gpus_per_node - pack, 'GPU')} idle; ask for gpus_per_node: 1, pack: {r.gpus_per_node} "
                f"(or more) runs per task, one per GPU, or gpus_per_run: {r.gpus_per_node}: one run on all of them",
            )
    for run_id in fuse:
        r = resources[run_id]
        if r.gpus_per_node > 1 and not r.exclusive:  # a whole node's GPUs are known once planned: plan refuses
            raise _Problem(
                "gpus_per_node",
                f"{r.gpus_per_node} GPUs per task, but a fused group trains on one GPU; ask for gpus_per_node: 1 "
                "for fused runs (each group is a task of its own)",
            )


def _matches_rule(run: dict, match: dict[str, list]) -> bool:
    for key, values in match.items():
        value = run[key]
        if key == "opt":
            value = value.name
        elif key == "epochs" and value is None:
            value = run["opt"].epochs  # the recipe's own length
        if value not in values:
            return False
    return True


def _rule(raw, where: str, check: dict, known: dict, base: dict) -> tuple[dict[str, list], dict, dict]:
    """A resources rule: ``match`` (run field -> accepted values), the resource fields it sets and its DDP_KEYS."""
    _keys(raw, ("match", *SLURM_KEYS, *DDP_KEYS), where)
    if "match" not in raw or not isinstance(raw["match"], dict) or not raw["match"]:
        raise _Problem(
            f"{where}.match",
            f"a rule needs a mapping of run fields to values, e.g. match: {{model: "
            f"resnet110}}; fields: {', '.join(MATCH_KEYS)}",
        )
    _keys(raw["match"], MATCH_KEYS, f"{where}.match")
    axes = {key: axis for axis, key in AXES.items()}
    match = {}
    for key, value in raw["match"].items():
        values = value if isinstance(value, list) else [value]
        w = f"{where}.match.{key}"
        if not values:
            raise _Problem(w, "an empty list matches no run; name a value or remove the key")
        if key == "opt":
            match[key] = [_name(v, [*RECIPES, *known], "recipe", w) for v in values]
        elif key in axes:
            match[key] = [check[axes[key]](v, w) for v in values]
        else:
            match[key] = [_run_options({key: v}, f"{where}.match.", {})[key] for v in values]
    fields = {k: v for k, v in raw.items() if k in SLURM_KEYS}
    ddp = _ddp(raw, f"{where}.")
    if not fields and not ddp:
        raise _Problem(
            where,
            f"a rule sets some of {', '.join((*SLURM_KEYS, *DDP_KEYS))} for the runs it matches; this one sets none",
        )
    return match, _resource_fields(fields, where, base), ddp


def _resource_fields(raw, where: str, base: dict) -> dict:
    """Resource fields as written at ``where`` (``slurm``, a rule, an include's ``slurm``), checked over ``base``."""
    _keys(raw, SLURM_KEYS, where)
    if isinstance(raw.get("time"), (int, float)) and not isinstance(raw["time"], bool):
        raise _Problem(
            f"{where}.time",
            f"got the bare number {raw['time']!r}; YAML 1.1 reads an unquoted 1:00:00 as "
            f'the base-60 integer 3600, so quote it, e.g. time: "01:00:00" (or time: auto)',
        )
    fields = dict(raw)
    if "extra" in fields:
        if not isinstance(fields["extra"], dict):
            raise _Problem(f"{where}.extra", f"must be a mapping of sbatch options to values, got {fields['extra']!r}")
        fields["extra"] = tuple(fields["extra"].items())
    if "setup" in fields and not isinstance(fields["setup"], list):
        raise _Problem(f"{where}.setup", f"must be a list of shell lines, got {fields['setup']!r}")
    _check_resources(fields, base, f"{where}.")
    return fields


def _check_resources(fields: dict, base: dict, where: str) -> None:
    """``fields`` over ``base`` make valid Resources; else the field's error, located at ``where`` + its name."""
    try:
        Resources(**{**base, **fields})
    except ValueError as e:
        field, _, what = str(e).partition(": ")
        raise _Problem(f"{where}{field}", what) from None
