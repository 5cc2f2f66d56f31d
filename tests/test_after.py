"""submit --collect: the collect job's sbatch call (pure), and the local path end to end."""

import shlex
import time

import pytest

from cifarbench.cli import main
from cifarbench.cluster.after import collect_command, sbatch_command, script_text
from cifarbench.store.layout import Layout

GRID = """
models: [resnet20]
datasets: [synthetic10]
opts: [cos-200]
epochs: 1
batch_sizes: [128]
root: {root}
results: {results}
"""


def test_the_collect_job_waits_for_every_array_and_runs_in_the_grids_partition(tmp_path):
    command = collect_command(tmp_path / "results", str(tmp_path / "grid.yaml"))
    assert command[1:4] == ["-m", "cifarbench", "collect"] and command[-2:] == ["--grid", str(tmp_path / "grid.yaml")]
    args = sbatch_command(
        ["12", "13"],
        "/r/logs/collect-x.sh",
        log="/r/logs/collect-%j.out",
        resources={"partition": "gpu", "account": "lab", "qos": None, "setup": ["module load python"]},
    )
    assert "--dependency=afterany:12:13" in args and "--cpus-per-task=1" in args
    assert "--partition=gpu" in args and "--account=lab" in args and not any(a.startswith("--qos") for a in args)
    assert "--output=/r/logs/collect-%j.out" in args and "--parsable" in args
    # a script of its own, not --wrap: squeue -o %o names it, as it names the arrays' scripts
    assert args[-1] == "/r/logs/collect-x.sh" and "--wrap" not in args
    text = script_text(command, ["module load python"])
    assert text.splitlines() == ["#!/bin/bash", "module load python", "exec " + shlex.join(command)]
    assert not any("gpu" in a for a in args if a.startswith(("--gres", "--gpus")))  # one CPU, no GPU


@pytest.mark.slow
def test_local_submit_collect_writes_the_report_after_the_last_run(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    results = tmp_path / "results"
    # the data exists only on "compute nodes": the run fails at once in its job, leaving a record to collect
    grid.write_text(GRID.format(root=tmp_path / "no-data-here", results=results))
    assert main(["submit", str(grid), "--executor", "local", "--collect", "--no-preflight"]) == 0
    out = capsys.readouterr().out
    assert "collect: job " in out and "writes tables.md and report.html once job " in out
    layout = Layout(results)
    deadline = time.monotonic() + 300
    while not (layout.report.exists() and layout.tables.exists()):
        assert time.monotonic() < deadline, "no report.html after 5 minutes"
        time.sleep(1)
    [record] = layout.runs.glob("*/record.parquet")
    assert layout.report.stat().st_mtime >= record.stat().st_mtime  # collected after the run ended
    assert "1 run: 0 completed, 1 failed." in layout.tables.read_text()
    assert "DataError: dataset synthetic10 not found" in layout.report.read_text()
    [log] = layout.logs.glob("collect-local-*.out")
    assert "has ended: " in log.read_text()


def test_nothing_to_submit_queues_no_collect_job(write_records, tmp_path, capsys):
    results = write_records([{"dataset": "synthetic10", "recipe": "cos-200", "epochs": 1, "batch_size": 128}])
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(root=tmp_path / "data", results=results))
    assert main(["submit", str(grid), "--executor", "local", "--collect", "--no-preflight"]) == 0
    out = capsys.readouterr().out
    assert "1 already completed" in out and "collect: nothing was submitted, so no collect job was queued" in out
    assert not Layout(results).logs.exists()
