"""The record documents itself: a description on every column, in the Parquet files and in docs/records.md, without
changing what a record is (its version, how older files and runs.parquet read)."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cifarbench.report.collect import collect
from cifarbench.store.layout import Layout
from cifarbench.store.records import (
    DESCRIPTION,
    RECORD_VERSION,
    SCHEMA,
    SCHEMA_TAG,
    read_record,
    read_summary,
    schema_markdown,
)
from cifarbench.store.scan import DETAILS, DETAILS_READ, RUNS_SCHEMA, load_runs, read_records

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "record_schema.py"
RECORDS_PAGE = REPO / "docs" / "records.md"


def undescribed(schema: pa.Schema) -> pa.Schema:
    """``schema`` as files written before the descriptions have it: the same columns, no field metadata."""
    return pa.schema([pa.field(f.name, f.type) for f in schema], metadata=schema.metadata)


def test_every_column_has_a_description_and_the_record_version_stays():
    missing = [f.name for f in SCHEMA if not (f.metadata or {}).get(DESCRIPTION, b"").strip()]
    assert missing == []
    assert RECORD_VERSION == 8 and SCHEMA_TAG == b"record/8"
    assert all(f.metadata == SCHEMA.field(f.name).metadata for f in RUNS_SCHEMA if f.name in SCHEMA.names)


def test_a_record_file_carries_the_descriptions(write_records):
    results = write_records([{"model": "resnet20"}])
    [path] = results.glob("runs/*/record.parquet")
    written = pq.read_schema(path)
    assert written.equals(SCHEMA) and written.field("final_test_acc").metadata[DESCRIPTION].startswith(b"Top-1 test")
    assert all(written.field(f.name).metadata == f.metadata for f in SCHEMA)


def test_a_record_written_without_descriptions_reads_the_same(write_records):
    results = write_records([{"model": "resnet20", "seed": s} for s in range(2)])
    path = sorted(results.glob("runs/*/record.parquet"))[0]
    # the summaries: the rewritten record is read from its footer (its summary file is the earlier file's)
    kept = ["size", "mtime_ns", "inode", "test_acc", *DETAILS, DETAILS_READ]  # all but the path and the summary
    scanned = lambda: sorted(read_records(results).table.drop_columns(kept).to_pylist(), key=lambda r: r["path"])
    described = read_record(path), read_summary(path), scanned()
    table = pq.read_table(path)
    pq.write_table(table.cast(undescribed(table.schema)), path)
    assert pq.read_schema(path).field("run_id").metadata is None
    assert (read_record(path), read_summary(path), scanned()) == described


def test_a_runs_parquet_without_descriptions_is_still_the_cache(write_records):
    results = write_records([{"model": "resnet20", "final_test_acc": 0.91}])
    collect(results, plots=False)
    runs_table = Layout(results).runs_table
    runs = pq.read_table(runs_table)
    assert runs.schema.field("final_test_acc").metadata == SCHEMA.field("final_test_acc").metadata
    # written before the descriptions, and with a value that only the cache has: a cache in use shows it
    acc = runs.schema.get_field_index("final_test_acc")
    older = runs.set_column(acc, "final_test_acc", pa.array([0.5])).cast(undescribed(runs.schema))
    pq.write_table(older, runs_table)
    cache = load_runs(runs_table, results)
    assert cache is not None and cache.schema.field("final_test_acc").metadata is not None
    assert "| resnet20 | 0.5000  |" in collect(results, plots=False).markdown
    write_records([{"model": "resnet32"}], results=results)  # a change: runs.parquet is written afresh
    collect(results, plots=False)
    assert pq.read_schema(runs_table).field("final_test_acc").metadata == SCHEMA.field("final_test_acc").metadata


def _record_schema(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_the_records_page_holds_the_schema_table():
    out = _record_schema("--check")
    assert out.returncode == 0, out.stderr
    assert schema_markdown() in RECORDS_PAGE.read_text(encoding="utf-8")


def test_a_stale_table_fails_the_check_and_is_rewritten(tmp_path):
    page = tmp_path / "records.md"
    current = RECORDS_PAGE.read_text(encoding="utf-8")
    page.write_text(current.replace("| `momentum` | `double` | SGD momentum. |\n", ""), encoding="utf-8")
    out = _record_schema("--check", "--page", str(page))
    assert out.returncode == 1 and "regenerate it with: python scripts/record_schema.py" in out.stderr
    assert _record_schema("--page", str(page)).returncode == 0
    assert page.read_text(encoding="utf-8") == current
