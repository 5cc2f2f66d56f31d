"""A results folder read as one table: every record's footer summary, with runs.parquet as the cache.

A collector over 10,000 records must not open 10,000 files' columns: each record's footer carries a summary
(see ``records``), read here in threads, and files unchanged since the last scan are taken from runs.parquet.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifarbench.store.layout import RECORD, RUNS, Layout
from cifarbench.store.records import (
    MISLABELLED,
    SCHEMA,
    SCHEMA_KEY,
    SUMMARY_FIELDS,
    read_summary,
    write_table,
)
from cifarbench.system import usable_cores

# runs.parquet, collect's merged output, holds one row per run in RUNS_SCHEMA: the summary, the curve (test_acc;
# null until plots have needed it, then kept) and the record's path, size, mtime and inode. That key lets a later
# scan of the same folder read only the records that changed (an atomic rewrite always makes a new inode). The
# file is tagged so that a scan never reads it as a record.
RUNS_TAG = b"runs/1"
_ROOT_KEY = b"cifarbench.results"
_FILE_FIELDS = [pa.field("path", pa.string()), *(pa.field(k, pa.int64()) for k in ("size", "mtime_ns", "inode"))]
# What report.html shows beyond the summary: a run's environment, a failed run's traceback. Like the curve, null
# until the report has read them from the record's columns, then kept; DETAILS_READ says whether they were read.
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
DETAILS_READ = "details_read"
RUNS_SCHEMA = pa.schema(
    [
        *(SCHEMA.field(name) for name in (*SUMMARY_FIELDS, "test_acc", *DETAILS)),
        pa.field(DETAILS_READ, pa.bool_()),
        *_FILE_FIELDS,
    ]
)
_CHUNK = 256


def _workers() -> int:
    # Arrow releases the GIL while it parses a footer: one thread more than cores keeps the cores busy.
    return usable_cores() + 1


@dataclass(frozen=True)
class Scan:
    table: pa.Table  # RUNS_SCHEMA: each readable record's summary, its curve (test_acc) if read, its file's key
    skipped: dict[str, list[str]]  # why (records.UNREADABLE, ...) -> paths relative to results
    no_record: list[str]  # run folders without a record: still running, or lost
    changed: bool  # whether the records differ from the cache's (False: runs.parquet is up to date)


def _read_chunk(results: Path, files: list[tuple]) -> tuple[pa.Table, list[tuple[str, str]]]:
    rows, skipped = [], []
    for rel, size, mtime_ns, inode in files:
        row, why = read_summary(os.path.join(results, rel))
        if row is not None:
            rows.append({**row, "path": rel, "size": size, "mtime_ns": mtime_ns, "inode": inode})
        elif why:
            skipped.append((rel, why))
    try:
        return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA), skipped
    except (pa.ArrowException, TypeError, ValueError):  # a summary value of the wrong type: find its file
        if len(files) == 1:
            return RUNS_SCHEMA.empty_table(), [(files[0][0], MISLABELLED)]
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
        in_runs = os.path.basename(folder) == RUNS
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if not in_runs:
                    folders.append((f"{rel}{entry.name}/", entry.path))
                    continue
                try:
                    st = os.stat(os.path.join(entry.path, RECORD))
                except OSError:
                    no_record.append(entry.name)
                    continue
                files.append((f"{rel}{entry.name}/{RECORD}", st.st_size, st.st_mtime_ns, st.st_ino))
            elif entry.name.endswith(".parquet") and not entry.name.startswith("."):  # ".record.parquet.*.tmp"
                try:
                    st = entry.stat()
                except OSError:
                    continue
                files.append((rel + entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return sorted(files), sorted(no_record)


def _rows(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """``table.filter(mask)`` from slices: Table.filter's first call initialises pyarrow.compute, which costs
    more than the whole scan of a cached folder (0.4 s), and the masks here are long runs of True."""
    if mask.all():
        return table
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    parts = [table.slice(start, stop - start) for start, stop in zip(edges[::2], edges[1::2])]
    return pa.concat_tables(parts) if parts else table.schema.empty_table()


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
        tables.append(_rows(cache, keep))
        gone = not keep.all()
        files = sorted(current.difference(k for k, kept in zip(cached, keep) if kept))
    chunks = [files[i : i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    with ThreadPoolExecutor(_workers()) as pool:
        parts = list(pool.map(lambda chunk: _read_chunk(results, chunk), chunks))
    skipped: dict[str, list[str]] = {}
    for rel, why in sorted(s for _, ss in parts for s in ss):
        skipped.setdefault(why, []).append(rel)
    table = pa.concat_tables([*tables, *(t for t, _ in parts)]) if tables or parts else RUNS_SCHEMA.empty_table()
    changed = gone or any(t.num_rows for t, _ in parts)
    return Scan(table=table.combine_chunks(), skipped=skipped, no_record=no_record, changed=changed)


# status reads the footers of the records written since the last scan as plain dicts, without building an Arrow
# table: the first Arrow array built from Python objects imports pandas (0.4 s), more than status may take.
# Past this many such footers it writes runs.parquet afresh, so that the next status reads them from there.
REFRESH_AFTER = 200


def _pylist(table: pa.Table, fields: tuple[str, ...]) -> list[dict]:
    """``table.select(fields).to_pylist()``, but timestamps go through their integers: pyarrow imports pandas
    to turn a timestamp with a time zone into a datetime."""
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    columns = []
    for name in fields:
        column = table.column(name).combine_chunks()
        if pa.types.is_timestamp(column.type):
            assert column.type.unit == "us", column.type
            micros = column.view(pa.int64()).to_pylist()
            columns.append([None if m is None else epoch + timedelta(microseconds=m) for m in micros])
        else:
            columns.append(column.to_pylist())
    return [dict(zip(fields, values)) for values in zip(*columns)]


def summaries(results: str | os.PathLike, fields: tuple[str, ...]) -> dict[str, dict]:
    """run id -> ``fields`` of its record's summary, for every readable record under ``results``: from
    runs.parquet where the record is unchanged since the last scan, else from its footer."""
    results = Path(results)
    runs_table = Layout(results).runs_table
    cache = load_runs(runs_table, results)
    files, _ = _walk(results)
    current, out = set(files), {}
    if cache is not None:
        keys = zip(*(cache.column(f.name).to_pylist() for f in _FILE_FIELDS))
        rows = _pylist(cache, fields)
        seen = set()
        for key, row in zip(keys, rows):
            if key in current:
                seen.add(key)
                out[row["run_id"]] = row
        files = [f for f in files if f not in seen]
    if len(files) > REFRESH_AFTER:
        found = read_records(results, cache)
        with contextlib.suppress(OSError):  # a folder others only read: no cache, the answer is the same
            write_runs(found.table, runs_table, results)
        return {row["run_id"]: row for row in _pylist(found.table, fields)}
    with ThreadPoolExecutor(_workers()) as pool:
        for summary, _ in pool.map(lambda f: read_summary(os.path.join(results, f[0])), files):
            if summary is not None:
                out[summary["run_id"]] = {key: summary[key] for key in fields}
    return out


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
    # Columns and types decide whether the cache is current; the columns' descriptions do not (a runs.parquet from
    # before them stays valid), and the table gets RUNS_SCHEMA's, which a rewritten runs.parquet then carries.
    # Not table.cast: the types are equal, so only the schema's metadata changes, and cast imports pyarrow.compute
    # (a tenth of a second of a status call).
    return pa.Table.from_arrays(table.columns, schema=RUNS_SCHEMA) if table.schema.equals(RUNS_SCHEMA) else None


def write_runs(table: pa.Table, path: str | os.PathLike, results: str | os.PathLike) -> Path:
    meta = {SCHEMA_KEY: RUNS_TAG, _ROOT_KEY: str(Path(results).resolve()).encode()}
    return write_table(table.replace_schema_metadata(meta), path)


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
    with ThreadPoolExecutor(_workers()) as pool:
        read = pa.concat_arrays(list(pool.map(_read_curve, paths)))
    index = np.arange(len(table))
    index[rows] = len(table) + np.arange(len(rows))  # the curves just read, after the table's own
    filled = pa.concat_arrays([curves, read]).take(index)
    return table.set_column(table.schema.get_field_index("test_acc"), "test_acc", filled)


def _read_details(path: str) -> dict:
    try:
        with pq.ParquetFile(path, pre_buffer=False) as pf:
            # with the curve: one read of the file for both
            names = [c for c in (*DETAILS, "test_acc") if c in pf.schema_arrow.names]  # an older record lacks some
            rows = pf.read(columns=names, use_threads=False).to_pylist()
        if len(rows) == 1:
            return {**rows[0], DETAILS_READ: True}
    except (OSError, pa.ArrowException):  # gone or damaged since the scan: read again by the next report
        pass
    return {DETAILS_READ: False}


def with_details(results: str | os.PathLike, table: pa.Table, rows) -> pa.Table:
    """A scan's ``table`` where each of ``rows`` (positions) has its DETAILS and its curve (test_acc), read from its
    record's columns where the table has not read the details yet; ``table`` itself when it has them all (then
    from runs.parquet)."""
    rows = np.asarray(rows, dtype=np.int64)
    read_already = table.column(DETAILS_READ).fill_null(False).to_numpy(zero_copy_only=False)
    rows = rows[~read_already[rows]]
    if not len(rows):
        return table
    paths = [os.path.join(results, rel) for rel in table.column("path").take(rows).to_pylist()]
    with ThreadPoolExecutor(_workers()) as pool:
        read = list(pool.map(_read_details, paths))
    fields = [RUNS_SCHEMA.field(name) for name in ("test_acc", *DETAILS, DETAILS_READ)]
    new = pa.Table.from_pylist(read, schema=pa.schema(fields))
    index = np.arange(len(table))
    index[rows] = len(table) + np.arange(len(rows))  # the values just read, after the table's own
    for field in fields:
        merged = pa.concat_arrays([table.column(field.name).combine_chunks(), new.column(field.name).combine_chunks()])
        table = table.set_column(table.schema.get_field_index(field.name), field, merged.take(index))
    return table
