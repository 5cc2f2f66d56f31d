"""The per-run Parquet record: explicit versioned schema, atomic write, tolerant read of a results folder.

Layout under a results folder::

    runs/<run_id>/record.parquet   one row, the run's outcome (completed or failed)
    runs/<run_id>/last.ckpt        the last epoch's checkpoint (resume)
    runs.parquet                   what collect last read: one row per run (see RUNS_SCHEMA)

A record (``record/1``) is a one-row Parquet file in SCHEMA. Its schema metadata, stored in the Parquet footer,
holds two keys: ``cifarbench.schema`` = ``record/1`` says what the file is, and ``cifarbench.summary`` is a
compact JSON object of SUMMARY_FIELDS, the scalars that collect's tables are made of, with the columns' values
(null where a column is; ``ended_at`` as an ISO 8601 string; ``error`` its first line only; NaN as Python's json
writes it; no curves). The summary is the footer index: reading a footer costs half of reading even a few
columns of a one-row file, so a collector that reads footers only gets through 10,000 records in seconds. The
columns stay the source of truth: curves, and everything else, are read from them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RECORD_VERSION = 1
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
                  "loader", "deterministic", "params", "epochs_done", "final_test_acc", "best_test_acc",
                  "best_epoch", "final_test_top5", "best_test_top5", "final_train_loss", "final_test_loss",
                  "train_seconds", "images_per_s", "ended_at", "error")


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
    return (schema.metadata or {}).get(SCHEMA_KEY) == SCHEMA_TAG


def read_record(path: str | os.PathLike) -> dict | None:
    """One record as a dict, or None when the file is missing, unreadable or not a current record."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None
    if not is_record_schema(table.schema) or table.num_rows != 1:
        return None
    return table.to_pylist()[0]


# runs.parquet, collect's merged output, holds one row per run in RUNS_SCHEMA: the summary, the curve (test_acc;
# null until plots have needed it, then kept) and the record's path, size, mtime and inode. That key lets a later
# scan of the same folder read only the records that changed (an atomic rewrite always makes a new inode). The
# file is tagged so that a scan never reads it as a record.
RUNS_TAG = b"runs/1"
_ROOT_KEY = b"cifarbench.results"
_FILE_FIELDS = [pa.field("path", pa.string()), *(pa.field(k, pa.int64()) for k in ("size", "mtime_ns", "inode"))]
RUNS_SCHEMA = pa.schema([*(SCHEMA.field(name) for name in (*SUMMARY_FIELDS, "test_acc")), *_FILE_FIELDS])
# Arrow releases the GIL while it parses a footer: one thread more than cores keeps the cores busy.
_WORKERS = (os.cpu_count() or 1) + 1
_CHUNK = 256
UNREADABLE = "unreadable Parquet files (corrupt or truncated)"
_MISLABELLED = "files tagged as records whose columns are not the record schema's"


@dataclass(frozen=True)
class Scan:
    table: pa.Table  # RUNS_SCHEMA: each readable record's summary, its curve (test_acc) if read, its file's key
    skipped: dict[str, list[str]]  # why (plural: "unreadable Parquet files ...") -> paths relative to results
    no_record: list[str]  # run folders without a record: still running, or lost
    changed: bool  # whether the records differ from the cache's (False: runs.parquet is up to date)


def _read_summary(path: str) -> tuple[dict | None, str | None]:
    """A record's summary from its footer alone, or why the file is not a record (None: not a run, say nothing)."""
    reader = pq.ParquetReader()  # not ParquetFile, whose Python bookkeeping costs a fifth of a footer read
    try:
        reader.open(path)
        meta = reader.metadata
    except (OSError, pa.ArrowException):
        return None, UNREADABLE
    finally:
        reader.close()
    tag = (meta.metadata or {}).get(SCHEMA_KEY)
    if tag == SCHEMA_TAG and meta.num_rows == 1:
        try:
            row = json.loads(meta.metadata[SUMMARY_KEY])
            row["ended_at"] = row["ended_at"] and datetime.fromisoformat(row["ended_at"])
        except (KeyError, TypeError, ValueError):
            return None, _MISLABELLED
        ok = row.keys() == set(SUMMARY_FIELDS) and meta.num_columns == len(SCHEMA)
        return (row, None) if ok else (None, _MISLABELLED)
    if tag is None:
        return None, "Parquet files that are not cifarbench records"
    if tag == SCHEMA_TAG:
        return None, "files in the record schema that do not hold exactly one run"
    if not tag.startswith(b"record/"):  # cifarbench's other tables (runs.parquet, bench/): not runs, no warning
        return None, None
    return None, f"records of schema {tag.decode(errors='replace')} (this cifarbench reads {SCHEMA_TAG.decode()})"


def _read_chunk(results: Path, files: list[tuple]) -> tuple[pa.Table, list[tuple[str, str]]]:
    rows, skipped = [], []
    for rel, size, mtime_ns, inode in files:
        row, why = _read_summary(os.path.join(results, rel))
        if row is not None:
            rows.append({**row, "path": rel, "size": size, "mtime_ns": mtime_ns, "inode": inode})
        elif why:
            skipped.append((rel, why))
    try:
        return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA), skipped
    except (pa.ArrowException, TypeError, ValueError):  # a summary value of the wrong type: find its file
        if len(files) == 1:
            return RUNS_SCHEMA.empty_table(), [(files[0][0], _MISLABELLED)]
        parts = [_read_chunk(results, [file]) for file in files]
        return pa.concat_tables([t for t, _ in parts]), [s for _, ss in parts for s in ss]


def _walk(results: Path) -> tuple[list[tuple[str, int, int, int]], list[str]]:
    """(path relative to results, size, mtime_ns, inode) of every Parquet file, and the run folders without a
    record. A results folder can hold 100,000 run folders: each costs one stat of its record.parquet, not a
    listing."""
    files, no_record = [], []
    folders = [("", str(results))]
    while folders:
        rel, folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # removed, or unreadable, since it was listed
            continue
        in_runs = os.path.basename(folder) == "runs"
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if not in_runs:
                    folders.append((f"{rel}{entry.name}/", entry.path))
                    continue
                try:
                    st = os.stat(os.path.join(entry.path, "record.parquet"))
                except OSError:
                    no_record.append(entry.name)
                    continue
                files.append((f"{rel}{entry.name}/record.parquet", st.st_size, st.st_mtime_ns, st.st_ino))
            elif entry.name.endswith(".parquet") and not entry.name.startswith("."):  # ".record.parquet.*.tmp"
                try:
                    st = entry.stat()
                except OSError:
                    continue
                files.append((rel + entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return sorted(files), sorted(no_record)


def read_records(results: str | os.PathLike, cache: pa.Table | None = None) -> Scan:
    """Every record under ``results``, from its footer's summary (``error`` is its first line; ``test_acc`` is
    null unless ``cache`` had it). Files unchanged since ``cache`` (a previous scan's table) are taken from it;
    the others are read one by one, so that a corrupt, truncated or foreign file costs only itself."""
    results = Path(results)
    files, no_record = _walk(results)
    tables, gone = [], cache is None
    if cache is not None:
        current = set(files)
        cached = list(zip(*(cache.column(f.name).to_pylist() for f in _FILE_FIELDS)))
        keep = np.fromiter((key in current for key in cached), bool, len(cached))
        tables.append(cache.filter(keep))
        gone = not keep.all()
        files = sorted(current.difference(k for k, kept in zip(cached, keep) if kept))
    chunks = [files[i:i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    with ThreadPoolExecutor(_WORKERS) as pool:
        parts = list(pool.map(lambda chunk: _read_chunk(results, chunk), chunks))
    skipped: dict[str, list[str]] = {}
    for rel, why in sorted(s for _, ss in parts for s in ss):
        skipped.setdefault(why, []).append(rel)
    table = pa.concat_tables([*tables, *(t for t, _ in parts)]) if tables or parts else RUNS_SCHEMA.empty_table()
    changed = gone or any(t.num_rows for t, _ in parts)
    return Scan(table=table.combine_chunks(), skipped=skipped, no_record=no_record, changed=changed)


def load_runs(path: str | os.PathLike, results: str | os.PathLike) -> pa.Table | None:
    """The table of a runs.parquet written for the same results folder (a cache for ``read_records``), else None."""
    try:
        with pq.ParquetFile(path) as pf:
            meta = pf.metadata.metadata or {}
            if meta.get(SCHEMA_KEY) != RUNS_TAG or meta.get(_ROOT_KEY) != str(Path(results).resolve()).encode():
                return None
            table = pf.read()
    except (OSError, pa.ArrowException):
        return None
    return table.replace_schema_metadata(None) if table.schema.equals(RUNS_SCHEMA) else None


def write_runs(table: pa.Table, path: str | os.PathLike, results: str | os.PathLike) -> Path:
    meta = {SCHEMA_KEY: RUNS_TAG, _ROOT_KEY: str(Path(results).resolve()).encode()}
    return atomic_write_table(table.replace_schema_metadata(meta), path)


def _read_curve(path: str) -> pa.Array:
    try:
        with pq.ParquetFile(path, pre_buffer=False) as pf:
            curve = pf.read(columns=["test_acc"], use_threads=False).column(0).combine_chunks()
        if len(curve) == 1:
            return curve.cast(SCHEMA.field("test_acc").type)
    except (OSError, pa.ArrowException):  # gone since the scan: null, and the next scan drops the run
        pass
    return pa.nulls(1, SCHEMA.field("test_acc").type)


def with_curves(results: str | os.PathLike, table: pa.Table, rows) -> pa.Table:
    """A scan's ``table`` where each of ``rows`` (positions) has its curve (test_acc), read from its record's
    columns where the table has none yet; ``table`` itself when it has them all. Only plots need curves, and
    reading a record's columns costs twice its summary."""
    curves = table.column("test_acc").combine_chunks()
    rows = np.asarray(rows, dtype=np.int64)
    rows = rows[curves.is_null().to_numpy(zero_copy_only=False)[rows]]
    if not len(rows):
        return table
    paths = [os.path.join(results, rel) for rel in table.column("path").take(rows).to_pylist()]
    with ThreadPoolExecutor(_WORKERS) as pool:
        read = pa.concat_arrays(list(pool.map(_read_curve, paths)))
    index = np.arange(len(table))
    index[rows] = len(table) + np.arange(len(rows))  # the curves just read, after the table's own
    filled = pa.concat_arrays([curves, read]).take(index)
    return table.set_column(table.schema.get_field_index("test_acc"), "test_acc", filled)
