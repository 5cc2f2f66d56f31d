"""How long an array task will take, and the time limit ``time: auto`` asks for.

An array task (the allocation SLURM is asked for) trains one run, a pack of K runs side by side, or a fused group
of K seeds. Its duration is start-up plus its epochs times the seconds one epoch of the task takes (training
passes, then test passes), from the best evidence of the same kind of task there is:

1. completed records in the results folder of runs with the same model, dataset, batch size, loader and compile
   mode, trained the same way: alone, packed K per task, or fused K per group; and on as many processes (a run of
   several, ``gpus_per_run`` x ``nodes``, uses records of that world size only; records before record/8 were
   trained on one). A run of several processes without such records takes one device's figure (2. and 3. measure
   one process), with no speed-up assumed: a generous limit. A packed run's record already holds
   its time while sharing; a fused member's holds the whole group's. A fused group without records of its own K
   takes the nearest K measured: as it is where that K was larger, scaled by K / K' where it was smaller;
2. ``cifarbench bench`` tables under ``results/bench/``: the "lightning fit" rows of the same model, number of
   classes, batch size and compile mode: images/s as measured, taken as CIFAR's 50,000 training and 10,000 test
   images (runs alone only);
3. a prior from the model's multiply-adds (``config.spec.ARCHS``): 6 FLOPs per MAC and image to train, 2 to
   test, at PRIOR_FLOPS, a deliberately low sustained rate for each kind of device.

A pack or fused group without evidence of its own kind assumes no gain: K times its longest run alone. Start-up
(the task's seconds outside its epochs: interpreter, data, compiling, checkpoints) is the longest the records of
the figure measured (their wall-clock time less their epochs'), else START_S.

Evidence matches the device the task will get: a task that asks for GPUs uses only figures measured on GPUs (those
of the grid's ``gpu_type`` first), a CPU task only CPU figures, scaled by the allocation's cores. Figures are
grouped by the precision the runs trained in (``precision_used``): the requested one, or for ``auto``
bf16-mixed (else 16-mixed) on a GPU and 32-true on a CPU. Where figures come from several devices of that kind
(a grid does not know which node a task will get), the slowest counts.

Every figure is projected onto the images the run will take an epoch (``planned_images``: its data's training set
less the validation split, and its test set): a record's training and test seconds by the images it took (CIFAR's
for records that did not keep them), bench's from CIFAR's, and the prior's counted for them.

The limit is the estimate times ``time_margin``, rounded up to 5 minutes, at least 10 minutes, and at most the
partition's MaxTime: a longer task is carried across limits by requeue and resume.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow.parquet as pq

from cifarbench.config.resources import Resources
from cifarbench.config.spec import ARCHS, DATASETS, RunSpec
from cifarbench.errors import plural
from cifarbench.store import records, scan
from cifarbench.store.datasets import STANDARD_IMAGES
from cifarbench.store.layout import Layout

TRAIN_IMAGES, TEST_IMAGES = STANDARD_IMAGES  # CIFAR's splits: what bench figures measured, older records trained on
# Sustained FLOP/s assumed where nothing was measured: per GPU, and per CPU core. On the 2-core CPU machine cifarbench
# is developed on, resnet56's training steps run at ~37 GFLOP/s per core; the prior assumes a quarter of that. For
# GPUs the small kernels of CIFAR ResNets keep any recent GPU far below its peak; 2 TFLOP/s is a low guess, to be
# replaced by records or `cifarbench bench` figures of the cluster's own GPUs.
PRIOR_FLOPS = {"gpu": 2e12, "cpu_core": 10e9}
START_S = 120  # start-up: interpreter, torch, data onto the device
# Records written before the test time was recorded: the test pass (a fifth of the images, forward only)
TEST_SHARE_OF_TRAINING = (TEST_IMAGES / TRAIN_IMAGES) / 3
MIN_LIMIT_S = 600
ROUND_S = 300
RECORD_FIELDS = (
    "run_id", "status", "model", "dataset", "batch_size", "precision", "precision_used", "loader", "compile",
    "epochs_done", "train_seconds", "test_seconds", "device_name", "pack_size", "fuse_size", "alloc_cpus",
    "wall_seconds", "train_images", "test_images", "val_split", "images_per_s", "peak_host_mb", "peak_device_mb",
    "world_size",
)  # fmt: skip
ALONE, PACK, FUSE = "alone", "pack", "fuse"  # how a task trains its runs
GPU_PRECISIONS = ("bf16-mixed", "16-mixed")  # what auto resolves to on a GPU, in order of preference


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One figure of evidence: the seconds one epoch of a task took (or, from bench, would take)."""

    train_s: float  # seconds of one epoch's training passes
    test_s: float  # and of its test passes
    images: tuple[int, int]  # the training and test images they took
    device: str  # "cpu" or the GPU's name
    precision: str  # as trained
    cpus: int | None  # the allocation's CPU cores (bench: torch's threads); None: not recorded
    start_s: float | None = None  # the task's seconds outside its epochs (start-up, data, checkpoints); None: unknown


@dataclass(frozen=True, kw_only=True)
class MemorySample:
    """One process's peak memory as measured (``cluster.memory`` plans from these): a record's, or a bench pack
    row's per run."""

    host_mb: float | None  # peak resident memory of the process that trained it (MiB); None: not measured
    device_mb: float | None  # peak GPU memory torch allocated (MiB); None: trained on a CPU, or not measured
    device: str  # "cpu" or the GPU's name
    precision: str  # as trained
    data_images: int  # the images of the data the process held (training, validation and test sets)
    share: str  # ALONE, PACK or FUSE
    k: int  # runs per task (FUSE: the group's members, whose peak this is)
    source: str = "records"  # or "bench"


@dataclass(frozen=True, kw_only=True)
class PackSample:
    """One run's training throughput while ``k`` trained on its device (``k`` = 1: alone)."""

    k: int
    images_per_s: float
    device: str
    precision: str


@dataclass(frozen=True, kw_only=True)
class Evidence:
    """Samples by (configuration, how the task trained: ALONE, PACK or FUSE, runs per task). A record's
    configuration is (model, dataset, batch size, loader, compile, world size); a bench row's (model, classes, batch
    size, "device", compile, 1), since bench projects onto CIFAR's sizes with one process."""

    records: dict[tuple, list[Sample]]
    bench: dict[tuple, list[Sample]]
    # (model, batch size) -> peaks, and -> throughput by runs per device: for mem_gb: auto and pack: auto
    memory: dict[tuple, list[MemorySample]] = field(default_factory=dict)
    packs: dict[tuple, list[PackSample]] = field(default_factory=dict)
    # figures worked out already: the tasks of a grid of thousands of runs ask about a handful of configurations
    _figures: dict[tuple, Figure | None] = field(default_factory=dict, init=False, compare=False, repr=False)
    # the same for peaks (``cluster.memory``): one per configuration, not one per task
    peaks_memo: dict[tuple, tuple[float, str, str]] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def none(cls) -> Evidence:
        return cls(records={}, bench={})

    def figure(
        self, source: str, key: tuple, spec: RunSpec, resources: Resources, images: tuple[int, int]
    ) -> Figure | None:
        """``_figure`` of the samples of ``source`` ("records" or "bench") under ``key``, worked out once."""
        memo = (source, key, spec.precision, resources, images)
        if memo not in self._figures:
            samples = (self.records if source == "records" else self.bench).get(key, ())
            world = key[0][-1]  # a configuration ends with its world size
            self._figures[memo] = _figure(samples, spec, resources, source, images, world)
        return self._figures[memo]


@dataclass(frozen=True, kw_only=True)
class Figure:
    """What the evidence says of one kind of task: seconds per epoch, and of start-up where records measured it."""

    per_epoch: float
    start_s: float | None
    source: str  # "records", "bench" or "prior"
    detail: str


@dataclass(frozen=True, kw_only=True)
class Estimate:
    seconds: float  # the whole task: start-up and every epoch of its runs
    source: str  # "records", "bench" or "prior"
    detail: str  # what exactly, e.g. "200 epochs; 3 records on NVIDIA H100 80GB HBM3, bf16-mixed: 14.2 s/epoch"


def _config(model: str, dataset: str | int, batch_size: int, loader: str, compile: str | None, world: int = 1) -> tuple:
    return (model, dataset, batch_size, loader, compile, world)


def _share(pack_size: int | None, fuse_size: int | None) -> tuple[str, int]:
    if fuse_size and fuse_size > 1:
        return FUSE, fuse_size
    if pack_size and pack_size > 1:
        return PACK, pack_size
    return ALONE, 1


def samples_from_records(summaries: Iterable[dict]) -> dict[tuple, list[Sample]]:
    """Pure: (configuration, share, K) -> samples, from completed records' summaries (RECORD_FIELDS). A record
    whose device or precision is not known (a GPU run of ``auto`` written before record/5) says nothing."""
    out: dict[tuple, list[Sample]] = {}
    for r in summaries:
        if r["status"] != "completed" or not r["epochs_done"] or r["train_seconds"] is None or not r["device_name"]:
            continue
        precision = _precision_used(r)
        if precision is None:
            continue
        test = r["test_seconds"] if r["test_seconds"] is not None else r["train_seconds"] * TEST_SHARE_OF_TRAINING
        world = r.get("world_size") or 1  # records before record/8 trained on one process
        config = _config(r["model"], r["dataset"], r["batch_size"], r["loader"], r["compile"], world)
        key = (config, *_share(r.get("pack_size"), r.get("fuse_size")))
        wall = r.get("wall_seconds")
        start_s = max(wall - r["train_seconds"] - test, 0.0) if wall is not None else None
        images = _record_images(r)
        sample = Sample(
            train_s=r["train_seconds"] / r["epochs_done"],
            test_s=test / r["epochs_done"],
            images=images,
            device=r["device_name"],
            precision=precision,
            cpus=r.get("alloc_cpus"),
            start_s=start_s,
        )
        out.setdefault(key, []).append(sample)
    return out


def _record_images(r: dict) -> tuple[int, int]:
    """The training and test images a record's run took an epoch; CIFAR's for records that did not keep them."""
    train, test = records.data_size(r) or STANDARD_IMAGES
    return train - (r.get("val_split") or 0), test


def _precision_used(r: dict) -> str | None:
    """The precision a record's run trained in; None where it cannot be told (``auto`` on a GPU before record/5)."""
    if r.get("precision_used"):
        return r["precision_used"]
    return r["precision"] if r["precision"] != "auto" else "32-true" if r["device_name"] == "cpu" else None


def memory_from_records(summaries: Iterable[dict]) -> dict[tuple, list[MemorySample]]:
    """Pure: (model, batch size) -> the peak memory of completed records that measured it (record/6 on), of runs
    on one process (one of several holds a share of the batch)."""
    out: dict[tuple, list[MemorySample]] = {}
    for r in summaries:
        if r["status"] != "completed" or not r["device_name"] or r.get("peak_host_mb") is None:
            continue
        if (r.get("world_size") or 1) > 1:
            continue
        precision = _precision_used(r)
        if precision is None:
            continue
        share, k = _share(r.get("pack_size"), r.get("fuse_size"))
        sample = MemorySample(
            host_mb=r["peak_host_mb"],
            device_mb=r.get("peak_device_mb"),
            device=r["device_name"],
            precision=precision,
            data_images=sum(records.data_size(r) or STANDARD_IMAGES),
            share=share,
            k=k,
        )
        out.setdefault((r["model"], r["batch_size"]), []).append(sample)
    return out


def packs_from_records(summaries: Iterable[dict]) -> dict[tuple, list[PackSample]]:
    """Pure: (model, batch size) -> each completed run's images/s on one process, alone (k = 1) or packed k per
    device."""
    out: dict[tuple, list[PackSample]] = {}
    for r in summaries:
        if r["status"] != "completed" or not r["device_name"] or not r.get("images_per_s") or r.get("fuse_size"):
            continue
        if (r.get("world_size") or 1) > 1:
            continue
        precision = _precision_used(r)
        if precision is None:
            continue
        k = r.get("pack_size") or 1
        # a pack's runs share the allocation's GPUs: the runs on one device are k / GPUs
        per_device = max(k // (r.get("alloc_gpus") or 1), 1) if r["device_name"] != "cpu" else k
        sample = PackSample(k=per_device, images_per_s=r["images_per_s"], device=r["device_name"], precision=precision)
        out.setdefault((r["model"], r["batch_size"]), []).append(sample)
    return out


def from_bench_packs(rows: Iterable[dict]) -> tuple[dict[tuple, list[MemorySample]], dict[tuple, list[PackSample]]]:
    """Pure: ``cifarbench bench --what pack`` rows -> (model, batch size) -> each run's peak (device memory on a GPU,
    resident memory on a CPU), and -> each run's images/s at k runs at once."""
    memory: dict[tuple, list[MemorySample]] = {}
    packs: dict[tuple, list[PackSample]] = {}
    for r in rows:
        if r.get("what") != "pack" or not r.get("pack") or not r.get("device") or not r.get("precision"):
            continue
        key, k, gpu = (r["model"], r["batch_size"]), r["pack"], r["device"] != "cpu"
        if r.get("images_per_s"):
            packs.setdefault(key, []).append(
                PackSample(k=k, images_per_s=r["images_per_s"] / k, device=r["device"], precision=r["precision"])
            )
        if r.get("peak_memory_mb"):
            per_run = r["peak_memory_mb"] / k
            sample = MemorySample(
                host_mb=None if gpu else per_run,
                device_mb=per_run if gpu else None,
                device=r["device"],
                precision=r["precision"],
                data_images=TRAIN_IMAGES + TEST_IMAGES,
                share=PACK if k > 1 else ALONE,
                k=k,
                source="bench",
            )
            memory.setdefault(key, []).append(sample)
    return memory, packs


def samples_from_bench(rows: Iterable[dict]) -> dict[tuple, list[Sample]]:
    """Pure: (configuration, ALONE, 1) -> samples, from ``cifarbench bench`` rows (the "lightning fit" ones)."""
    out: dict[tuple, list[Sample]] = {}
    for r in rows:
        variant = r.get("variant") or ""
        if r.get("what") != "train" or not variant.startswith("lightning fit") or "whole epoch" in variant:
            continue
        if not r.get("images_per_s") or not r.get("eval_images_per_s") or r.get("dataset") not in DATASETS:
            continue
        if not r.get("device") or not r.get("precision"):
            continue
        mode = variant.partition("torch.compile ")[2] or None
        config = _config(r["model"], DATASETS[r["dataset"]].num_classes, r["batch_size"], "device", mode)
        cpus = r.get("torch_threads") if r["device"] == "cpu" else None
        sample = Sample(
            train_s=TRAIN_IMAGES / r["images_per_s"],
            test_s=TEST_IMAGES / r["eval_images_per_s"],
            images=STANDARD_IMAGES,
            device=r["device"],
            precision=r["precision"],
            cpus=cpus,
        )
        out.setdefault((config, ALONE, 1), []).append(sample)
    return out


def precisions(spec: RunSpec, resources: Resources) -> tuple[str, ...]:
    """The precisions a run trains in on the device ``resources`` asks for, in order of preference: the requested
    one, or for ``auto`` bf16-mixed (else 16-mixed) on a GPU and 32-true on a CPU."""
    if spec.precision != "auto":
        return (spec.precision,)
    return GPU_PRECISIONS if resources.gpus_per_node else ("32-true",)


def _figure(
    samples: Sequence[Sample],
    spec: RunSpec,
    resources: Resources,
    source: str,
    images: tuple[int, int],
    world: int = 1,
) -> Figure | None:
    """Pure: the figure of the samples measured on the kind of device ``resources`` asks for, in the precision
    the run will train in, projected onto the training and test ``images`` it will take; None when none fits.
    ``source``: "records" or "bench"; ``world``: the processes the samples trained on (CPU figures scale by the
    cores of that many of the task's processes)."""
    gpu = resources.gpus_per_node > 0
    cores = resources.cpus_per_task * world
    fitting = [s for s in samples if (s.device != "cpu") == gpu]
    for precision in precisions(spec, resources):
        chosen = [s for s in fitting if s.precision == precision]
        if chosen:
            break
    else:
        return None
    typed = ""
    if gpu and resources.gpu_type:
        own = [s for s in chosen if resources.gpu_type.lower() in s.device.lower()]
        chosen, typed = (own, f" ({resources.gpu_type})") if own else (chosen, f" (none of {resources.gpu_type})")
    by_device: dict[str, list[tuple[float, float | None]]] = {}
    scaled: set[str] = set()
    sizes = set()
    for s in chosen:
        per_epoch = s.train_s * images[0] / s.images[0] + s.test_s * images[1] / s.images[1]
        if s.images != images:
            sizes.add(s.images)
        if not gpu and s.cpus and s.cpus != cores:  # CPU figures scale with the cores
            per_epoch *= s.cpus / cores
            scaled.add(f"{s.cpus}")
        by_device.setdefault(s.device, []).append((per_epoch, s.start_s))
    # the slowest device counts
    device, figures = max(by_device.items(), key=lambda kv: statistics.median(f for f, _ in kv[1]))
    median = statistics.median(f for f, _ in figures)
    # the longest start-up measured: a task in a fresh process (every SLURM task) pays for the imports that a later
    # task of a local job does not
    starts = [start for _, start in figures if start is not None]
    start_s = max(starts) if starts else None
    scaled_cores = f", scaled from {'/'.join(sorted(scaled))} to {cores} cores" if scaled else ""
    what = "record" if source == "records" else "bench row"
    started = f", start-up {start_s:.0f} s" if start_s is not None else ""
    scaled_images = ""
    if sizes:
        measured = _images(*sizes.pop()) if len(sizes) == 1 else "several sizes"
        scaled_images = f", scaled from {measured} to {_images(*images)} images"
    detail = (
        f"{plural(len(figures), what)} on {device}{typed}, {precision}{scaled_cores}{scaled_images}: "
        f"{median:.1f} s/epoch{started}"
    )
    return Figure(per_epoch=median, start_s=start_s, source=source, detail=detail)


def _images(train: int, test: int) -> str:
    return f"{train:,} + {test:,}"


def _alone(spec: RunSpec, resources: Resources, evidence: Evidence, images: tuple[int, int]) -> Figure:
    """The figure of the run trained alone: records (of its world size), else bench, else the prior; for a run
    of several processes without records of as many, one device's figure, no speed-up assumed."""
    world = spec.world_size
    config = _config(spec.model, spec.dataset, spec.batch_size, spec.loader, spec.compile, world)
    found = evidence.figure("records", (config, ALONE, 1), spec, resources, images)
    if found is not None:
        return found if world == 1 else replace(found, detail=f"{world} processes: {found.detail}")
    if world > 1:
        one = _alone(replace(spec, gpus_per_run=1, nodes=1), resources, evidence, images)
        detail = f"no records of {world} processes: one device's figure, no speed-up assumed (a generous limit); "
        return replace(one, detail=detail + one.detail)
    if spec.loader == "device":  # bench measures the device loader
        config = _config(spec.model, spec.num_classes, spec.batch_size, "device", spec.compile)
        found = evidence.figure("bench", (config, ALONE, 1), spec, resources, images)
        if found is not None:
            return found
    per_epoch, detail = prior_per_epoch(spec, resources, images)
    return Figure(per_epoch=per_epoch, start_s=None, source="prior", detail=detail)


def prior_per_epoch(
    spec: RunSpec, resources: Resources, images: tuple[int, int] = STANDARD_IMAGES
) -> tuple[float, str]:
    macs = ARCHS[spec.model].macs
    if resources.gpus_per_node > 0:
        flops, kind = PRIOR_FLOPS["gpu"], f"GPU at {PRIOR_FLOPS['gpu'] / 1e12:g} TFLOP/s"
    else:
        flops = PRIOR_FLOPS["cpu_core"] * resources.cpus_per_task
        kind = f"{resources.cpus_per_task} CPU cores at {PRIOR_FLOPS['cpu_core'] / 1e9:g} GFLOP/s each"
    seconds = (images[0] * 6 + images[1] * 2) * macs / flops
    return seconds, f"{macs / 1e6:.0f}M MACs on a {kind}, {_images(*images)} images: {seconds:.1f} s/epoch"


def _shared(
    spec: RunSpec, resources: Resources, evidence: Evidence, share: str, k: int, images: tuple[int, int]
) -> Figure:
    """The figure of a task of ``k`` such runs trained as ``share`` (PACK or FUSE)."""
    config = _config(spec.model, spec.dataset, spec.batch_size, spec.loader, spec.compile)
    what = f"packed {k} per task" if share == PACK else f"fused x{k}"
    found = evidence.figure("records", (config, share, k), spec, resources, images)
    if found is not None:
        return replace(found, detail=f"{what}: {found.detail}")
    if share == FUSE:  # the nearest group size measured: as it is where it was larger, scaled where smaller
        measured = [key[2] for key in evidence.records if key[:2] == (config, FUSE)]
        for n in sorted(measured, key=lambda n: (abs(n - k), -n)):
            found = evidence.figure("records", (config, FUSE, n), spec, resources, images)
            if found is not None:
                factor = max(k / n, 1.0)
                scaled = f", x{k}/{n}" if factor > 1 else ""
                detail = f"fused x{k} from fused x{n}{scaled}: {found.detail}"
                return replace(found, per_epoch=found.per_epoch * factor, detail=detail)
    alone = _alone(spec, resources, evidence, images)
    # a pack's runs go to its GPUs round robin: those on different GPUs run side by side
    per_gpu = -(-k // resources.gpus_per_node) if share == PACK and resources.gpus_per_node else k
    each = f"{per_gpu} per GPU on {resources.gpus_per_node}" if per_gpu != k else f"{k}"
    detail = f"{what}, no gain assumed: {each} x one run alone; {alone.detail}"
    return replace(alone, per_epoch=alone.per_epoch * per_gpu, detail=detail)


def planned_images(spec: RunSpec, data: Mapping[tuple[str, str], tuple[int, int]] | None) -> tuple[int, int]:
    """Pure: the training and test images ``spec`` will take an epoch: its data's (``data``: (dataset, data root)
    -> its training and test images, as ``store.datasets.image_counts`` counts them; CIFAR's where it does not
    say), less the validation split."""
    train, test = (data or {}).get((spec.dataset, spec.data_root), STANDARD_IMAGES)
    return train - spec.held_out, test


def estimate_task(
    specs: Sequence[RunSpec],
    resources: Resources,
    evidence: Evidence,
    *,
    fused: bool = False,
    data: Mapping[tuple[str, str], tuple[int, int]] | None = None,
) -> Estimate:
    """Pure: how long one array task takes: ``specs`` trained alone (one), packed ``resources.pack`` per task, or
    fused as one group (``fused``), on the images ``data`` counts (``planned_images``)."""
    if fused:
        share, k = FUSE, len(specs)
    elif resources.runs_per_task > 1:
        share, k = PACK, resources.runs_per_task
    else:
        share, k = ALONE, 1
    longest: tuple[float, Figure, RunSpec] | None = None
    for spec in specs[:1] if fused else specs:  # a fused group's members differ only in their seed
        images = planned_images(spec, data)
        if share == ALONE:
            figure = _alone(spec, resources, evidence, images)
        else:
            figure = _shared(spec, resources, evidence, share, k, images)
        start = START_S if figure.start_s is None else figure.start_s
        seconds = start + spec.schedule.epochs * figure.per_epoch
        if longest is None or seconds > longest[0]:
            longest = (seconds, figure, spec)
    assert longest is not None, "a task has at least one run"
    seconds, figure, spec = longest
    of = f" (the longest of {plural(len(specs), 'run')})" if len(specs) > 1 and not fused else ""
    detail = f"{spec.schedule.epochs} epochs{of}; {figure.detail}"
    return Estimate(seconds=seconds, source=figure.source, detail=detail)


def time_limit(estimate_s: float, margin: float, max_time_s: int | None) -> tuple[int, bool]:
    """Pure: (the limit for a task estimated at ``estimate_s``, whether the partition's MaxTime capped it)."""
    wanted = max(MIN_LIMIT_S, math.ceil(estimate_s * margin / ROUND_S) * ROUND_S)
    if max_time_s is not None and wanted > max_time_s:
        return max_time_s, True
    return wanted, False


def read_evidence(
    results: str | os.PathLike, summaries: dict[str, dict] | None = None, *, memory: bool = True
) -> Evidence:
    """The records' and the bench tables' figures under ``results`` (see the module's docstring); with ``memory``
    also their peaks and packed throughput (for ``mem_gb: auto`` and ``pack: auto``, which a grid may not use)."""
    layout = Layout(results)
    if summaries is None:
        summaries = scan.summaries(results, RECORD_FIELDS) if layout.runs.is_dir() else {}
    rows: list[dict] = []
    for path in sorted(Path(layout.bench).glob("*.parquet")):
        try:
            table = pq.ParquetFile(path).read()
            names = [n for n in ("what", "variant", "images_per_s", "eval_images_per_s", "model", "dataset",
                                 "batch_size", "precision", "device", "torch_threads", "pack", "peak_memory_mb")
                     if n in table.column_names]  # fmt: skip
            rows += table.select(names).to_pylist()
        except (OSError, ValueError):
            continue  # a table being written or damaged: the next evidence serves
    found = Evidence(records=samples_from_records(summaries.values()), bench=samples_from_bench(rows))
    if not memory:
        return found
    bench_memory, bench_packs = from_bench_packs(rows)
    peaks = memory_from_records(summaries.values())
    packs = packs_from_records(summaries.values())
    for key, measured in bench_memory.items():
        peaks.setdefault(key, []).extend(measured)
    for key, rates in bench_packs.items():
        packs.setdefault(key, []).extend(rates)
    return replace(found, memory=peaks, packs=packs)
