"""The per-run Parquet record (``runs/<run_id>/record.parquet``): explicit versioned schema, atomic write,
tolerant reads of the whole file or of its footer summary alone.

A record (``record/8``) is a one-row Parquet file in SCHEMA, each column's field described in its metadata. Its
schema metadata, stored in the Parquet footer, holds two keys: ``cifarbench.schema`` = ``record/8`` says what the
file is, and ``cifarbench.summary`` is a compact JSON object of SUMMARY_FIELDS, the scalars that collect's tables
are made of, with the columns' values (null where a column is; ``ended_at`` as an ISO 8601 string; ``error`` its
first line only; NaN as Python's json writes it; no curves). The summary is the footer index: reading a footer
costs half of reading even a few columns of a one-row file, so a collector that reads footers only gets through
10,000 records in seconds. The columns stay the source of truth: curves, and everything else, are read from them.

Beside each record, ``write_record`` writes its summary file (``runs/<run_id>/record.json``, see
``summary_file``): the footer's summary, DETAILS and the test-accuracy curve, which is all that collect, status and
report.html read of a run, at the cost of a small JSON read instead of a Parquet open. It is a copy, used only
where it names the record as it is now; a record without one (an earlier version's) is read as before.

Records of an older version stay readable: OLDER says which columns (and summary keys) each one lacks and what
they stand for, and every reader (``read_record``, ``scan``) fills them in from it. A tag this cifarbench does
not know (record/0, or a newer one) is not a record to it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import secrets
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifarbench.config.spec import RunSpec
from cifarbench.store import atomic
from cifarbench.store.layout import Layout

RECORD_VERSION = 8
SCHEMA_KEY = b"cifarbench.schema"
SCHEMA_TAG = f"record/{RECORD_VERSION}".encode()
SUMMARY_KEY = b"cifarbench.summary"

_floats = pa.list_(pa.float64())
_ts = pa.timestamp("us", tz="UTC")

# Every column with what it holds, stored as its Parquet field's "description" metadata (so a record describes
# itself to any Parquet reader) and rendered into docs/records.md by schema_markdown. Descriptions are
# documentation: they do not change the record version, and records written without them read the same.
DESCRIPTION = b"description"
_COLUMNS = [
    (
        "record_version",
        pa.int32(),
        "The record schema's version (8: `record/8`); files of versions 1 to 7 are read with the columns they lack "
        "filled in.",
    ),
    (
        "run_id",
        pa.string(),
        "The run id, `<model>-<dataset>-v<spec version>-<12 hex digits>`: a hash of the fields that change the "
        "result; the run's folder under `runs/`.",
    ),
    (
        "status",
        pa.string(),
        "`completed` (every epoch ran) or `failed` (see `error`; one that starts `Cancelled:` reads as cancelled in "
        "`status`, tables.md and report.html).",
    ),
    ("model", pa.string(), "Model name, e.g. `resnet56` (`cifarbench models` lists them)."),
    ("dataset", pa.string(), "`cifar10`, `cifar100`, or their synthetic stand-ins `synthetic10`, `synthetic100`."),
    (
        "recipe",
        pa.string(),
        "Name of the optimisation recipe (`step-160`, `step-200`, `cos-200`, or one defined in a grid).",
    ),
    (
        "recipe_epochs",
        pa.int32(),
        "The recipe's own length in epochs; differs from `epochs` where the run was shortened.",
    ),
    ("lr", pa.float64(), "SGD's initial learning rate."),
    ("momentum", pa.float64(), "SGD momentum."),
    ("weight_decay", pa.float64(), "SGD weight decay (L2 penalty)."),
    (
        "schedule",
        pa.string(),
        "Learning-rate schedule: `step` (MultiStepLR: times `gamma` at each milestone) or `cos` (CosineAnnealingLR, "
        "T_max = `epochs`).",
    ),
    (
        "milestones",
        pa.list_(pa.int32()),
        "Epochs (iterations where `milestone_unit` says so) after which a `step` schedule multiplies the learning "
        "rate by `gamma`, as run (scaled where the run was shortened; a repeated one applies twice); empty for `cos`.",
    ),
    ("gamma", pa.float64(), "The factor a `step` schedule multiplies the learning rate by at each milestone."),
    (
        "milestone_unit",
        pa.string(),
        "What the recipe's length and `milestones` count: `epochs`, or `iterations` (optimizer steps; the cosine's "
        "period too); null in records written before it existed (epochs).",
    ),
    (
        "iterations",
        pa.int64(),
        "Optimizer steps the run was set to train (epochs times batches per epoch, or a recipe's `iterations`, "
        "where the last epoch may stop part-way).",
    ),
    (
        "warmup_iterations",
        pa.int64(),
        "Optimizer steps of warm-up as run: 0 where the recipe has none or this model is shallower than it warms "
        "up (e.g. he2016 and akamaster: depth 110 and more).",
    ),
    ("warmup_lr", pa.float64(), "The learning rate the warm-up starts at; null without warm-up."),
    (
        "warmup_mode",
        pa.string(),
        "`constant` (the whole warm-up at `warmup_lr`) or `linear` (rising from it to `lr`); null without warm-up.",
    ),
    ("batch_size", pa.int32(), "Training images per step (the test set is read 1,000 images at a time)."),
    ("seed", pa.int64(), "Random seed of the weight initialisation, the data order and the augmentation."),
    (
        "epochs",
        pa.int32(),
        "Epochs the run was set to train: the recipe's length, or the shorter one `--epochs` / `epochs:` asked for.",
    ),
    ("precision", pa.string(), "Precision as requested: `auto`, `32-true`, `16-mixed` or `bf16-mixed`."),
    (
        "precision_used",
        pa.string(),
        "Precision the run trained in (`auto` resolved: `bf16-mixed` or `16-mixed` on a GPU, `32-true` on a CPU); "
        "null if the run failed before training began.",
    ),
    (
        "loader",
        pa.string(),
        "`device` (the whole split on the training device, crops and flips as batched tensor operations) or "
        "`torchvision` (per-image PIL transforms in a DataLoader).",
    ),
    (
        "deterministic",
        pa.bool_(),
        "Whether deterministic algorithms were required (identical results when rerun or resumed on a CPU).",
    ),
    (
        "world_size",
        pa.int32(),
        "Processes that trained the run together (DDP: `gpus_per_run` x `nodes`, one device each, the batch size "
        "the global batch); 1: one device. Older records (before record/8) read 1.",
    ),
    (
        "sync_bn",
        pa.bool_(),
        "Whether BatchNorm's statistics were the global batch's (`sync_bn: true`, as on one device) or each "
        "device's share's; null where `world_size` is 1.",
    ),
    ("compile", pa.string(), "The torch.compile mode requested; null: eager."),
    (
        "compile_fallback",
        pa.string(),
        "Null, or why a run that asked for torch.compile trained eagerly (compiling a training step failed).",
    ),
    ("data_root", pa.string(), "The data folder the run read, as an absolute path on the host that ran it."),
    (
        "data_verified",
        pa.bool_(),
        "Whether the data files matched the published CIFAR checksums; false: `verify: false` (a copy in the same "
        "layout accepted); null for synthetic data, which has no published checksums.",
    ),
    (
        "data_fingerprint",
        pa.string(),
        "Null for the checksum-verified CIFAR; otherwise a hash of the data files' names, sizes and md5s (16 hex "
        "digits), which is also part of the run id.",
    ),
    (
        "val_split",
        pa.int32(),
        "Training images held out for validation (chosen from a fixed seed, the same for every run); 0: none.",
    ),
    ("train_images", pa.int32(), "Images the run trained on (the training set less the validation split)."),
    ("val_images", pa.int32(), "Images in the validation split; 0: none."),
    ("test_images", pa.int32(), "Images in the test set."),
    ("num_classes", pa.int32(), "Classes of the dataset: 10 or 100."),
    ("params", pa.int64(), "Parameters of the model (all trainable)."),
    (
        "epochs_done",
        pa.int32(),
        "Epochs finished (training pass and test pass), over all attempts; 0 when the run failed before its first "
        "epoch ended.",
    ),
    (
        "final_test_acc",
        pa.float64(),
        "Top-1 test accuracy after the last epoch done, a fraction from 0 to 1; null when no epoch was done.",
    ),
    (
        "best_test_acc",
        pa.float64(),
        "The highest top-1 test accuracy of any epoch, 0 to 1 (chosen on the test set, so optimistic).",
    ),
    ("best_epoch", pa.int32(), "The epoch of `best_test_acc`, counted from 1 (the first of equals)."),
    (
        "final_test_top5",
        pa.float64(),
        "Top-5 test accuracy after the last epoch done, 0 to 1; null for datasets of fewer than 100 classes, where "
        "top-5 says little.",
    ),
    (
        "best_test_top5",
        pa.float64(),
        "The highest top-5 test accuracy of any epoch, 0 to 1 (not necessarily at `best_epoch`); null below 100 "
        "classes.",
    ),
    (
        "final_train_loss",
        pa.float64(),
        "Mean cross-entropy over the training images of the last epoch (augmented, while the weights changed).",
    ),
    ("final_test_loss", pa.float64(), "Mean cross-entropy over the test set after the last epoch."),
    ("train_loss", _floats, "Mean training cross-entropy of each epoch, epoch 1 first."),
    ("test_loss", _floats, "Mean test cross-entropy after each epoch, epoch 1 first."),
    ("test_acc", _floats, "Top-1 test accuracy (0 to 1) after each epoch, epoch 1 first."),
    ("test_top5", _floats, "Top-5 test accuracy (0 to 1) after each epoch, epoch 1 first; null below 100 classes."),
    ("val_loss", _floats, "Mean cross-entropy on the validation split after each epoch; null without one."),
    ("val_acc", _floats, "Top-1 accuracy on the validation split after each epoch, epoch 1 first; null without one."),
    ("best_val_acc", pa.float64(), "The highest validation accuracy of any epoch; null without a validation split."),
    (
        "best_val_epoch",
        pa.int32(),
        "The epoch of `best_val_acc`, counted from 1 (the first of equals): the epoch a protocol with a validation "
        "split selects; null without one.",
    ),
    (
        "test_acc_at_best_val",
        pa.float64(),
        "Top-1 test accuracy at `best_val_epoch`: the model selected without looking at the test set; null without "
        "a validation split.",
    ),
    ("lr_curve", _floats, "The learning rate each epoch trained with, epoch 1 first."),
    (
        "epoch_seconds",
        _floats,
        "Wall-clock seconds of each epoch, from the start of its training pass to the end of its test pass, epoch 1 "
        "first.",
    ),
    (
        "train_seconds",
        pa.float64(),
        "Seconds in training passes, summed over every epoch and attempt (start-up, the compile probe and checkpoint "
        "writes not counted).",
    ),
    (
        "test_seconds",
        pa.float64(),
        "Seconds in test passes, summed over every epoch and attempt (record/3; null before).",
    ),
    (
        "images_per_s",
        pa.float64(),
        "Training throughput: the mean over epochs of each epoch's training images divided by its training-pass "
        "seconds (test passes not counted).",
    ),
    (
        "attempts",
        pa.int32(),
        "How often the run was started: 1, plus one for each time it resumed from its checkpoint (requeue, retry).",
    ),
    (
        "time_limit_s",
        pa.int64(),
        "The time limit `submit` gave the run's array task, in seconds (on SLURM, the job's `--time`); null: started "
        "by `cifarbench run`, or written before record/3.",
    ),
    (
        "estimated_s",
        pa.float64(),
        "The duration of the run's array task (the run, its pack or its fused group) as `submit` estimated it, in "
        "seconds: start-up plus epochs times the task's seconds per epoch; `time: auto` sets the limit from this "
        "times `time_margin`. Null: started by `cifarbench run`, or written before record/3.",
    ),
    (
        "estimate_source",
        pa.string(),
        "Where that estimate came from: `records: ...`, `bench: ...` or `prior: ...`, with the detail: device, "
        "precision, pack or group, scaling (e.g. `records: 2 epochs; 3 records on cpu, 32-true: 18.0 s/epoch`).",
    ),
    (
        "pack_size",
        pa.int32(),
        "How many runs trained concurrently in the run's job (`pack:`), sharing its GPU or splitting its CPUs; 1: "
        "alone. Null: written by an earlier cifarbench.",
    ),
    (
        "packed_with",
        pa.list_(pa.string()),
        "The run ids of the other runs of the same packed job (the last attempt's); empty when trained alone.",
    ),
    (
        "mps",
        pa.string(),
        "How packed runs shared the GPU: `on` (through a CUDA MPS server the job started) or `off` (time-sliced); "
        "null when no GPU was shared (trained alone, or packed on CPUs).",
    ),
    (
        "alloc_gpus",
        pa.int32(),
        "GPUs of the allocation (the array task) the run trained in, shared with the rest of its pack or fused "
        "group; a run on several processes counts every node's (GPUs per node x nodes); 0: CPUs only. Null: "
        "written before record/5.",
    ),
    (
        "alloc_cpus",
        pa.int32(),
        "CPU cores of that allocation (SLURM's CPUs per task, times its tasks for a run on several processes; "
        "locally, the cores the job was given). Null: written before record/5.",
    ),
    (
        "wall_seconds",
        pa.float64(),
        "Wall-clock seconds the run's process spent, from its start to this record, summed over attempts (an "
        "attempt that ended without a record counts up to its last checkpoint). A pack's or fused group's task "
        "took the longest of its runs' (a fused group's members share theirs). Null: written before record/5, or "
        "by a process that was killed.",
    ),
    (
        "peak_host_mb",
        pa.float64(),
        "Peak resident memory (RSS, MiB) of the process that trained the run, during the attempt that wrote this "
        "record (on Linux its high-water mark, reset as the attempt starts; elsewhere the process's lifetime peak). "
        "A fused group's members each hold the group's peak; a packed run its own worker process's. Null: written "
        "before record/6, or by a process that was killed.",
    ),
    (
        "peak_device_mb",
        pa.float64(),
        "Peak GPU memory PyTorch allocated (MiB; `torch.cuda.max_memory_allocated`, its caching allocator reserves "
        "more) during the attempt that wrote this record. A fused group's members each hold the group's peak; a "
        "packed run its own worker process's. Null: no GPU trained, written before record/6, or by a process that "
        "was killed.",
    ),
    (
        "started_at",
        _ts,
        "When the attempt that wrote this record started (UTC); earlier attempts of a resumed run started before.",
    ),
    ("ended_at", _ts, "When this record was written (UTC)."),
    ("hostname", pa.string(), "Host of the attempt that wrote this record."),
    ("device_name", pa.string(), "The GPU's name, or `cpu`."),
    ("device_count", pa.int32(), "GPUs visible to the job; 1 on a CPU."),
    ("torch_version", pa.string(), "PyTorch's version."),
    ("torchvision_version", pa.string(), "torchvision's version."),
    ("lightning_version", pa.string(), "Lightning's version."),
    ("cifarbench_version", pa.string(), "cifarbench's version."),
    ("cuda_version", pa.string(), "The CUDA version PyTorch was built with; null for a CPU-only build."),
    ("git_commit", pa.string(), "The commit of the cifarbench checkout that ran; null outside a git checkout."),
    ("slurm_job_id", pa.string(), "The SLURM job id (an array task's array job id); null outside SLURM."),
    ("slurm_array_task_id", pa.string(), "The task's index in its SLURM job array; null outside an array."),
    (
        "python",
        pa.string(),
        "The interpreter that trained the run, as its `sys.executable` (inside the image where there was one): the "
        "grid's `python:` where that names one, the one its launcher prefix started, or else the submitting "
        "host's. Null: written before record/7, or by `status` for a run SLURM killed for its memory.",
    ),
    (
        "container",
        pa.string(),
        "The Apptainer/Singularity image the run trained in (`container:`, as the runtime names it inside: "
        "`APPTAINER_CONTAINER` or `SINGULARITY_CONTAINER`); null outside an image, written before record/7, or by "
        "`status` for a run SLURM killed for its memory.",
    ),
    (
        "fuse_size",
        pa.int32(),
        "Runs trained together as one fused group (`fuse: seeds`: runs that differ only in their seed, stacked "
        "into one vectorised model), this one included; null: trained alone.",
    ),
    (
        "fused_with",
        pa.list_(pa.string()),
        "The run ids of the other members of this run's fused group; null: trained alone.",
    ),
    (
        "error",
        pa.string(),
        "Why a failed run failed: the exception as `Type: message`, its first line, at most 500 characters "
        "(`Cancelled: ...` where the job was sent SIGTERM: scancel, a requeue; `OutOfMemory: ...` where SLURM killed "
        "it for its memory); null when completed.",
    ),
    ("traceback", pa.string(), "A failed run's traceback, its last 30 lines; null when completed."),
]
SCHEMA = pa.schema(
    [pa.field(name, type_, metadata={DESCRIPTION: text.encode()}) for name, type_, text in _COLUMNS],
    metadata={SCHEMA_KEY: SCHEMA_TAG},
)


# The summary: the spec, the outcome's scalars, when the run ended and why it failed.
SUMMARY_FIELDS = (
    "run_id",
    "status",
    "model",
    "dataset",
    "recipe",
    "recipe_epochs",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "milestones",
    "gamma",
    "batch_size",
    "seed",
    "epochs",
    "precision",
    "loader",
    "deterministic",
    "compile",
    "compile_fallback",
    "milestone_unit",
    "iterations",
    "warmup_iterations",
    "val_split",
    "data_fingerprint",
    "params",
    "epochs_done",
    "final_test_acc",
    "best_test_acc",
    "best_epoch",
    "final_test_top5",
    "best_test_top5",
    "best_val_acc",
    "best_val_epoch",
    "test_acc_at_best_val",
    "final_train_loss",
    "final_test_loss",
    "train_seconds",
    "images_per_s",
    "ended_at",
    "error",
    "test_seconds",
    "device_name",
    "time_limit_s",
    "estimated_s",
    "pack_size",
    "mps",
    "precision_used",
    "train_images",
    "test_images",
    "estimate_source",
    "packed_with",
    "fuse_size",
    "fused_with",
    "alloc_gpus",
    "alloc_cpus",
    "wall_seconds",
    "peak_host_mb",
    "peak_device_mb",
    "world_size",
)

# Each older version -> the columns it lacks, with the value each stands for in its runs. Its files hold exactly
# SCHEMA without these columns, and a summary without these keys (nor those OLDER_SUMMARY names); a reader fills
# them in.
# record/8: the processes that trained a run together (DDP) and whether BatchNorm's statistics were global;
# columns only. Every run before trained in one process.
_SINCE_8: dict[str, object] = {"world_size": 1, "sync_bn": None}
# record/7: the interpreter and the image each run trained with (`python:`, `container:`); columns only, like the
# rest of the run's environment.
_SINCE_7: dict[str, object] = {"python": None, "container": None, **_SINCE_8}
# record/6: each run's peak host and GPU memory, for plans that size memory (`mem_gb: auto`) and packs (`pack: auto`).
_SINCE_6: dict[str, object] = {"peak_host_mb": None, "peak_device_mb": None, **_SINCE_7}
# record/5: the allocation a run trained in (its GPUs and CPUs) and its wall-clock time, for plans and GPU-hours per
# allocation; the summary also holds the precision used, the data's size and the run's pack or fused group.
_SINCE_5: dict[str, object] = {"alloc_gpus": None, "alloc_cpus": None, "wall_seconds": None, **_SINCE_6}
# record/4: protocols (warm-up, iterations, a validation split), the data's identity and size, packing, fusion.
# Before it, every run counted epochs, warmed up for no step, held nothing out and trained alone.
_SINCE_4: dict[str, object] = {
    "milestone_unit": "epochs",
    "iterations": None,
    "warmup_iterations": 0,
    "warmup_lr": None,
    "warmup_mode": None,
    "data_fingerprint": None,
    "val_split": 0,
    "train_images": None,
    "val_images": 0,
    "test_images": None,
    "val_loss": None,
    "val_acc": None,
    "best_val_acc": None,
    "best_val_epoch": None,
    "test_acc_at_best_val": None,
    "pack_size": 1,
    "packed_with": [],
    "mps": None,
    "fuse_size": None,
    "fused_with": None,
    **_SINCE_5,
}
_SINCE_3 = {"test_seconds": None, "time_limit_s": None, "estimated_s": None, "estimate_source": None, **_SINCE_4}
OLDER = {
    1: {"compile": None, "compile_fallback": None, **_SINCE_3},  # before torch.compile: every run trained eagerly
    2: _SINCE_3,
    3: _SINCE_4,
    4: _SINCE_5,
    5: _SINCE_6,
    6: _SINCE_7,
    7: _SINCE_8,
}
# Columns an older record has, but not in its summary: a summary-only reader sees them as null.
# record/4's summary lacks record/5's keys whose columns it has: a summary-only reader does not know its run's
# precision, data size, estimate source or company (an older record's run trained alone where the columns say so).
_SUMMARY_SINCE_5 = ("precision_used", "train_images", "test_images", "estimate_source", "packed_with", "fuse_size",
                    "fused_with")  # fmt: skip
OLDER_SUMMARY: dict[int, dict] = {
    1: {"device_name": None, "precision_used": None},
    2: {"device_name": None, "precision_used": None},
    3: {"precision_used": None, "estimate_source": None},
    4: dict.fromkeys(_SUMMARY_SINCE_5),
}
_VERSIONS = {f"record/{v}".encode(): v for v in (*OLDER, RECORD_VERSION)}  # schema tag -> version
READABLE_TAGS = tuple(tag.decode() for tag in _VERSIONS)

# What became of a run, in the words status, collect and report.html all use, in the order they list them. A record
# alone tells three (``run_state``): completed, failed or cancelled; status also asks SLURM and the manifests:
# running, pending, lost (its job ended without the run's record) and not submitted (a grid's run never submitted).
STATES = ("completed", "running", "pending", "failed", "cancelled", "lost", "not submitted")
# How a failed record's error begins where the run did not fail but was cancelled: its process received SIGTERM
# (scancel, a requeue, the node shutting down) and wrote its record on the way out. A packed run that its job
# stopped (config.resources.STOPPED) resumes when the job is requeued: that one is not cancelled.
CANCELLED = "Cancelled"


def run_state(status: str, error: str | None) -> str:
    """Pure: what a record's ``status`` and ``error`` say became of its run: ``completed``, ``cancelled`` (a failed
    record whose error begins with CANCELLED) or ``failed``."""
    if status == "completed":
        return "completed"
    return "cancelled" if isinstance(error, str) and error.startswith(CANCELLED) else "failed"


def schema_markdown() -> str:
    """SCHEMA as a Markdown table of column, type and description: docs/records.md's record schema section
    (``scripts/record_schema.py`` writes it there)."""
    rows = [f"| `{f.name}` | `{f.type}` | {f.metadata[DESCRIPTION].decode()} |" for f in SCHEMA]
    return "\n".join(["| column | type | description |", "|---|---|---|", *rows])


def record_version(metadata: dict | None) -> int | None:
    """The record version that schema metadata (a Parquet footer's) is tagged with; None when it is not one
    this cifarbench reads."""
    return _VERSIONS.get((metadata or {}).get(SCHEMA_KEY, b""))  # b"": no tag, which no version has


def to_table(row: dict) -> pa.Table:
    """One run -> a one-row record; a missing field is null, an unknown field is an error."""
    unknown = set(row) - set(SCHEMA.names)
    if unknown:
        raise KeyError(f"fields not in the record schema: {sorted(unknown)}")
    return with_summary(pa.Table.from_pylist([{"record_version": RECORD_VERSION, **row}], schema=SCHEMA))


def with_summary(record: pa.Table) -> pa.Table:
    """A one-row table in SCHEMA with its summary beside the schema tag, as a record is written."""
    summary = record.select(SUMMARY_FIELDS).to_pylist()[0]
    summary["ended_at"] = summary["ended_at"] and summary["ended_at"].isoformat()
    lines = (summary["error"] or "").strip().splitlines()
    summary["error"] = lines[0] if lines else summary["error"]  # the traceback column holds the rest
    text = json.dumps(summary, separators=(",", ":"))
    return record.replace_schema_metadata({SCHEMA_KEY: SCHEMA_TAG, SUMMARY_KEY: text.encode()})


def write_table(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a Parquet table atomically (see ``cifarbench.store.atomic``)."""
    with atomic.replacing(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def data_size(summary: dict) -> tuple[int, int] | None:
    """The images of the data a record's run read (``train_images``, ``val_split``, ``test_images``): its training
    set, the validation split included, and its test set; None where the record does not say (before record/4)."""
    if summary.get("train_images") is None or summary.get("test_images") is None:
        return None
    return summary["train_images"] + (summary.get("val_split") or 0), summary["test_images"]


def spec_fields(spec: RunSpec) -> dict:
    """The record's columns that describe the spec, its schedule as planned (``train.fit.schedule_fields``: as
    run). Pure, so that a run's record can be written by whoever outlives it: the training job, or status when
    SLURM killed the job."""
    recipe = spec.schedule
    return {
        "run_id": spec.run_id,
        "model": spec.model,
        "dataset": spec.dataset,
        "recipe": spec.recipe.name,
        "recipe_epochs": dataclasses.replace(spec, epochs=None).schedule.epochs,
        "lr": recipe.lr,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "schedule": recipe.schedule,
        "milestones": list(recipe.milestones),
        "gamma": recipe.gamma,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "epochs": recipe.epochs,
        "precision": spec.precision,
        "loader": spec.loader,
        "deterministic": spec.deterministic,
        "world_size": spec.world_size,
        "sync_bn": spec.sync_bn if spec.world_size > 1 else None,
        "compile": spec.compile,
        "val_split": spec.held_out,
        "milestone_unit": spec.recipe.unit,
        "data_root": str(Path(spec.data_root).resolve()),
        "num_classes": spec.num_classes,
    }


def write_record(row: dict, results: str | os.PathLike) -> Path:
    """Write a run's record atomically, then its summary file."""
    record, layout = to_table(row), Layout(results)
    with atomic.replacing(layout.record(row["run_id"])) as tmp:
        pq.write_table(record, tmp)
        text = summary_file(record, tmp)
    # The record is the truth: without a summary file, or with an earlier record's, readers read the record.
    with contextlib.suppress(OSError):
        atomic.write_bytes(layout.record_summary(row["run_id"]), text)
    return layout.record(row["run_id"])


# What report.html shows of a run beyond its summary: its environment, a failed run's traceback.
DETAILS = (
    "device_count",
    "hostname",
    "torch_version",
    "torchvision_version",
    "lightning_version",
    "cuda_version",
    "cifarbench_version",
    "git_commit",
    "slurm_job_id",
    "slurm_array_task_id",
    "attempts",
    "data_root",
    "data_verified",
    "traceback",
)
# A summary file names the record it copies by the file's size and modification time, which a reader compares with
# the record's stat (no open). write_record draws the nanoseconds of that time at random, so that a record
# rewritten by a retry never matches the summary file of the one it replaced, also where the filesystem's clock is
# coarse (a retry killed between its two files leaves exactly that pair behind). The inode is left out: a folder
# copied with its times (cp -a, rsync -a) keeps its summary files.
SUMMARY_FILE_TAG = "record-summary/1"
# A summary file is one line of JSON, so that a folder's summary files are parsed together, by Arrow's JSON reader,
# in this schema (``summary``: the footer's summary, ``details``: DETAILS, ``test_acc``: the curve).
SUMMARY_FILE_SCHEMA = pa.schema(
    [
        pa.field("tag", pa.string()),
        pa.field("schema", pa.string()),
        pa.field("record", pa.list_(pa.int64())),  # the record file's size and mtime_ns
        pa.field("summary", pa.struct([SCHEMA.field(name).remove_metadata() for name in SUMMARY_FIELDS])),
        pa.field("details", pa.struct([SCHEMA.field(name).remove_metadata() for name in DETAILS])),
        pa.field("test_acc", pa.string()),  # the curve, in CURVE_BYTES, base64: parsed as one string, not 200 numbers
    ]
)
CURVE_BYTES = "<f8"  # float64, little-endian: exact; an epoch that is null in the record is NaN here


def curves(encoded: list[str | None]) -> pa.Array:
    """The test_acc column (SCHEMA's type) of the curves of summary files (``test_acc``, as ``summary_file``
    encodes them; None: null)."""
    raw = [b"" if text is None else base64.b64decode(text) for text in encoded]
    offsets = np.cumsum([0, *(len(r) // np.dtype(CURVE_BYTES).itemsize for r in raw)], dtype=np.int32)
    values = pa.array(np.frombuffer(b"".join(raw), CURVE_BYTES).astype(np.float64))
    nulls = pa.array(np.array([text is None for text in encoded], bool))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=nulls).cast(SCHEMA.field("test_acc").type)


def summary_file(record: pa.Table, path: str | os.PathLike) -> bytes:
    """The summary file of ``record`` (a one-row table as ``with_summary`` makes it), just written to ``path``,
    whose modification time this sets (see SUMMARY_FILE_TAG)."""
    now = time.time_ns()
    stamp = now - now % 1_000_000 + secrets.randbelow(1_000_000)  # the millisecond stays true
    os.utime(path, ns=(stamp, stamp))
    st = os.stat(path)  # as the filesystem keeps it, which may be coarser
    curve = record.column("test_acc").combine_chunks()
    values = curve.flatten().to_numpy(zero_copy_only=False).astype(CURVE_BYTES)
    doc = {
        "tag": SUMMARY_FILE_TAG,
        "schema": SCHEMA_TAG.decode(),
        "record": [st.st_size, st.st_mtime_ns],
        "summary": json.loads(record.schema.metadata[SUMMARY_KEY]),
        "details": record.select(DETAILS).to_pylist()[0],
        "test_acc": None if curve.null_count else base64.b64encode(values.tobytes()).decode("ascii"),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def is_record_schema(schema: pa.Schema) -> bool:
    """Whether ``schema`` is tagged as a record this cifarbench reads (the current version or one in OLDER)."""
    return record_version(schema.metadata) is not None


def read_record(path: str | os.PathLike) -> dict | None:
    """One record as a dict with every current field (an older record's missing ones as OLDER says), or None
    when the file is missing, unreadable or not a record this cifarbench reads."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    version = record_version(table.schema.metadata)
    if version is None or table.num_rows != 1:
        return None
    return {**table.to_pylist()[0], **OLDER.get(version, {})}


# Why a file is not read as a record, said of one file or of many ("skipped 2 files (<why>)").
UNREADABLE = "unreadable Parquet: corrupt or truncated"
MISLABELLED = "tagged as a record, but not with the record schema's columns"


def read_summary(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """A record's summary from its footer alone (an older record's missing fields as OLDER says), or why the
    file is not a record (None: not a run at all, such as runs.parquet; nothing to warn about)."""
    reader = pq.ParquetReader()  # not ParquetFile, whose Python bookkeeping costs a fifth of a footer read
    try:
        reader.open(str(path))
        meta = reader.metadata
    except (OSError, pa.ArrowException):
        return None, UNREADABLE
    finally:
        reader.close()
    tag, version = (meta.metadata or {}).get(SCHEMA_KEY), record_version(meta.metadata)
    if version is not None and meta.num_rows == 1:
        lacks = OLDER.get(version, {}) | OLDER_SUMMARY.get(version, {})
        try:
            row = json.loads(meta.metadata[SUMMARY_KEY])
            row["ended_at"] = row["ended_at"] and datetime.fromisoformat(row["ended_at"])
        except (KeyError, TypeError, ValueError):
            return None, MISLABELLED
        columns = len(SCHEMA) - len(OLDER.get(version, {}))
        ok = row.keys() == set(SUMMARY_FIELDS).difference(lacks) and meta.num_columns == columns
        return ({**lacks, **row}, None) if ok else (None, MISLABELLED)
    if tag is None:
        return None, "Parquet without a cifarbench tag"
    if version is not None:
        return None, "in the record schema, but not exactly one run"
    if not tag.startswith(b"record/"):  # cifarbench's other tables (runs.parquet, bench/): not runs, no warning
        return None, None
    return None, f"schema {tag.decode(errors='replace')}; this cifarbench reads {', '.join(READABLE_TAGS)}"
