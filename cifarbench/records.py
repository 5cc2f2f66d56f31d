"""The per-run Parquet record: explicit versioned schema, atomic write, tolerant read of a results folder.

Layout under a results folder::

    runs/<run_id>/record.parquet   one row, the run's outcome (completed or failed)
    runs/<run_id>/last.ckpt        the last epoch's checkpoint (resume)
    runs.parquet                   what collect last read: one row per run (see ``cifarbench.scan``)

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

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RECORD_VERSION = 2
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
        ("images_per_s", pa.float64()),
        ("attempts", pa.int32()),
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
SUMMARY_FIELDS = ("run_id", "status", "model", "dataset", "recipe", "recipe_epochs", "lr", "momentum",
                  "weight_decay", "schedule", "milestones", "gamma", "batch_size", "seed", "epochs", "precision",
                  "loader", "deterministic", "compile", "compile_fallback", "params", "epochs_done",
                  "final_test_acc", "best_test_acc", "best_epoch", "final_test_top5", "best_test_top5",
                  "final_train_loss", "final_test_loss", "train_seconds", "images_per_s", "ended_at", "error")

# Each older version -> the columns it lacks, with the value each stands for in its runs. Its files hold exactly
# SCHEMA without these columns, and a summary without these keys; a reader fills them in.
OLDER = {
    1: {"compile": None, "compile_fallback": None},  # before torch.compile: every run trained eagerly
}
_VERSIONS = {f"record/{v}".encode(): v for v in (*OLDER, RECORD_VERSION)}  # schema tag -> version
READABLE_TAGS = tuple(tag.decode() for tag in _VERSIONS)


def record_version(metadata: dict | None) -> int | None:
    """The record version that schema metadata (a Parquet footer's) is tagged with; None when it is not one
    this cifarbench reads."""
    return _VERSIONS.get((metadata or {}).get(SCHEMA_KEY))


def run_dir(results: str | os.PathLike, run_id: str) -> Path:
    return Path(results) / "runs" / run_id


def record_path(results: str | os.PathLike, run_id: str) -> Path:
    return run_dir(results, run_id) / "record.parquet"


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


def atomic_write_table(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write to a unique temporary file beside ``path``, fsync, then rename over it.

    Readers see the old file or the new one, never a partial one; two writers of the same path each write
    their own temporary file and the last rename wins whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def run_lock(results: str | os.PathLike, run_id: str, *, on_wait=None):
    """Hold an exclusive lock on a run's folder (``flock``; released by the kernel even on SIGKILL).

    Two jobs of the same run (a grid submitted twice, a retry racing a requeue) then train one after the
    other: the second finds the first's record, or resumes from its checkpoint if the first died."""
    folder = Path(results) / "locks"  # not in the run's folder, which keeps only the record and the checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{run_id}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_record(row: dict, results: str | os.PathLike) -> Path:
    return atomic_write_table(to_table(row), record_path(results, row["run_id"]))


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
