"""How long a run will take, and the time limit ``time: auto`` asks for.

A run's duration is its epochs times the seconds of one epoch (training set, then the test set), taken from the
best evidence there is, in this order:

1. completed records in the results folder of runs with the same model, dataset, batch size, precision, loader
   and compile mode: their seconds per epoch (training plus test time), the median per device;
2. ``cifarbench bench`` tables under ``results/bench/``: the "lightning fit" rows of the same model, number of
   classes, batch size and compile mode, projected onto CIFAR's 50,000 training and 10,000 test images;
3. a prior from the model's multiply-adds (``config.spec.ARCHS``): 6 FLOPs per MAC and image to train, 2 to
   test, at PRIOR_FLOPS, a deliberately low sustained rate for each kind of device.

Where evidence comes from several devices (a grid does not know which node a run will get), the slowest counts.
The limit is the estimate times ``time_margin``, rounded up to 5 minutes, at least 10 minutes, and at most the
partition's MaxTime: a longer run is carried across limits by requeue and resume.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

from cifarbench.config.resources import AUTO, Budget, Resources, format_time
from cifarbench.config.spec import ARCHS, DATASETS, RunSpec
from cifarbench.errors import plural
from cifarbench.store import scan
from cifarbench.store.layout import Layout

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000  # CIFAR's splits: what bench figures are projected onto
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
    "run_id", "status", "model", "dataset", "batch_size", "precision", "loader", "compile", "epochs_done",
    "train_seconds", "test_seconds", "device_name",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Estimate:
    seconds: float  # the whole run: start-up and every epoch
    source: str  # "records", "bench" or "prior"
    detail: str  # what exactly, e.g. "3 records on NVIDIA H100 80GB HBM3: 14.2 s/epoch"


def _key(model: str, dataset: str, batch_size: int, precision: str, loader: str, compile: str | None) -> tuple:
    return (model, dataset, batch_size, precision, loader, compile)


def per_epoch_from_records(summaries: Iterable[dict]) -> dict[tuple, tuple[float, str]]:
    """Pure: configuration key -> (seconds per epoch on the slowest device, a description), from completed
    records' summaries (RECORD_FIELDS)."""
    by_device: dict[tuple, dict[str, list[float]]] = {}
    for r in summaries:
        if r["status"] != "completed" or not r["epochs_done"] or r["train_seconds"] is None:
            continue
        test = r["test_seconds"] if r["test_seconds"] is not None else r["train_seconds"] * TEST_SHARE_OF_TRAINING
        key = _key(r["model"], r["dataset"], r["batch_size"], r["precision"], r["loader"], r["compile"])
        device = r["device_name"] or "an unrecorded device"
        by_device.setdefault(key, {}).setdefault(device, []).append((r["train_seconds"] + test) / r["epochs_done"])
    return {
        key: (median, f"{plural(n, 'record')} on {device}: {median:.1f} s/epoch")
        for key, (median, device, n) in _slowest(by_device).items()
    }


def per_epoch_from_bench(rows: Iterable[dict]) -> dict[tuple, tuple[float, str]]:
    """Pure: (model, classes, batch size, precision, compile) -> (seconds per epoch on the slowest device, a
    description), from ``cifarbench bench`` rows (the "lightning fit" ones)."""
    by_device: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        variant = r.get("variant") or ""
        if r.get("what") != "train" or not variant.startswith("lightning fit") or "whole epoch" in variant:
            continue
        if not r.get("images_per_s") or not r.get("eval_images_per_s") or r.get("dataset") not in DATASETS:
            continue
        mode = variant.partition("torch.compile ")[2] or None
        key = (r["model"], DATASETS[r["dataset"]].num_classes, r["batch_size"], r["precision"], mode)
        seconds = TRAIN_IMAGES / r["images_per_s"] + TEST_IMAGES / r["eval_images_per_s"]
        by_device.setdefault(key, {}).setdefault(r.get("device") or "an unrecorded device", []).append(seconds)
    return {
        key: (median, f"bench on {device}: {median:.1f} s/epoch of 50,000 + 10,000 images")
        for key, (median, device, _) in _slowest(by_device).items()
    }


def _slowest(by_device: dict[tuple, dict[str, list[float]]]) -> dict[tuple, tuple[float, str, int]]:
    """key -> (the median seconds per epoch of the slowest device, that device, how many figures it had): a grid
    does not know which node a run will get."""
    out = {}
    for key, devices in by_device.items():
        device, seconds = max(devices.items(), key=lambda kv: statistics.median(kv[1]))
        out[key] = (statistics.median(seconds), device, len(seconds))
    return out


def prior_per_epoch(spec: RunSpec, resources: Resources) -> tuple[float, str]:
    macs = ARCHS[spec.model].macs
    if resources.gpus_per_node > 0:
        flops, kind = PRIOR_FLOPS["gpu"], f"GPU at {PRIOR_FLOPS['gpu'] / 1e12:g} TFLOP/s"
    else:
        flops = PRIOR_FLOPS["cpu_core"] * resources.cpus_per_task
        kind = f"{resources.cpus_per_task} CPU cores at {PRIOR_FLOPS['cpu_core'] / 1e9:g} GFLOP/s each"
    seconds = (TRAIN_IMAGES * 6 + TEST_IMAGES * 2) * macs / flops
    return seconds, f"prior: {macs / 1e6:.0f}M MACs on a {kind}: {seconds:.1f} s/epoch"


def estimate(
    spec: RunSpec,
    resources: Resources,
    records: Mapping[tuple, tuple[float, str]],
    bench: Mapping[tuple, tuple[float, str]],
) -> Estimate:
    """Pure: the run's duration from the evidence (``per_epoch_from_records``, ``per_epoch_from_bench``)."""
    epochs = spec.schedule.epochs
    found = records.get(_key(spec.model, spec.dataset, spec.batch_size, spec.precision, spec.loader, spec.compile))
    source = "records"
    if found is None and spec.loader == "device":  # bench measures the device loader
        classes = DATASETS[spec.dataset].num_classes
        precisions = ("bf16-mixed", "16-mixed", "32-true") if spec.precision == "auto" else (spec.precision,)
        found = next(
            (bench[k] for p in precisions if (k := (spec.model, classes, spec.batch_size, p, spec.compile)) in bench),
            None,
        )
        source = "bench"
    if found is None:
        found, source = prior_per_epoch(spec, resources), "prior"
    per_epoch, detail = found
    return Estimate(seconds=START_S + epochs * per_epoch, source=source, detail=f"{epochs} epochs; {detail}")


def time_limit(estimate_s: float, margin: float, max_time_s: int | None) -> tuple[int, bool]:
    """Pure: (the limit for a run estimated at ``estimate_s``, whether the partition's MaxTime capped it)."""
    wanted = max(MIN_LIMIT_S, math.ceil(estimate_s * margin / ROUND_S) * ROUND_S)
    if max_time_s is not None and wanted > max_time_s:
        return max_time_s, True
    return wanted, False


def read_evidence(
    results: str | os.PathLike, summaries: dict[str, dict] | None = None
) -> tuple[dict[tuple, tuple[float, str]], dict[tuple, tuple]]:
    """The records' and the bench tables' seconds per epoch under ``results`` (see the module's docstring)."""
    layout = Layout(results)
    if summaries is None:
        summaries = scan.summaries(results, RECORD_FIELDS) if layout.runs.is_dir() else {}
    records = per_epoch_from_records(summaries.values())
    rows: list[dict] = []
    for path in sorted(Path(layout.bench).glob("*.parquet")):
        try:
            table = pq.ParquetFile(path).read()
            names = [n for n in ("what", "variant", "images_per_s", "eval_images_per_s", "model", "dataset",
                                 "batch_size", "precision", "device") if n in table.column_names]  # fmt: skip
            rows += table.select(names).to_pylist()
        except (OSError, ValueError):
            continue  # a table being written or damaged: the next evidence serves
    return records, per_epoch_from_bench(rows)


@dataclass(frozen=True, kw_only=True)
class Planned:
    """A run as it will be submitted: its resources with any ``time: auto`` resolved, and its budget."""

    spec: RunSpec
    resources: Resources
    estimate: Estimate
    budget: Budget
    auto: bool  # the limit came from the estimate (``time: auto``)
    capped: bool  # the partition's MaxTime cut the limit ``time: auto`` wanted


def plan_times(
    specs: Iterable[RunSpec],
    resources: Mapping[str, Resources],
    results: str | os.PathLike,
    max_time: Mapping[str | None, int | None] | None = None,
    summaries: dict[str, dict] | None = None,
) -> list[Planned]:
    """Every run with an estimate, and ``time: auto`` turned into a limit. ``max_time``: partition (None: the
    default one) -> its MaxTime in seconds (None: unlimited); empty where the cluster is not asked (local runs).
    ``summaries``: the records' summaries (RECORD_FIELDS at least), where the caller has read them already."""
    specs = list(specs)
    records, bench = read_evidence(results, summaries)
    out = []
    for spec in specs:
        r = resources[spec.run_id]
        est = estimate(spec, r, records, bench)
        if r.pack > 1:  # no gain assumed: each of K runs at once as slow as K runs one after another
            epochs_s = (est.seconds - START_S) * r.pack
            est = replace(est, seconds=START_S + epochs_s, detail=f"{est.detail}; x{r.pack}, packed {r.pack} per task")
        capped, auto = False, r.time == AUTO
        if auto:
            seconds, capped = time_limit(est.seconds, r.time_margin, (max_time or {}).get(r.partition))
            r = replace(r, time=format_time(seconds))
        budget = Budget(
            time_limit_s=r.seconds,
            estimated_s=round(est.seconds, 1),
            estimate_source=f"{est.source}: {est.detail}",
        )
        out.append(Planned(spec=spec, resources=r, estimate=est, budget=budget, auto=auto, capped=capped))
    return out
