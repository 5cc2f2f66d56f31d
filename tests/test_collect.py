"""cifarbench collect: records on disk -> tables, reference comparison, incomplete runs, plots, CLI."""

import base64
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cifarbench import cli
from cifarbench.cluster import status
from cifarbench.config.resources import STOPPED
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.errors import UsageError
from cifarbench.report import html
from cifarbench.report.collect import collect
from cifarbench.report.plots import curves, sizes
from cifarbench.report.tables import (
    CPU_H,
    GPU_H,
    allocations,
    default_tables,
    device_hours,
    device_hours_part,
    model_depth,
    packing_part,
    recipe_label,
    summarize,
    time_estimate_parts,
    title,
    to_frame,
)
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import write_manifest
from cifarbench.store.records import (
    MISLABELLED,
    OLDER,
    SCHEMA,
    SCHEMA_KEY,
    SCHEMA_TAG,
    SUMMARY_FIELDS,
    SUMMARY_KEY,
    read_record,
    run_state,
)
from cifarbench.store.scan import RUNS_TAG, load_runs, read_records, with_curves

# The seed notebook's tables, verbatim (its own uneven padding included).
NOTEBOOK_STEP200 = """\
| ds/model   | cifar10 | cifar100 |
|-----------|---------|----------|
| resnet18  | 0.95    | 0.78     |
| resnet20  | 0.92    | 0.68     |
| resnet32  | 0.93    | 0.69     |
| resnet34  | 0.96    | 0.79     |
| resnet44  | 0.92    | 0.70     |
| resnet50  | 0.95    | 0.78     |
| resnet56  | 0.92    | 0.71     |"""
NOTEBOOK_RESNET56 = """\
| bs / opt | 64     | 128    | 256    |
|------------|--------|--------|--------|
| cos-200    | 0.7272 | 0.7162 | 0.7147 |
| step-160   | 0.6997 | 0.6861 | 0.6740 |
| step-200   | 0.7127 | 0.7107 | 0.7117 |"""
# The same tables as collect writes them: columns padded to their widest cell, every accuracy to 4 decimals (the
# notebook rounded the first table to 2).
EXPECTED_STEP200 = """\
| ds/model | cifar10 | cifar100 |
|----------|---------|----------|
| resnet18 | 0.9500  | 0.7800   |
| resnet20 | 0.9200  | 0.6800   |
| resnet32 | 0.9300  | 0.6900   |
| resnet34 | 0.9600  | 0.7900   |
| resnet44 | 0.9200  | 0.7000   |
| resnet50 | 0.9500  | 0.7800   |
| resnet56 | 0.9200  | 0.7127   |"""
EXPECTED_RESNET56 = """\
| bs / opt | 64     | 128    | 256    |
|----------|--------|--------|--------|
| cos-200  | 0.7272 | 0.7162 | 0.7147 |
| step-160 | 0.6997 | 0.6861 | 0.6740 |
| step-200 | 0.7127 | 0.7107 | 0.7117 |"""


def seed_rows() -> list[dict]:
    """Records carrying the notebook's numbers: step-200 bs=64 for 7 models x 2 datasets, and ResNet56 on
    CIFAR100 for 3 recipes x 3 batch sizes (the two share step-200 bs=64, where the sweep's 0.7127 rounds to
    the notebook's first table's 0.71)."""
    grid = {
        "cifar10": [0.95, 0.92, 0.93, 0.96, 0.92, 0.95, 0.92],
        "cifar100": [0.78, 0.68, 0.69, 0.79, 0.70, 0.78],
    }  # resnet56: from the sweep below
    models = ["resnet18", "resnet20", "resnet32", "resnet34", "resnet44", "resnet50", "resnet56"]
    rows = [{"model": m, "dataset": d, "final_test_acc": a} for d, accs in grid.items() for m, a in zip(models, accs)]
    sweep = {
        "cos-200": [0.7272, 0.7162, 0.7147],
        "step-160": [0.6997, 0.6861, 0.6740],
        "step-200": [0.7127, 0.7107, 0.7117],
    }
    rows += [
        {"model": "resnet56", "dataset": "cifar100", "recipe": r, "batch_size": bs, "final_test_acc": acc}
        for r, accs in sweep.items()
        for bs, acc in zip((64, 128, 256), accs)
    ]
    return rows


def cells(markdown: str) -> list[list[str]]:
    """A Markdown table's cells, whitespace and separator row ignored."""
    lines = [ln for ln in markdown.strip().splitlines() if not set(ln) <= set("|-")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def section(markdown: str, heading: str) -> str:
    """The text under ``## heading`` up to the next heading."""
    return markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0].strip()


def first_table(text: str) -> str:
    return text.split("\n\n", 1)[0]


def headings_of(markdown: str) -> list[str]:
    return [ln[3:] for ln in markdown.splitlines() if ln.startswith("## ")]


def run_id(**fields) -> str:
    """The run id of a record_row with these spec fields."""
    spec = {"model": "resnet20", "dataset": "cifar10", "recipe": "step-200", "batch_size": 64, "seed": 0, **fields}
    return RunSpec(**{**spec, "recipe": get_recipe(spec["recipe"])}).run_id


def test_means_and_stds_over_seeds(write_records, tmp_path):
    accs = {"resnet20": [0.90, 0.92, 0.91], "resnet56": [0.93, 0.95]}
    results = write_records(
        [
            {
                "model": m,
                "seed": s,
                "final_test_acc": a,
                "images_per_s": 1000.0 * (s + 1),
                "train_seconds": 600.0 * (s + 1),
            }
            for m, values in accs.items()
            for s, a in enumerate(values)
        ]
    )
    report = collect(results, plots=False)
    summary = pd.read_csv(results / "summary.csv").set_index("model")
    for model, values in accs.items():
        row = summary.loc[model]
        assert row.n == len(values) and row.n_failed == 0
        assert row.final_test_acc_mean == pytest.approx(statistics.mean(values))
        assert row.final_test_acc_std == pytest.approx(statistics.stdev(values))
        assert row.images_per_s_mean == pytest.approx(statistics.mean(1000.0 * (s + 1) for s in range(len(values))))
        assert row.train_minutes_mean == pytest.approx(statistics.mean(10.0 * (s + 1) for s in range(len(values))))
    table = cells(first_table(section(report.markdown, "step-200 bs=64")))
    # mean ± std [95% t-interval: mean ± t(0.975, n - 1) std / √n, t = 4.303 for 3 seeds, 12.706 for 2] (n)
    assert table == [
        ["ds/model", "cifar10"],
        ["resnet20", "0.9100 ± 0.0100 [0.8852, 0.9348] (3)"],
        ["resnet56", "0.9400 ± 0.0141 [0.8129, 1.0671] (2‡)"],
    ]
    row = summary.loc["resnet20"]
    assert row.final_test_acc_ci_low == pytest.approx(0.91 - 4.302653 * 0.01 / 3**0.5, abs=1e-6)
    assert row.final_test_acc_ci_high == pytest.approx(0.91 + 4.302653 * 0.01 / 3**0.5, abs=1e-6)
    assert set(summary.ci_level) == {0.95}
    assert "95% confidence interval of the mean over seeds, a Student t-interval" in report.markdown
    assert "‡: fewer than 3 seeds, an interval on one degree of freedom (t = 12.7)" in report.markdown
    narrow = collect(results, out=tmp_path / "90", plots=False, report=False, ci=0.9).markdown
    assert "0.9100 ± 0.0100 [0.8931, 0.9269] (3)" in narrow and "90% confidence interval" in narrow  # t = 2.920
    plain = collect(results, out=tmp_path / "plain", plots=False, report=False, ci=None)
    assert cells(first_table(section(plain.markdown, "step-200 bs=64")))[1:] == [
        ["resnet20", "0.9100 ± 0.0100 (3)"],
        ["resnet56", "0.9400 ± 0.0141 (2)"],
    ]
    assert "confidence interval" not in plain.markdown
    assert "ci_level" not in pd.read_csv(tmp_path / "plain" / "summary.csv").columns
    assert (results / "tables.md").read_text() == report.markdown


def test_bad_files_are_reported_and_change_nothing(write_records, tmp_path):
    rows = [{"model": "resnet20", "seed": s, "final_test_acc": a} for s, a in enumerate([0.90, 0.92])]
    results = write_records(rows)
    clean = collect(results, out=tmp_path / "clean", plots=False)

    good = Layout(results).record(run_id(seed=0))
    truncated = results / "runs" / "truncated" / "record.parquet"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(good.read_bytes()[:-200])
    pq.write_table(pa.table({"x": [1, 2]}), results / "foreign.parquet")
    (results / "old").mkdir()
    older = pq.read_table(good).replace_schema_metadata({SCHEMA_KEY: b"record/0"})
    pq.write_table(older, results / "old" / "r.parquet")
    pq.write_table(pa.concat_tables([pq.read_table(good)] * 2), results / "two-rows.parquet")
    fake = pa.table({"run_id": [1]}).replace_schema_metadata({SCHEMA_KEY: SCHEMA_TAG})
    pq.write_table(fake, results / "fake.parquet")
    (results / "bench").mkdir()  # another cifarbench table (throughput benchmarks): skipped without a warning
    pq.write_table(
        pa.table({"images_per_s": [1.0]}).replace_schema_metadata({SCHEMA_KEY: b"bench/1"}),
        results / "bench" / "host.parquet",
    )
    # the same run collected twice, from a copy of an older attempt: it must not win
    write_records(
        [{**rows[0], "final_test_acc": 0.10, "ended_at": pd.Timestamp("2020-01-01", tz="UTC")}],
        results=results / "copy",
    )

    report = collect(results, out=tmp_path / "dirty", plots=False)
    tables, missing = report.markdown.split("## Missing, failed and lost runs")
    assert tables == clean.markdown.split("## Missing, failed and lost runs")[0]
    assert missing.strip() == "- unreadable record (see the warning): `truncated`"
    assert (tmp_path / "dirty" / "summary.csv").read_text() == (tmp_path / "clean" / "summary.csv").read_text()
    assert report.warnings == [
        "warning: skipped 1 file (tagged as a record, but not with the record schema's columns): fake.parquet",
        "warning: skipped 1 file (Parquet without a cifarbench tag): foreign.parquet",
        "warning: skipped 1 file (schema record/0; this cifarbench reads record/1, record/2, record/3, record/4, "
        "record/5, record/6, record/7, record/8): old/r.parquet",
        "warning: skipped 1 file (unreadable Parquet: corrupt or truncated): runs/truncated/record.parquet",
        "warning: skipped 1 file (in the record schema, but not exactly one run): two-rows.parquet",
        f"note: ignored 1 duplicate record of 1 run (kept the latest completed record of each): {run_id(seed=0)}",
    ]


def test_the_footer_summary_holds_the_records_own_values(write_records):
    results = write_records(
        [
            {"model": "resnet20", "final_test_acc": 0.91},
            {
                "model": "resnet32",
                "status": "failed",
                "final_test_acc": None,
                "test_acc": [0.1],
                "error": "CUDA out of memory.\nTraceback ...",
                "epochs_done": 1,
            },
        ]
    )
    scanned = {row["run_id"]: row for row in read_records(results).table.to_pylist()}
    for path in sorted(results.glob("runs/*/record.parquet")):
        columns = pq.read_table(path).select(SUMMARY_FIELDS).to_pylist()[0]
        first_line = columns["error"] and columns["error"].splitlines()[0]
        summary = json.loads(pq.read_metadata(path).metadata[SUMMARY_KEY])
        assert summary == {**columns, "ended_at": columns["ended_at"].isoformat(), "error": first_line}
        assert {k: scanned[columns["run_id"]][k] for k in SUMMARY_FIELDS} == {**columns, "error": first_line}
    assert len(scanned) == 2 and {row["status"] for row in scanned.values()} == {"completed", "failed"}


@pytest.mark.parametrize("n, runs, files", [(1, "1 run", "1 file"), (2, "2 runs", "2 files")])
def test_counts_say_1_run_and_2_runs(write_records, tmp_path, n, runs, files):
    why = "BackendCompilerFailed: backend='inductor' raised: RuntimeError: Compiler: cc is not found."
    rows = [{"seed": s, "compile": "default", "compile_fallback": why} for s in range(n)]
    results = write_records(rows)
    old = pd.Timestamp("2020-01-01", tz="UTC")
    write_records([{**row, "ended_at": old} for row in rows], results=results / "copy")
    foreign = [f"foreign{i}.parquet" for i in range(n)]
    for name in foreign:
        pq.write_table(pa.table({"x": [1]}), results / name)
    report = collect(results, plots=False)
    assert report.markdown.splitlines()[2].startswith(f"{runs}: {n} completed, 0 failed. Cells:")
    ids = ", ".join(sorted(run_id(seed=s, compile="default") for s in range(n)))
    record = "1 duplicate record" if n == 1 else f"{n} duplicate records"
    assert report.warnings == [
        f"warning: skipped {files} (Parquet without a cifarbench tag): {', '.join(foreign)}",
        f"note: ignored {record} of {runs} (kept the latest completed record of each): {ids}",
        f"note: {runs} asked for torch.compile but trained eagerly (see the report): {ids}",
    ]
    shutil.rmtree(results / "runs")
    shutil.rmtree(results / "copy")
    other = "1 other Parquet file" if n == 1 else f"{n} other Parquet files"
    with pytest.raises(UsageError, match=f"skipped {other}\\)$"):
        collect(results, plots=False)


def test_a_summary_with_a_value_of_the_wrong_type_costs_only_its_own_file(write_records):
    results = write_records([{"model": "resnet20", "seed": s} for s in range(3)])
    path = Layout(results).record(run_id(seed=1))
    record = pq.read_table(path)
    summary = {**json.loads(record.schema.metadata[SUMMARY_KEY]), "seed": "one"}
    pq.write_table(record.replace_schema_metadata({SCHEMA_KEY: SCHEMA_TAG, SUMMARY_KEY: json.dumps(summary)}), path)
    scan = read_records(results)
    assert sorted(scan.table.column("seed").to_pylist()) == [0, 2]
    assert scan.skipped == {MISLABELLED: [f"runs/{run_id(seed=1)}/record.parquet"]}


def test_runs_parquet_is_not_a_record_and_updates_with_the_records(write_records):
    results = write_records(
        [{"model": "resnet20", "final_test_acc": 0.90}, {"model": "resnet32", "final_test_acc": 0.91}]
    )
    first = collect(results, plots=False, report=False)
    assert pq.read_schema(results / "runs.parquet").metadata[SCHEMA_KEY] == RUNS_TAG
    runs = pq.read_table(results / "runs.parquet")
    # curves and details come with the summary files (records without them: tests/test_summary_files.py)
    assert runs.num_rows == 2 and runs.column("test_acc").null_count == 0
    assert all(runs.column("details_read").to_pylist())
    again = collect(results, plots=False)  # reads runs.parquet back as the cache of unchanged records
    assert again.warnings == [] and again.markdown == first.markdown
    write_records([{"model": "resnet20", "final_test_acc": 0.95}], results=results)  # a rerun replaced the record
    updated = collect(results, plots=False)
    assert cells(first_table(section(updated.markdown, "step-200 bs=64")))[1:] == [
        ["resnet20", "0.9500"],
        ["resnet32", "0.9100"],
    ]


SINCE_8 = ["world_size", "sync_bn"]  # world_size also a summary key, sync_bn a column only
SINCE_7 = ["python", "container", *SINCE_8]  # python and container: columns only
SINCE_6 = ["peak_host_mb", "peak_device_mb", *SINCE_7]
SINCE_5 = ["alloc_gpus", "alloc_cpus", "wall_seconds", *SINCE_6]
# keys record/5 added to the summary for columns that record/4 already had
SUMMARY_SINCE_5 = ["precision_used", "train_images", "test_images", "estimate_source", "packed_with", "fuse_size",
                   "fused_with"]  # fmt: skip
SINCE_4 = [
    "milestone_unit",
    "iterations",
    "warmup_iterations",
    "warmup_lr",
    "warmup_mode",
    "data_fingerprint",
    "val_split",
    "train_images",
    "val_images",
    "test_images",
    "val_loss",
    "val_acc",
    "best_val_acc",
    "best_val_epoch",
    "test_acc_at_best_val",
    "pack_size",
    "packed_with",
    "mps",
    "fuse_size",
    "fused_with",
    *SINCE_5,
]
SINCE_4_SUMMARY = [
    "milestone_unit",
    "iterations",
    "warmup_iterations",
    "val_split",
    "data_fingerprint",
    "best_val_acc",
    "best_val_epoch",
    "test_acc_at_best_val",
    "pack_size",
    "mps",
    *SINCE_5,
    *SUMMARY_SINCE_5,
]
SINCE_3 = ["test_seconds", "time_limit_s", "estimated_s", "estimate_source", *SINCE_4]
# what each older writer left out: columns, and keys of the footer summary
OLD_WRITERS = {
    1: (["compile", "compile_fallback", *SINCE_3], ["compile", "compile_fallback", "test_seconds", "device_name",
                                                    "time_limit_s", "estimated_s", *SINCE_4_SUMMARY]),
    2: (SINCE_3, ["test_seconds", "device_name", "time_limit_s", "estimated_s", *SINCE_4_SUMMARY]),
    3: (SINCE_4, SINCE_4_SUMMARY),
    4: (SINCE_5, [*SINCE_5, *SUMMARY_SINCE_5]),
    5: (SINCE_6, SINCE_6),
    6: (SINCE_7, ["world_size"]),
    7: (SINCE_8, ["world_size"]),
}  # fmt: skip


def stood_for(version: int) -> dict:
    """The values a reader gives the columns a record/``version`` file lacks (None unless OLDER says otherwise)."""
    return {column: OLDER[version].get(column) for column in OLD_WRITERS[version][0]}


def as_record(version: int, path) -> None:
    """Rewrite a current record as cifarbench's record/``version`` writer wrote it: without the columns that came
    later, tagged record/``version``, with a summary without their keys."""
    columns, keys = OLD_WRITERS[version]
    record = pq.read_table(path)
    summary = json.loads(record.schema.metadata[SUMMARY_KEY])
    for key in keys:
        summary.pop(key, None)  # columns that never had a summary key
    old = record.drop_columns(columns)
    old = old.set_column(0, "record_version", pa.array([version], pa.int32()))
    meta = {SCHEMA_KEY: f"record/{version}".encode(), SUMMARY_KEY: json.dumps(summary, separators=(",", ":")).encode()}
    pq.write_table(old.replace_schema_metadata(meta), path)


def as_record_1(path) -> None:
    as_record(1, path)


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7])
def test_older_records_read_whole_and_by_their_summary(write_records, version):
    measured = {"wall_seconds": 2000.0, "peak_host_mb": 2900.0, "peak_device_mb": 1500.0,
                "python": "/opt/envs/bench/bin/python", "container": "/images/bench.sif"}  # fmt: skip
    results = write_records([{"model": "resnet20", "final_test_acc": 0.91, "test_seconds": 12.5, **measured}])
    path = Layout(results).record(run_id(model="resnet20"))
    current = read_record(path)
    as_record(version, path)
    assert read_record(path) == {**current, **stood_for(version), "record_version": version}
    found = read_records(results)
    assert found.skipped == {} and found.table.num_rows == 1
    row = found.table.to_pylist()[0]
    assert row["final_test_acc"] == 0.91
    if version < 6:
        assert row["peak_host_mb"] is None and row["peak_device_mb"] is None
    else:
        assert row["peak_host_mb"] == 2900.0
    if version < 5:
        assert row["alloc_gpus"] is None and row["wall_seconds"] is None
    else:
        assert row["wall_seconds"] == 2000.0
    if version < 4:  # before the protocol columns: every run counted epochs and held nothing out
        assert row["milestone_unit"] == "epochs" and row["val_split"] == 0
    if version < 3:
        assert row["device_name"] is None and row["test_seconds"] is None
    else:
        assert row["test_seconds"] == 12.5


def test_a_record_1_file_is_read_as_an_eager_run(write_records):
    results = write_records(
        [{"model": "resnet20", "final_test_acc": 0.91}, {"model": "resnet32", "final_test_acc": 0.92}]
    )
    path = Layout(results).record(run_id(model="resnet20"))
    current = read_record(path)
    as_record_1(path)
    assert pq.read_schema(path).names == [n for n in SCHEMA.names if n not in OLD_WRITERS[1][0]]
    assert read_record(path) == {**current, **stood_for(1), "record_version": 1}
    assert current["compile"] is None and current["compile_fallback"] is None

    report = collect(results, plots=False)
    assert report.warnings == []
    headings = [ln[3:] for ln in report.markdown.splitlines() if ln.startswith("## ")]
    assert headings == ["step-200 bs=64", "Missing, failed and lost runs"]
    assert cells(first_table(section(report.markdown, "step-200 bs=64")))[1:] == [
        ["resnet20", "0.9100"],
        ["resnet32", "0.9200"],
    ]
    assert pd.read_csv(results / "summary.csv").compile.tolist() == ["eager", "eager"]
    assert collect(results, where=["compile=eager"], plots=False).markdown == report.markdown

    # a record/1 summary and tag on a file with the current columns: not what record/1 is
    current_file = Layout(results).record(run_id(model="resnet32"))
    record = pq.read_table(current_file)
    as_record_1(current_file)
    pq.write_table(record.replace_schema_metadata(pq.read_schema(current_file).metadata), current_file)
    assert read_records(results).skipped == {MISLABELLED: [f"runs/{run_id(model='resnet32')}/record.parquet"]}


def test_a_runs_parquet_from_before_the_compile_columns_is_ignored(write_records):
    results = write_records([{"model": "resnet20", "final_test_acc": 0.91}])
    first = collect(results, plots=False)
    runs = pq.read_table(results / "runs.parquet")
    acc = runs.schema.get_field_index("final_test_acc")
    older = runs.drop_columns(["compile", "compile_fallback"]).set_column(acc, "final_test_acc", pa.array([0.5]))
    pq.write_table(older.replace_schema_metadata(runs.schema.metadata), results / "runs.parquet")
    assert load_runs(results / "runs.parquet", results) is None
    again = collect(results, plots=False)  # the record, unchanged on disk, is read again: not the cache's 0.5
    assert again.markdown == first.markdown and again.warnings == []
    assert pq.read_table(results / "runs.parquet").drop_columns("test_acc").equals(runs.drop_columns("test_acc"))


def test_compiled_and_eager_runs_are_separate_configurations(write_records):
    accs = {None: [0.90, 0.92], "default": [0.91, 0.93], "max-autotune": [0.94, 0.96]}
    results = write_records(
        [
            {"model": m, "compile": mode, "seed": s, "final_test_acc": a - (m == "resnet32") * 0.1}
            for m in ("resnet20", "resnet32")
            for mode, values in accs.items()
            for s, a in enumerate(values)
        ]
    )
    report = collect(results, plots=False, ci=None)
    headings = [ln[3:] for ln in report.markdown.splitlines() if ln.startswith("## ")]
    assert headings == [
        "step-200 bs=64 compile=default",
        "step-200 bs=64 compile=eager",
        "step-200 bs=64 compile=max-autotune",
        "Missing, failed and lost runs",
    ]
    assert cells(first_table(section(report.markdown, "step-200 bs=64 compile=eager")))[1:] == [
        ["resnet20", "0.9100 ± 0.0141 (2)"],
        ["resnet32", "0.8100 ± 0.0141 (2)"],
    ]
    assert cells(first_table(section(report.markdown, "step-200 bs=64 compile=default")))[1:] == [
        ["resnet20", "0.9200 ± 0.0141 (2)"],
        ["resnet32", "0.8200 ± 0.0141 (2)"],
    ]
    shown = report.markdown.split("## Missing, failed and lost runs")[0]
    assert report.warnings == [] and "None" not in shown and "nan" not in shown

    pivot = collect(results, rows=["model"], cols=["compile"], plots=False, ci=None)
    assert cells(first_table(section(pivot.markdown, "CIFAR10 step-200 bs=64"))) == [
        ["compile / model", "default", "eager", "max-autotune"],
        ["resnet20", "0.9200 ± 0.0141 (2)", "0.9100 ± 0.0141 (2)", "0.9500 ± 0.0141 (2)"],
        ["resnet32", "0.8200 ± 0.0141 (2)", "0.8100 ± 0.0141 (2)", "0.8500 ± 0.0141 (2)"],
    ]
    eager = collect(results, where=["compile=eager"], plots=False, ci=None)
    assert [ln[3:] for ln in eager.markdown.splitlines() if ln.startswith("## ")] == [
        "step-200 bs=64",
        "Missing, failed and lost runs",
    ]
    assert cells(first_table(section(eager.markdown, "step-200 bs=64")))[1:] == [
        ["resnet20", "0.9100 ± 0.0141 (2)"],
        ["resnet32", "0.8100 ± 0.0141 (2)"],
    ]
    compiled = collect(results, where=["compile=default", "compile=max-autotune"], plots=False)
    assert [ln[3:] for ln in compiled.markdown.splitlines() if ln.startswith("## ")] == headings[:1] + headings[2:]


def test_a_run_whose_compile_fell_back_to_eager_is_listed_and_warned_about(write_records):
    why = "BackendCompilerFailed: backend='inductor' raised: RuntimeError: Compiler: cc is not found."
    results = write_records(
        [
            {"model": "resnet20", "final_test_acc": 0.91},
            {"model": "resnet20", "compile": "default", "final_test_acc": 0.92},
            {"model": "resnet32", "compile": "default", "final_test_acc": 0.90, "compile_fallback": why},
        ]
    )
    report = collect(results, plots=False)
    fell_back = run_id(model="resnet32", compile="default")
    assert report.warnings == [f"note: 1 run asked for torch.compile but trained eagerly (see the report): {fell_back}"]
    assert section(report.markdown, "Missing, failed and lost runs").splitlines() == [
        f"- trained eagerly, torch.compile failed: `{fell_back}` (resnet32 cifar10 step-200 bs=64 seed=0 "
        f"compile=default): {why}"
    ]
    assert cells(first_table(section(report.markdown, "step-200 bs=64 compile=default")))[1:] == [
        ["resnet20", "0.9200"],
        ["resnet32", "0.9000"],
    ]  # a completed run: its cell stays, and the list says why
    assert collect(results, where=["compile=eager"], plots=False).warnings == []


def test_seed_notebook_layout(write_records):
    report = collect(write_records(seed_rows()), plots=False)
    headings = [ln[3:] for ln in report.markdown.splitlines() if ln.startswith("## ")]
    assert headings == ["step-200 bs=64", "ResNet56 CIFAR100", "Missing, failed and lost runs"]
    step200 = first_table(section(report.markdown, "step-200 bs=64"))
    resnet56 = first_table(section(report.markdown, "ResNet56 CIFAR100"))
    assert step200 == EXPECTED_STEP200
    assert resnet56 == EXPECTED_RESNET56
    assert [[round(float(c), 2) for c in row[1:]] for row in cells(step200)[1:]] == [
        [float(c) for c in row[1:]] for row in cells(NOTEBOOK_STEP200)[1:]
    ]  # the notebook's figures, to its 2 decimals
    assert cells(resnet56) == cells(NOTEBOOK_RESNET56)


def test_models_are_ordered_by_depth_across_families_as_in_the_notebook():
    from cifarbench.train.models import MODELS

    assert {m: model_depth(m) for m in MODELS} == {m: info.depth for m, info in MODELS.items()}
    notebook = ["resnet18", "resnet20", "resnet32", "resnet34", "resnet44", "resnet50", "resnet56"]
    assert sorted(reversed(notebook), key=model_depth) == notebook


def test_reference_comparison_with_the_seed_notebook(write_records):
    report = collect(write_records(seed_rows()), plots=False)
    comparison = cells(section(report.markdown, "ResNet56 CIFAR100").split("\n\n")[1])
    # no run held a validation split out, and the test-selected best epoch is only shown when asked for
    assert comparison[0] == [
        "recipe",
        "batch_size",
        "final test acc",
        "published",
        "Δ final test acc − published",
        "published inside our interval",
    ]
    assert ["step-160", "256", "0.6740", "0.6740 [1]", "+0.0000", "– (1 seed)"] in comparison
    notes = section(report.markdown, "ResNet56 CIFAR100").split("\n\n")[2]
    assert (
        "[1] seed-notebook: final epoch" in notes
        and "(the same protocol: recipe, batch size and epochs as published)" in notes
    )
    assert "selected on the test set" not in report.markdown
    best = collect(write_records(seed_rows()), value="best_test_acc", plots=False).markdown
    header = cells(section(best, "ResNet56 CIFAR100").split("\n\n")[1])[0]
    assert header[2:] == [
        "final test acc",
        "best test epoch acc (selected on the test set)†",
        "published",
        "Δ best test epoch acc (selected on the test set) − published",
        "published inside our interval",
    ]
    assert "† the epoch of highest test accuracy: selected on the test set, so optimistic." in best


def test_reference_from_a_paper_shows_the_difference_and_its_protocol(write_records):
    results = write_records(
        [
            {"model": "resnet20", "recipe": "step-160", "batch_size": 128, "final_test_acc": 0.9150},
            {"model": "resnet32", "recipe": "step-160", "batch_size": 128, "final_test_acc": 0.9200},
        ]
    )
    default = collect(results, plots=False)
    assert "published" not in default.markdown  # the notebook never ran step-160 at batch size 128
    report = collect(results, source="he2016", plots=False)
    text = section(report.markdown, "step-160 bs=128")
    rows = cells(text.split("\n\n")[1])
    assert ["resnet20", "cifar10", "0.9150", "0.9125 [1]", "+0.0025", "– (1 seed)"] in rows
    assert ["resnet32", "cifar10", "0.9200", "0.9249 [2]", "-0.0049", "– (1 seed)"] in rows
    assert "[1] he2016: Table 6 of arXiv:1512.03385; 45k/5k split" in text
    assert "(a different protocol: he2016, batch size 128, 182 epochs)" in text
    with pytest.raises(UsageError, match="unknown --reference source 'he2017' \\(did you mean 'he2016'\\?\\)"):
        collect(results, source="he2017", plots=False)


def test_failed_lost_and_never_submitted_runs_are_listed(write_records):
    results = write_records(
        [
            {"model": "resnet20", "final_test_acc": 0.91},
            {
                "model": "resnet32",
                "status": "failed",
                "final_test_acc": None,
                "test_acc": [0.1, 0.2],
                "error": "CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback ...",
                "epochs_done": 2,
            },
        ]
    )
    spec = lambda model, seed=0: RunSpec(
        model=model,
        dataset="cifar10",
        recipe=get_recipe("step-200"),
        batch_size=64,
        seed=seed,
    )
    lost = spec("resnet44")
    (results / "runs" / lost.run_id).mkdir()
    (results / "runs" / lost.run_id / "last.ckpt").write_bytes(b"checkpoint")
    expected = [spec("resnet20"), spec("resnet32"), lost, spec("resnet56", seed=3)]
    report = collect(results, expected=expected, plots=False)
    table = cells(first_table(section(report.markdown, "step-200 bs=64")))
    assert table[1:] == [["resnet20", "0.9100"], ["resnet32", "failed"]]
    listed = section(report.markdown, "Missing, failed and lost runs").splitlines()
    assert listed == [
        f"- failed: `{spec('resnet32').run_id}` (resnet32 cifar10 step-200 bs=64 seed=0): "
        "CUDA out of memory. Tried to allocate 2.00 GiB",
        f"- no record (still running, or lost): `{lost.run_id}` (resnet44 cifar10 step-200 bs=64 seed=0)",
        f"- not submitted: `{spec('resnet56', 3).run_id}` (resnet56 cifar10 step-200 bs=64 seed=3)",
    ]


CANCELLED = "Cancelled: the job received SIGTERM (scancel, a requeue, or the node shutting down)"


def failed(error: str) -> dict:
    return {"status": "failed", "final_test_acc": None, "test_acc": [0.1], "epochs_done": 1, "error": error}


def test_a_records_state_is_completed_failed_or_cancelled():
    assert run_state("completed", None) == "completed"
    assert run_state("failed", CANCELLED) == "cancelled"
    assert run_state("failed", "RuntimeError: boom") == run_state("failed", None) == "failed"
    # a packed run its job stopped resumes when the job is requeued; its record alone says failed, not cancelled
    assert run_state("failed", f"{STOPPED}: stopped by its job (SIGTERM); it resumes") == "failed"


def test_a_cancelled_run_is_cancelled_in_collect_in_the_report_and_in_status(write_records, tmp_path):
    """A run cancelled with scancel (its record's error says so) reads the same in status, tables.md and
    report.html; a failed run beside it stays failed."""
    later = datetime.now(timezone.utc) + timedelta(minutes=1)  # written after the submission below
    rows = [
        {"model": "resnet20", "seed": 0, "final_test_acc": 0.91},
        {"model": "resnet20", "seed": 1, **failed(CANCELLED)},
        {"model": "resnet32", **failed("RuntimeError: boom")},
        {"model": "resnet44", **failed(CANCELLED)},
    ]
    ids = [run_id(model=r["model"], seed=r.get("seed", 0)) for r in rows]
    gone = subprocess.Popen(["true"])  # a local job that has ended
    gone.wait()
    entries = [
        {"run_id": i, "job_id": str(gone.pid), "array_job_id": str(gone.pid), "array_index": 0,
         "stdout": str(tmp_path / "out"), "stderr": str(tmp_path / "err"),
         "spec": RunSpec(model=r["model"], dataset="cifar10", recipe=get_recipe("step-200"), batch_size=64,
                         seed=r.get("seed", 0)).to_dict()}
        for i, r in zip(ids, rows)
    ]  # fmt: skip
    write_manifest(tmp_path / "results", "local", None, entries)
    results = write_records([{**r, "ended_at": later} for r in rows])

    report = collect(results, plots=False)
    states = {s.run_id: s.status for s in status.collect_status(results)}
    assert list(states.values()) == ["completed", "cancelled", "failed", "cancelled"]
    assert dict(zip(runs_of(results).run_id, runs_of(results).status)) == states  # one word for one state
    assert report.markdown.splitlines()[2].startswith("4 runs: 1 completed, 1 failed, 2 cancelled. ")
    assert cells(first_table(section(report.markdown, "step-200 bs=64")))[1:] == [
        ["resnet20", "0.9100 (1 of 2 seeds)"],
        ["resnet32", "failed"],
        ["resnet44", "cancelled"],
    ]
    assert section(report.markdown, "Missing, failed and lost runs").splitlines() == [
        f"- failed: `{ids[2]}` (resnet32 cifar10 step-200 bs=64 seed=0): RuntimeError: boom",
        f"- cancelled: `{ids[1]}` (resnet20 cifar10 step-200 bs=64 seed=1): {CANCELLED}",
        f"- cancelled: `{ids[3]}` (resnet44 cifar10 step-200 bs=64 seed=0): {CANCELLED}",
    ]
    summary = pd.read_csv(results / "summary.csv").set_index("model")
    assert summary.loc["resnet20", ["n", "n_failed", "n_cancelled", "n_expected"]].tolist() == [1, 0, 1, 2]
    assert summary.loc["resnet44", ["n", "n_failed", "n_cancelled", "n_expected"]].tolist() == [0, 0, 1, 1]
    page = Layout(results).report.read_text()
    assert f"<code>{ids[3]}</code>: cancelled</summary>" in page and f"<code>{ids[2]}</code>: failed</summary>" in page
    runs_table = page.split('<section id="runs">', 1)[1]
    # the runs' rows, and those of the configurations none of whose runs completed (resnet44's, resnet32's)
    assert runs_table.count('<tr class="cancelled">') == 3 and runs_table.count('<tr class="failed">') == 2
    assert "<td>cancelled</td>" in runs_table and "SIGTERMException" not in page


def runs_of(results):
    return to_frame(read_records(results).table)


def test_a_cell_with_a_missing_seed_says_how_many_of_how_many(write_records, tmp_path):
    """The user's report: one of two seeds failed and the cell read 0.1500 as if complete."""
    results = write_records(
        [
            {"model": "resnet20", "seed": 0, "final_test_acc": 0.15},
            {"model": "resnet20", "seed": 1, **failed("RuntimeError: boom")},
            {"model": "resnet32", "seed": 0, "final_test_acc": 0.90},
            {"model": "resnet32", "seed": 1, "final_test_acc": 0.92},
        ]
    )
    report = collect(results, plots=False, report=False, ci=None)
    assert cells(first_table(section(report.markdown, "step-200 bs=64")))[1:] == [
        ["resnet20", "0.1500 (1 of 2 seeds)"],
        ["resnet32", "0.9100 ± 0.0141 (2)"],
    ]
    # the grid has three seeds of each: the third never ran, and no record says so; the grid does
    grid = [RunSpec(model=m, dataset="cifar10", recipe=get_recipe("step-200"), batch_size=64, seed=s)
            for m in ("resnet20", "resnet32") for s in range(3)]  # fmt: skip
    report = collect(results, expected=grid, plots=False, report=False)
    assert cells(first_table(section(report.markdown, "step-200 bs=64")))[1:] == [
        ["resnet20", "0.1500 (1 of 3 seeds)"],
        ["resnet32", "0.9100 ± 0.0141 [0.7829, 1.0371] (2 of 3 seeds‡)"],
    ]
    assert "(n of N seeds) where only n of" in report.markdown.splitlines()[2]
    # a grid of other runs (another batch size) does not change these cells
    other = [RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-200"), batch_size=128, seed=s)
             for s in range(5)]  # fmt: skip
    summary, _ = summarize(runs_of(results), other)
    assert summary.n_expected.tolist() == [2, 2]


def test_the_comparison_and_both_kinds_of_table_use_the_same_decimals(write_records):
    report = collect(write_records(seed_rows()), plots=False, report=False)
    numbers = [
        c
        for heading in ("step-200 bs=64", "ResNet56 CIFAR100")
        for text in section(report.markdown, heading).split("\n\n")[:2]
        for row in cells(text)[1:]
        for c in row
        if c[:1].isdigit() and "." in c
    ]
    assert len(numbers) > 30 and {len(c.split(" ")[0].split(".")[1]) for c in numbers} == {4}


def test_packing_and_fusion_show_images_per_s_per_run_and_per_allocation(write_records):
    ids = lambda model, n: [run_id(model=model, seed=s) for s in range(n)]
    packed, fused = ids("resnet20", 2), ids("resnet32", 2)
    gpu = {"device_name": "NVIDIA H200", "alloc_gpus": 1, "alloc_cpus": 8}
    results = write_records(
        [{"model": "resnet20", "seed": 5, "images_per_s": 4000.0, **gpu}]
        + [{"model": "resnet20", "seed": s, "pack_size": 2, "packed_with": [i for i in packed if i != packed[s]],
            "mps": "on", "images_per_s": 3000.0 + 200 * s, **gpu} for s in range(2)]
        + [{"model": "resnet32", "seed": s, "fuse_size": 2, "fused_with": [i for i in fused if i != fused[s]],
            "images_per_s": 2500.0, **gpu} for s in range(2)]
    )  # fmt: skip
    report = collect(results, plots=False, report=False)
    text = section(report.markdown, "Packing and fusion")
    assert cells(first_table(text)) == [
        ["model", "batch_size", "device", "trained", "MPS", "runs", "images/s per run", "images/s per allocation",
         "allocation / alone"],
        ["resnet20", "64", "NVIDIA H200", "alone", "–", "1", "4000", "4000", "1.00×"],
        ["resnet20", "64", "NVIDIA H200", "pack of 2", "on", "2", "3100", "6200", "1.55×"],
        ["resnet32", "64", "NVIDIA H200", "fused 2", "–", "2", "2500", "5000", "–"],
    ]  # fmt: skip
    assert "CUDA MPS" in text
    alone = write_records([{"model": "resnet20", "seed": s} for s in range(2)], results=results.parent / "alone")
    assert packing_part(runs_of(alone)) is None
    assert "Packing and fusion" not in collect(alone, plots=False, report=False).markdown


def test_custom_pivot_and_where(write_records):
    runs = [
        ("cifar100", "cos-200", 64, 0.7272),
        ("cifar100", "step-160", 64, 0.6997),
        ("cifar100", "cos-200", 128, 0.7162),
        ("cifar10", "cos-200", 64, 0.94),
    ]
    results = write_records(
        [
            {"model": "resnet56", "dataset": d, "recipe": r, "batch_size": bs, "final_test_acc": acc}
            for d, r, bs, acc in runs
        ]
    )
    report = collect(results, rows=["recipe"], cols=["batch_size"], where=["dataset=cifar100"], plots=False)
    assert cells(first_table(section(report.markdown, "ResNet56 CIFAR100"))) == [
        ["batch_size / recipe", "64", "128"],
        ["cos-200", "0.7272", "0.7162"],
        ["step-160", "0.6997", "–"],
    ]
    speed = collect(results, rows=["model"], cols=["dataset"], value="images_per_s", plots=False)
    assert "5000" in speed.markdown
    with pytest.raises(UsageError, match="unknown --where key 'datset' \\(did you mean 'dataset'\\?\\)"):
        collect(results, where=["datset=cifar100"], plots=False)
    with pytest.raises(UsageError, match="--where batch_size: big is not a number"):
        collect(results, where=["batch_size=big"], plots=False)


def test_plots_are_written(write_records, tmp_path):
    results = write_records(
        [
            {"model": m, "dataset": d, "seed": s, "final_test_acc": 0.9 - 0.01 * s, "params": p}
            for m, p in (("resnet20", 272_474), ("resnet56", 855_770))
            for d in ("cifar10", "cifar100")
            for s in range(2)
        ]
    )
    report = collect(results, out=tmp_path / "out")
    pngs = [p for p in report.written if p.suffix == ".png"]
    assert pq.read_table(tmp_path / "out" / "runs.parquet").column("test_acc").null_count == 0  # read once, kept
    assert {p.name for p in pngs} == {
        "curves_step-200_bs=64.png",
        "size_cifar10_step-200.png",
        "size_cifar100_step-200.png",
    }
    page = (tmp_path / "out" / "report.html").read_text()
    for png in pngs:
        assert png.parent == tmp_path / "out" / "plots"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        # drawn while the page was made, and in it all the same
        assert base64.b64encode(png.read_bytes()).decode() in page


def test_an_error_while_the_plots_are_drawn_stops_them(write_records, tmp_path, monkeypatch):
    results = write_records([{"model": m, "seed": s} for m in ("resnet20", "resnet56") for s in range(2)])

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(html, "write_report", fail)
    with pytest.raises(OSError, match="disk full"):
        collect(results, out=tmp_path / "out")
    assert multiprocessing.active_children() == []  # no drawing process left behind


SHORT = "step-200, 2 of 200 epochs, milestones 1,1,2"  # step-200 as a 2-epoch run runs it


def test_a_shortened_recipe_says_so_in_titles_and_labels(write_records):
    budget = {"estimated_s": 300.0, "time_limit_s": 900, "wall_seconds": 330.0, "train_seconds": 240.0}
    results = write_records(
        [{"model": m, "epochs": 2, "final_test_acc": a, **budget} for m, a in (("resnet20", 0.5), ("resnet32", 0.6))]
        + [
            {"model": "resnet56", "dataset": "cifar100", "recipe": r, "batch_size": bs, "epochs": 2}
            for r in ("step-200", "cos-200")
            for bs in (64, 128)
        ]
    )
    report = collect(results, plots=False)
    headings = [ln[3:] for ln in report.markdown.splitlines() if ln.startswith("## ")]
    assert headings == [f"{SHORT} bs=64", "ResNet56 CIFAR100", "Time estimates", "Missing, failed and lost runs"]
    assert cells(first_table(section(report.markdown, f"{SHORT} bs=64"))) == [
        ["ds/model", "cifar10", "cifar100"],
        ["resnet20", "0.5000", "–"],
        ["resnet32", "0.6000", "–"],
        ["resnet56", "–", "0.9000"],
    ]
    sweep = cells(first_table(section(report.markdown, "ResNet56 CIFAR100")))
    assert [row[0] for row in sweep] == ["bs / opt", "cos-200, 2 of 200 epochs", SHORT]
    per_configuration = section(report.markdown, "Time estimates").split("\n\n")[2]  # after the sources and a note
    assert [row[:4] for row in cells(per_configuration)[1:]] == [
        ["resnet20", "cifar10", SHORT, "64"],
        ["resnet32", "cifar10", SHORT, "64"],
    ]
    pivot = collect(results, rows=["recipe"], cols=["model"], where=["dataset=cifar10"], plots=False)
    assert headings_of(pivot.markdown)[0] == "CIFAR10 bs=64"
    assert cells(first_table(section(pivot.markdown, "CIFAR10 bs=64")))[1][0] == SHORT


def test_a_shortened_run_beside_the_full_length_one_gets_a_table_of_its_own(write_records):
    results = write_records([{"model": m, "epochs": e} for m in ("resnet20", "resnet32") for e in (2, None)])
    assert headings_of(collect(results, plots=False).markdown) == [
        f"{SHORT} bs=64",
        "step-200 bs=64 epochs=200",
        "Missing, failed and lost runs",
    ]


def frame(results):
    """The runs collect reads from a results folder: every record's summary, as a DataFrame."""
    return to_frame(read_records(results).table)


def shared(specs: list[dict], **fields) -> list[dict]:
    """Records of the runs of one array task: ``specs`` packed together (``pack_size``, ``packed_with``) or, with
    ``fuse_size``, fused (``fused_with``); ``fields`` (allocation, budget) the same in every one."""
    ids = [run_id(**spec) for spec in specs]
    company = "fused_with" if "fuse_size" in fields else "packed_with"
    size = {} if "fuse_size" in fields else {"pack_size": len(specs)}
    return [{**spec, **size, **fields, company: [i for i in ids if i != own]} for spec, own in zip(specs, ids)]


def allocation_rows() -> list[dict]:
    """Five array tasks: a pack of 4 (two batch sizes) on 1 GPU, a fused pair on 2 GPUs, a run alone on 8 CPU cores,
    a record from before record/5 and a run started by `cifarbench run` (no estimate, no limit)."""
    pack = [{"model": "resnet20", "batch_size": bs, "seed": s} for bs in (64, 128) for s in (0, 1)]
    rows = [
        {**row, "wall_seconds": wall}
        for row, wall in zip(
            shared(
                pack, alloc_gpus=1, alloc_cpus=8, estimated_s=2880.0, time_limit_s=5400, estimate_source="records: a"
            ),
            (3000.0, 3200.0, 3600.0, 3400.0),  # the allocation lasted as long as its longest run
        )
    ]
    rows += shared(
        [{"model": "resnet32", "seed": s} for s in (0, 1)],
        fuse_size=2,
        alloc_gpus=2,
        alloc_cpus=16,
        wall_seconds=1800.0,
        estimated_s=1800.0,
        time_limit_s=3600,
        estimate_source="records: b",
    )
    rows.append(
        {
            "model": "resnet56",
            "batch_size": 128,
            "alloc_gpus": 0,
            "alloc_cpus": 8,
            "wall_seconds": 450.0,
            "estimated_s": 360.0,
            "time_limit_s": 900,
            "estimate_source": "prior: c",
        }
    )
    rows.append({"model": "resnet44"})  # no allocation, no wall-clock time
    rows.append({"model": "resnet110", "batch_size": 128, "alloc_gpus": 1, "alloc_cpus": 4, "wall_seconds": 1800.0})
    return rows


def test_an_allocation_counts_once_for_the_folder_and_its_runs_share_it(write_records):
    runs = frame(write_records(allocation_rows()))
    tasks, task_of = allocations(runs)
    assert sorted(tasks.runs) == [1, 1, 1, 2, 4] and task_of.nunique() == 5
    folder = device_hours(tasks, task_of)
    assert folder.runs == 9 and folder.left_out == {"used": 1, "estimated": 2, "reserved": 2}
    # the pack of 4 on 1 GPU for 3600 s: 1 GPU-h, not 4; the fused pair on 2 GPUs for 1800 s: 1 GPU-h
    assert folder.hours == pytest.approx(
        {
            ("used", GPU_H): 1.0 + 1.0 + 0.5,
            ("estimated", GPU_H): 0.8 + 1.0,
            ("reserved", GPU_H): 1.5 + 2.0,
            ("used", CPU_H): 1.0,
            ("estimated", CPU_H): 0.8,
            ("reserved", CPU_H): 2.0,
        }
    )
    one = device_hours(tasks, task_of[runs.model.eq("resnet20") & runs.seed.eq(0) & runs.batch_size.eq(64)])
    assert one.hours == pytest.approx({("used", GPU_H): 0.25, ("estimated", GPU_H): 0.2, ("reserved", GPU_H): 0.375})

    summary, config = summarize(runs)
    part = device_hours_part(runs, default_tables(summary), config)
    assert part is not None and part.header == ["runs of", "runs", "used", "estimated", "reserved"]
    two_left = "(2 runs left out)"
    assert part.body == [
        ["the results folder", "9", "2.50 GPU-h; 1.00 CPU-core-h (1 run left out)",
         f"1.80 GPU-h; 0.80 CPU-core-h {two_left}", f"3.50 GPU-h; 2.00 CPU-core-h {two_left}"],
        # half the pack, the fused pair and the record without an allocation
        ["step-200 bs=64", "5", "1.50 GPU-h (1 run left out)", "1.40 GPU-h (1 run left out)",
         "2.75 GPU-h (1 run left out)"],
        # the other half, the CPU run and the run without an estimate
        ["step-200 bs=128", "4", "1.00 GPU-h; 1.00 CPU-core-h", "0.40 GPU-h; 0.80 CPU-core-h (1 run left out)",
         "0.75 GPU-h; 2.00 CPU-core-h (1 run left out)"],
        ["ResNet20 CIFAR10", "4", "1.00 GPU-h", "0.80 GPU-h", "1.50 GPU-h"],  # the whole pack, in two tables too
    ]  # fmt: skip
    assert len(part.notes) == 2 and "counts once for the folder" in part.notes[0]


def test_device_hours_in_tables_md_also_where_runs_are_selected(write_records):
    results = write_records(allocation_rows())
    report = collect(results, where=["batch_size=64"], plots=False, report=False)
    assert headings_of(report.markdown) == ["step-200 bs=64", "Device-hours", "Time estimates", "Packing and fusion",
                                            "Missing, failed and lost runs"]  # fmt: skip
    assert cells(first_table(section(report.markdown, "Device-hours")))[1:] == [
        ["the results folder", "9", "2.50 GPU-h; 1.00 CPU-core-h (1 run left out)",
         "1.80 GPU-h; 0.80 CPU-core-h (2 runs left out)", "3.50 GPU-h; 2.00 CPU-core-h (2 runs left out)"],
        ["the runs selected (--where)", "5", "1.50 GPU-h (1 run left out)", "1.40 GPU-h (1 run left out)",
         "2.75 GPU-h (1 run left out)"],
        ["step-200 bs=64", "5", "1.50 GPU-h (1 run left out)", "1.40 GPU-h (1 run left out)",
         "2.75 GPU-h (1 run left out)"],
    ]  # fmt: skip
    # the pack's longest run (3600 s, at batch size 128) is not among those selected, and still is the pack's time
    assert cells(section(report.markdown, "Time estimates").split("\n\n")[2])[1:] == [
        ["resnet20", "cifar10", "step-200", "64", "pack of 4", "1", "48.0", "60.0", "1.25", "90"],
        ["resnet32", "cifar10", "step-200", "64", "fused 2", "1", "30.0", "30.0", "1.00", "60"],
    ]
    older = collect(results, where=["model=resnet44"], plots=False, report=False)  # no allocation recorded
    assert cells(first_table(section(older.markdown, "Device-hours")))[2] == [
        "the runs selected (--where)", "1", *["– (1 run left out)"] * 3
    ]  # fmt: skip


def test_time_estimates_are_measured_over_tasks_per_kind_of_estimate(write_records):
    alone = lambda model, wall, estimate, source, **fields: {
        "model": model, "alloc_gpus": 1, "alloc_cpus": 4, "wall_seconds": wall, "estimated_s": estimate,
        "time_limit_s": 2700, "estimate_source": f"{source}: detail", **fields,
    }  # fmt: skip
    budget = {"alloc_gpus": 1, "alloc_cpus": 8, "estimate_source": "records: 2 epochs; 3 records on cpu"}
    rows = [
        {**row, "wall_seconds": wall}
        for row, wall in zip(
            shared([{"model": "resnet20", "seed": s} for s in (0, 1)], estimated_s=2400.0, time_limit_s=5400, **budget),
            (3000.0, 3600.0),
        )
    ]  # measured / estimated: 3600 / 2400 = 1.5
    rows += shared(
        [{"model": "resnet32", "seed": s} for s in (0, 1, 2)],
        fuse_size=3, wall_seconds=1800.0, estimated_s=1800.0, time_limit_s=3600, **budget,
    )  # fmt: skip
    rows[-1] = {**rows[-1], "status": "failed", "error": "diverged"}  # the group is still one task, measured 1.0
    rows += [
        alone("resnet44", 600.0, 1200.0, "records"),  # 0.5
        alone("resnet56", 1800.0, 1500.0, "bench"),  # 1.2
        alone("resnet110", None, 1000.0, "prior"),  # no wall-clock time, as before record/5
        alone("resnet18", 9000.0, 1000.0, "prior", status="failed", error="boom"),  # no completed run
        {"model": "resnet34", "alloc_gpus": 1, "wall_seconds": 100.0},  # started by `cifarbench run`: no estimate
    ]
    runs = frame(write_records(rows))
    sources, per_configuration = time_estimate_parts(runs)
    assert sources.header == ["estimate from", "tasks", "median measured / estimated", "25th–75th percentile",
                              "min–max"]  # fmt: skip
    assert sources.body == [
        ["records", "3", "1.00", "0.75–1.25", "0.50–1.50"],
        ["bench", "1", "1.20", "1.20–1.20", "1.20–1.20"],
    ]
    assert sources.notes[1] == "Left out: 1 task with an estimate but no wall-clock time (records before record/5)."
    assert [row[4:] for row in per_configuration.body] == [
        ["pack of 2", "1", "40.0", "60.0", "1.50", "90"],
        ["fused 3", "1", "30.0", "30.0", "1.00", "60"],
        ["alone", "1", "20.0", "10.0", "0.50", "45"],
        ["alone", "1", "25.0", "30.0", "1.20", "45"],
    ]
    assert [row[0] for row in per_configuration.body] == ["resnet20", "resnet32", "resnet44", "resnet56"]
    assert time_estimate_parts(runs[runs.model.eq("resnet34")]) == []


def test_recipe_labels():
    full = {"recipe": "step-200", "recipe_epochs": 200, "epochs": 200, "milestones": "60,120,160"}
    assert recipe_label(full) == "step-200" and recipe_label({"recipe": "step-200"}) == "step-200"
    assert recipe_label({**full, "epochs": 2, "milestones": "1,1,2"}) == SHORT
    assert recipe_label({**full, "recipe": "cos-200", "epochs": 20, "milestones": ""}) == "cos-200, 20 of 200 epochs"
    longer = recipe_label({**full, "epochs": 400, "milestones": "120,240,320"})
    assert longer == "step-200, 400 epochs instead of 200, milestones 120,240,320"
    assert title({"recipe": "step-200", "batch_size": 64}, full) == "step-200 bs=64"
    assert title({"recipe": "step-200", "batch_size": 64}, {**full, "epochs": 2, "milestones": "1,1,2"}) == (
        f"{SHORT} bs=64"
    )
    assert title({"model": "resnet56", "dataset": "cifar100"}, {**full, "epochs": 2}) == "ResNet56 CIFAR100"


def test_plot_titles_name_a_shortened_recipe_and_keep_a_full_length_ones(write_records):
    results = write_records(
        [{"model": m, "seed": s, "epochs": e} for m in ("resnet20", "resnet32") for s in (0, 1) for e in (2, None)]
    )
    found = read_records(results)
    table = with_curves(results, found.table, range(found.table.num_rows))
    runs = to_frame(table)
    summary, config = summarize(runs)
    tabs = default_tables(summary)
    done = runs.assign(config=config)
    figures = dict(c for c in (curves(done, t) for t in tabs) if c)
    slug = "step-200_2_of_200_epochs_milestones_1_1_2"
    per_epoch = "Test accuracy per epoch: {} bs=64{} (mean, band ± 1 std over seeds)"
    # wrapped to the width of the figure's one panel
    assert max(len(line) for fig in figures.values() for line in fig.get_suptitle().splitlines()) <= 66
    assert {name: fig.get_suptitle().replace("\n", " ") for name, fig in figures.items()} == {
        f"curves_{slug}_bs=64.png": per_epoch.format(SHORT, ""),
        "curves_step-200_bs=64_epochs=200.png": per_epoch.format("step-200", " epochs=200"),
    }
    by_size = "Final test accuracy against model size: cifar10, {} (mean and 95% confidence interval over seeds)"
    assert {name: fig.get_suptitle() for name, fig in sizes(summary)} == {
        "size_cifar10_step-200.png": by_size.format("step-200"),
        f"size_cifar10_{slug}.png": by_size.format(SHORT),
    }


def test_cli_collect(write_records, tmp_path, capsys):
    results = write_records(seed_rows())
    assert cli.main(["collect", str(results), "--no-plots", "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert EXPECTED_STEP200 in out and EXPECTED_RESNET56 in out
    assert f"wrote {tmp_path / 'out' / 'tables.md'}" in err and ".png" not in err


def test_cli_collect_with_a_grid_lists_runs_never_submitted(write_records, tmp_path, capsys):
    results = write_records([{"model": "resnet20", "final_test_acc": 0.91}])
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20, resnet32]\ndatasets: [cifar10]\nopts: [step-200]\nbatch_sizes: [64]\n"
        f"seeds: [0]\nresults: {results}\n"
    )
    assert cli.main(["collect", str(results), "--grid", str(grid), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"- not submitted: `{run_id(model='resnet32')}` (resnet32 cifar10 step-200 bs=64 seed=0)" in out


# What collect meets on a laptop: a macOS Python has no os.sched_getaffinity. The lock module (fcntl) is for
# training jobs; collect must not need it.
WITHOUT_AFFINITY = """
import os, sys
del os.sched_getaffinity
from cifarbench.cli import main
code = main(sys.argv[1:])
assert "cifarbench.store.locks" not in sys.modules, "collect imported the training jobs' locks"
sys.exit(code)
"""


def test_collect_works_without_sched_getaffinity_as_on_macos(write_records, tmp_path):
    results = write_records(seed_rows())
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_AFFINITY, "collect", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert EXPECTED_STEP200 in done.stdout and EXPECTED_RESNET56 in done.stdout
    assert (out / "tables.md").read_text() == done.stdout and list((out / "plots").glob("*.png"))


@pytest.mark.parametrize("target", ["missing", "a-file"])
def test_cli_collect_rejects_a_path_that_is_not_a_folder(tmp_path, capsys, target):
    path = tmp_path / target
    if target == "a-file":
        path.write_text("not a folder")
    assert cli.main(["collect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and str(path) in err
