"""A results folder read as one table: every record's summary, with runs.parquet as the cache.

A collector over 100,000 records must not open 100,000 Parquet files: each record has its summary file beside it
(see ``records.summary_file``), checked against the record's stat, which the walk of the folder makes anyway.
A record without a current one (an earlier version's, or rewritten since) has its footer read, in threads; files
unchanged since the last scan are taken from runs.parquet.
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
import pyarrow.json as pajson
import pyarrow.parquet as pq

from cifarbench.store.layout import RECORD, RECORD_SUMMARY, RUNS, Layout
from cifarbench.store.records import (
    DETAILS,
    MISLABELLED,
    SCHEMA,
    SCHEMA_KEY,
    SCHEMA_TAG,
    SUMMARY_FIELDS,
    SUMMARY_FILE_SCHEMA,
    SUMMARY_FILE_TAG,
    curves,
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
# Like the curve, a run's DETAILS (what report.html shows beyond the summary) are null until read, from the record's
# summary file or, without one, from its columns, then kept; DETAILS_READ says whether they were read.
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


def _summary_files(
    results: Path, files: list[tuple], schema: pa.Schema = SUMMARY_FILE_SCHEMA
) -> tuple[pa.Table, list[tuple], list[tuple]]:
    """What the summary files of ``files`` (records: path relative to ``results``, and stat) say, as one table in
    ``schema`` (SUMMARY_FILE_SCHEMA or a part of it), one row for each file of the second list, whose summary file is
    its current record's; the third list: the files left, to be read from their footers."""
    texts, read, rest = [], [], []
    for file in files:
        text = _summary_text(results, file[0])
        if text:
            texts.append(text)
            read.append(file)
        else:
            rest.append(file)
    parsed = _parse(texts, schema)
    tags = parsed.column("tag").to_pylist(), parsed.column("schema").to_pylist(), parsed.column("record").to_pylist()
    current = np.array(
        [
            tag == SUMMARY_FILE_TAG and schema == SCHEMA_TAG.decode() and record == [size, mtime_ns]
            for tag, schema, record, (_, size, mtime_ns, _) in zip(*tags, read)
        ],
        bool,
    )
    rest += [file for file, ok in zip(read, current) if not ok]  # rewritten since, or not of this version
    return _rows(parsed, current), [file for file, ok in zip(read, current) if ok], rest


def _summary_text(results: Path, rel: str) -> bytes | None:
    """The text of the summary file beside the record at ``rel``; None where there is none, or where it is not one
    line (each text is one row of the table they are parsed into)."""
    if not rel.endswith(f"/{RECORD}"):
        return None
    try:
        with open(os.path.join(results, rel[: -len(RECORD)], RECORD_SUMMARY), "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    return text if text.strip() and b"\n" not in text else None


def _parse(texts: list[bytes], schema: pa.Schema) -> pa.Table:
    """Summary files' texts parsed by Arrow's JSON reader, together, into ``schema`` (one text that is not a summary
    file: its row is null, and its record is read)."""
    whole = schema.equals(SUMMARY_FILE_SCHEMA)  # a part of it: the rest is passed over, not converted
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error" if whole else "ignore")
    try:
        table = pajson.read_json(pa.BufferReader(b"\n".join(texts)), parse_options=options)
        if table.num_rows == len(texts):
            return table
    except pa.ArrowException:
        pass
    if len(texts) > 1:
        return pa.concat_tables([_parse([text], schema) for text in texts])
    if not texts:
        return schema.empty_table()
    return pa.Table.from_arrays([pa.nulls(1, field.type) for field in schema], schema=schema)


def _summary_part(fields: tuple[str, ...]) -> pa.Schema:
    """The part of SUMMARY_FILE_SCHEMA that says whose summary file it is and these ``fields`` of the summary."""
    summary = SUMMARY_FILE_SCHEMA.field("summary").type
    return pa.schema(
        [
            *(SUMMARY_FILE_SCHEMA.field(name) for name in ("tag", "schema", "record")),
            pa.field("summary", pa.struct([summary.field(name) for name in fields])),
        ]
    )


def _as_runs(parsed: pa.Table, files: list[tuple]) -> pa.Table:
    """``_summary_files``' table as rows of RUNS_SCHEMA (``files``: their records)."""
    summary, details = (parsed.column(name).combine_chunks() for name in ("summary", "details"))
    keys = [np.array(column, np.int64) for column in list(zip(*files))[1:]] if files else [np.empty(0, np.int64)] * 3
    columns = {
        **{name: summary.field(name) for name in SUMMARY_FIELDS},
        **{name: details.field(name) for name in DETAILS},
        "test_acc": curves(parsed.column("test_acc").to_pylist()),
        DETAILS_READ: pa.array(np.ones(len(files), bool)),
        "path": pa.array([file[0] for file in files], pa.string()),
        **dict(zip(("size", "mtime_ns", "inode"), map(pa.array, keys))),
    }
    return pa.Table.from_arrays([columns[name] for name in RUNS_SCHEMA.names], schema=RUNS_SCHEMA)


def _read_chunk(results: Path, files: list[tuple]) -> tuple[pa.Table, list[tuple[str, str]]]:
    parsed, read, files = _summary_files(results, files)
    tables, skipped = [_as_runs(parsed, read)], []
    rows = []
    for rel, size, mtime_ns, inode in files:
        row, why = read_summary(os.path.join(results, rel))
        if row is not None:
            rows.append({**row, "path": rel, "size": size, "mtime_ns": mtime_ns, "inode": inode})
        elif why:
            skipped.append((rel, why))
    try:
        tables.append(pa.Table.from_pylist(rows, schema=RUNS_SCHEMA))
    except (pa.ArrowException, TypeError, ValueError):  # a summary value of the wrong type: find its file
        if len(files) == 1:
            return tables[0], [(files[0][0], MISLABELLED)]
        parts = [_read_chunk(results, [file]) for file in files]
        tables += [t for t, _ in parts]
        skipped = [s for _, ss in parts for s in ss]
    return pa.concat_tables(tables), skipped


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
    """Every record under ``results``, from its summary file (summary, DETAILS and curve) or, without a current one,
    its footer's summary (``error`` is its first line; ``test_acc`` and DETAILS are null unless ``cache`` had them).
    Files unchanged since ``cache`` (a previous scan's table) are taken from it; the others are read one by one,
    so that a corrupt, truncated or foreign file costs only itself."""
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


# status reads the summaries of the records written since the last scan as plain dicts, without building an Arrow
# table: the first Arrow array built from Python objects imports pandas (0.4 s), more than status may take. Past
# this many records without a summary file (an earlier version's), whose footers it reads, it writes runs.parquet
# afresh, so that the next status reads them from there.
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
    runs.parquet where the record is unchanged since the last scan, else from its summary file, else its footer
    (``run_id`` too, where ``fields`` lack it)."""
    results = Path(results)
    fields = tuple(dict.fromkeys(("run_id", *fields)))
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
    chunks = [files[i : i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    with ThreadPoolExecutor(_workers()) as pool:
        parts = list(pool.map(lambda chunk: _summary_files(results, chunk, _summary_part(fields)), chunks))
    footers = [file for _, _, rest in parts for file in rest]
    for parsed, _, _ in parts:
        summary = parsed.column("summary").combine_chunks()
        for row in _pylist(pa.Table.from_arrays([summary.field(k) for k in fields], names=list(fields)), fields):
            out[row["run_id"]] = row
    if len(footers) > REFRESH_AFTER:
        found = read_records(results, cache)
        with contextlib.suppress(OSError):  # a folder others only read: no cache, the answer is the same
            write_runs(found.table, runs_table, results)
        return {row["run_id"]: row for row in _pylist(found.table, fields)}
    with ThreadPoolExecutor(_workers()) as pool:
        for summary, _ in pool.map(lambda f: read_summary(os.path.join(results, f[0])), footers):
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
