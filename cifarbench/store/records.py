"""The per-run Parquet record (``runs/<run_id>/record.parquet``): explicit versioned schema, atomic write,
tolerant reads of the whole file or of its footer summary alone.

A record (``record/2``) is a one-row Parquet file in SCHEMA. Its schema metadata, stored in the Parquet footer,
holds two keys: ``cifarbench.schema`` = ``record/2`` says what the file is, and ``cifarbench.summary`` is a
compact JSON object of SUMMARY_FIELDS, the scalars that collect's tables are made of, with the columns' values
(null where a column is; ``ended_at`` as an ISO 8601 string; ``error`` its first line only; NaN as Python's json
writes it; no curves). The summary is the footer index: reading a footer costs half of reading even a few
columns of a one-row file, so a collector that reads footers only gets through 10,000 records in seconds. The
columns stay the source of truth: curves, and everything else, are read from them.

Records of an older version stay readable: OLDER says which columns (and summary keys) each one lacks and what
they stand for, and every reader (``read_record``, ``scan``) fills them in from it. A tag this cifarbench does
not know (record/0, or a newer one) is not a record to it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cifarbench.store import atomic
from cifarbench.store.layout import Layout

RECORD_VERSION = 3
SCHEMA_KEY = b"cifarbench.schema"
SCHEMA_TAG = f"record/{RECORD_VERSION}".encode()
SUMMARY_KEY = b"cifarbench.summary"

_floats = pa.list_(pa.float64())
_ts = pa.timestamp("us", tz="UTC")

SCHEMA = pa.schema(
    [
        ("record_version", pa.int32()),
        ("run_id", pa.string()),
        ("status", pa.string()),  # completed | failed
        # the spec
        ("model", pa.string()),
        ("dataset", pa.string()),
        ("recipe", pa.string()),
        ("recipe_epochs", pa.int32()),
        ("lr", pa.float64()),
        ("momentum", pa.float64()),
        ("weight_decay", pa.float64()),
        ("schedule", pa.string()),
        ("milestones", pa.list_(pa.int32())),  # as run (scaled when epochs overrides the recipe)
        ("gamma", pa.float64()),
        ("batch_size", pa.int32()),
        ("seed", pa.int64()),
        ("epochs", pa.int32()),  # as run
        ("precision", pa.string()),  # as requested
        ("precision_used", pa.string()),  # as resolved on the device
        ("loader", pa.string()),
        ("deterministic", pa.bool_()),
        ("compile", pa.string()),  # a torch.compile mode as requested; null: eager
        ("compile_fallback", pa.string()),  # null, or why a run that asked for compile trained eagerly
        ("data_root", pa.string()),
        ("data_verified", pa.bool_()),
        ("num_classes", pa.int32()),
        ("params", pa.int64()),
        # outcome
        ("epochs_done", pa.int32()),
        ("final_test_acc", pa.float64()),
        ("best_test_acc", pa.float64()),
        ("best_epoch", pa.int32()),
        ("final_test_top5", pa.float64()),
        ("best_test_top5", pa.float64()),
        ("final_train_loss", pa.float64()),
        ("final_test_loss", pa.float64()),
        ("train_loss", _floats),
        ("test_loss", _floats),
        ("test_acc", _floats),
        ("test_top5", _floats),
        ("lr_curve", _floats),
        ("epoch_seconds", _floats),
        ("train_seconds", pa.float64()),
        ("test_seconds", pa.float64()),  # spent on the test set, all epochs (record/3)
        ("images_per_s", pa.float64()),
        ("attempts", pa.int32()),
        ("time_limit_s", pa.int64()),  # the SLURM time limit asked for, seconds; null: local or unknown (record/3)
        ("estimated_s", pa.float64()),  # the estimated duration that `time: auto` set the limit from (record/3)
        ("estimate_source", pa.string()),  # where that estimate came from (record/3)
        ("started_at", _ts),
        ("ended_at", _ts),
        # environment
        ("hostname", pa.string()),
        ("device_name", pa.string()),
        ("device_count", pa.int32()),
        ("torch_version", pa.string()),
        ("torchvision_version", pa.string()),
        ("lightning_version", pa.string()),
        ("cifarbench_version", pa.string()),
        ("cuda_version", pa.string()),
        ("git_commit", pa.string()),
        ("slurm_job_id", pa.string()),
        ("slurm_array_task_id", pa.string()),
        ("error", pa.string()),
        ("traceback", pa.string()),
    ],
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
    "params",
    "epochs_done",
    "final_test_acc",
    "best_test_acc",
    "best_epoch",
    "final_test_top5",
    "best_test_top5",
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
)

# Each older version -> the columns it lacks, with the value each stands for in its runs. Its files hold exactly
# SCHEMA without these columns, and a summary without these keys (nor those OLDER_SUMMARY names); a reader fills
# them in.
_SINCE_3 = {"test_seconds": None, "time_limit_s": None, "estimated_s": None, "estimate_source": None}
OLDER = {
    1: {"compile": None, "compile_fallback": None, **_SINCE_3},  # before torch.compile: every run trained eagerly
    2: _SINCE_3,
}
# Columns an older record has, but not in its summary: a summary-only reader sees them as null.
OLDER_SUMMARY: dict[int, dict] = {1: {"device_name": None}, 2: {"device_name": None}}
_VERSIONS = {f"record/{v}".encode(): v for v in (*OLDER, RECORD_VERSION)}  # schema tag -> version
READABLE_TAGS = tuple(tag.decode() for tag in _VERSIONS)


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


def write_record(row: dict, results: str | os.PathLike) -> Path:
    return write_table(to_table(row), Layout(results).record(row["run_id"]))


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
