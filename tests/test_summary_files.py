"""A record's summary file (runs/<run_id>/record.json): what collect, status and report.html read of a run without
opening its Parquet file, used only while it names the record as it is; otherwise the record is read."""

import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq

from cifarbench.report.collect import collect
from cifarbench.store.layout import Layout
from cifarbench.store.records import CANCELLED, with_summary
from cifarbench.store.scan import DETAILS_READ, read_records, summaries, with_details

RUNS = [
    {"model": "resnet20", "seed": 0, "final_test_acc": 0.91, "test_acc": [0.5, float("nan"), 0.91]},
    {"model": "resnet20", "seed": 1, "hostname": "node07", "slurm_job_id": "77", "slurm_array_task_id": "3"},
    {
        "model": "resnet32",
        "status": "failed",
        "final_test_acc": None,
        "best_test_acc": None,
        "test_acc": [0.1],
        "epochs_done": 1,
        "error": "RuntimeError: boom\nsecond line",
        "traceback": "Traceback (most recent call last):\n  File fit.py\nRuntimeError: boom",
    },
]


def rows(results) -> list[dict]:
    """Every run as the scan reads it, with what report.html needs (DETAILS and the curve), by path; NaN as None."""
    table = read_records(results).table
    table = with_details(results, table, range(table.num_rows)).drop_columns(["inode"])
    nan = lambda v: None if isinstance(v, float) and v != v else [nan(x) for x in v] if isinstance(v, list) else v
    return sorted(({k: nan(v) for k, v in row.items()} for row in table.to_pylist()), key=lambda r: r["path"])


def blank(path) -> None:
    """Zeros in place of a file's bytes, its size and modification time kept: a reader that opens it fails."""
    st = path.stat()
    path.write_bytes(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_summary_file_holds_what_the_record_says(write_records):
    results = write_records(RUNS)
    assert len(list(results.glob("runs/*/record.json"))) == 3
    fast = rows(results)
    assert all(row[DETAILS_READ] for row in fast)  # all from the summary files
    for summary_file in results.glob("runs/*/record.json"):  # as an earlier cifarbench left the folder
        summary_file.unlink()
    assert read_records(results).table.column(DETAILS_READ).null_count == 3  # the footers: no details
    assert rows(results) == fast  # the records' columns say the same
    assert {r["hostname"] for r in fast} == {"node01", "node07"} and fast[-1]["traceback"].endswith("boom")


def test_a_current_summary_file_spares_the_record_also_in_a_copy_of_the_folder(write_records, tmp_path):
    results = write_records(RUNS)
    expected = [{k: v for k, v in r.items() if k not in ("size", "mtime_ns")} for r in rows(results)]
    copy = tmp_path / "copied"
    shutil.copytree(results, copy)  # copy2: the modification times (to the nanosecond) go along, the inodes do not
    for record in copy.glob("runs/*/record.parquet"):
        blank(record)
    found = read_records(copy)
    assert (
        found.skipped == {}
        and [{k: v for k, v in r.items() if k not in ("size", "mtime_ns")} for r in rows(copy)] == expected
    )
    fields = ("run_id", "status", "error", "final_test_acc")
    assert sorted(summaries(copy, fields).values(), key=str) == sorted(summaries(results, fields).values(), key=str)
    report = collect(copy, plots=False)
    assert report.warnings == [] and report.markdown == collect(results, plots=False).markdown


def test_a_record_rewritten_by_a_retry_is_read_from_itself(write_records):
    """A retry that dies between its record and its summary file leaves the earlier run's summary file beside the
    new record: it names another file (size and time), so the record is read."""
    run = {
        "model": "resnet44",
        "status": "failed",
        "final_test_acc": None,
        "test_acc": [0.2],
        "error": f"{CANCELLED}: x",
    }
    results = write_records([run])
    layout = Layout(results)
    [summary_file] = results.glob("runs/*/record.json")
    earlier = summary_file.read_bytes()
    write_records([{"model": "resnet44", "final_test_acc": 0.93}], results=results)
    summary_file.write_bytes(earlier)
    [row] = rows(results)
    assert row["status"] == "completed" and row["final_test_acc"] == 0.93
    assert [s["status"] for s in summaries(results, ("run_id", "status")).values()] == ["completed"]
    assert "| resnet44 | 0.9300" in collect(results, plots=False).markdown
    # rewritten by an earlier cifarbench, which wrote no summary file: the same
    record = pq.read_table(layout.record(row["run_id"]))
    record = with_summary(record.set_column(record.schema.get_field_index("seed"), "seed", [[5]]))
    pq.write_table(record, layout.record(row["run_id"]))
    summary_file.write_bytes(earlier)
    assert [r["seed"] for r in rows(results)] == [5]


def test_a_damaged_or_foreign_summary_file_is_passed_over(write_records):
    results = write_records([{"model": m} for m in ("resnet20", "resnet32", "resnet44", "resnet56")])
    expected = rows(results)
    texts = [b"", b"{not json", b'{"tag": "record-summary/99"}', b"{}\n{}"]
    for summary_file, text in zip(sorted(results.glob("runs/*/record.json")), texts):
        summary_file.write_bytes(text)
    found = read_records(results)
    assert found.skipped == {} and found.table.column(DETAILS_READ).null_count == 4  # each read from its record
    assert rows(results) == expected
    assert len(summaries(results, ("run_id", "status"))) == 4


STATUS = """
import sys
from cifarbench.cluster import status
from cifarbench.store import scan
found = scan.summaries(sys.argv[1], status.FIELDS)
assert "pandas" not in sys.modules, "status read the summary files through pandas"
print(sorted(row["status"] for row in found.values()))
"""


def test_status_reads_the_summary_files_without_pandas(write_records):
    results = write_records(RUNS)
    for record in results.glob("runs/*/record.parquet"):
        blank(record)  # read from the summary files alone
    out = subprocess.run([sys.executable, "-c", STATUS, str(results)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "['completed', 'completed', 'failed']"
