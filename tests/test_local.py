"""Local execution (no SLURM): the same submission path, manifest and records, one run at a time per device."""

import json

import pytest

from cifarbench.cli import main
from cifarbench.cluster import status
from cifarbench.config.grid import load_grid
from cifarbench.store import records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout


def _grid(tmp_path, root, seeds="[0, 1]"):
    path = tmp_path / "grid.yaml"
    path.write_text(f"""
models: [resnet20]
datasets: [synthetic10]
opts: [cos-200]
epochs: 1
batch_sizes: [128]
seeds: {seeds}
precision: 32-true
deterministic: true
root: {root}
results: {tmp_path / "results"}
""")
    return path


def test_local_submit_wait_status_and_resubmit(synthetic_root, tmp_path, capsys):
    grid = _grid(tmp_path, synthetic_root)
    assert main(["submit", str(grid), "--executor", "local", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "2 to submit" in out and "submitted 2 runs (local)" in out and "completed: 2" in out
    results = tmp_path / "results"
    manifests = list((results / "submissions").glob("*.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["executor"] == "local" and len({e["job_id"] for e in manifest["runs"]}) == 1
    specs = list(load_grid(grid, fingerprint=fingerprint).specs)
    for spec in specs:
        assert records.read_record(Layout(results).record(spec.run_id))["status"] == "completed"

    assert main(["status", str(results), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == {"completed": 2}

    # a finished grid submits nothing; a grown grid submits only the new run
    assert main(["submit", str(grid), "--executor", "local"]) == 0
    assert "2 already completed" in capsys.readouterr().out and len(list((results / "submissions").glob("*.json"))) == 1
    grown = _grid(tmp_path, synthetic_root, seeds="[0, 1, 2]")
    assert main(["submit", str(grown), "--dry-run", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "1 to submit" in out and out.count("skip (completed)") == 2
    assert main(["status", str(results), "--grid", str(grown)]) == 0
    assert "not submitted: 1" in capsys.readouterr().out


def test_status_of_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_wait_counts_a_failed_run_as_ended(synthetic_root, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
models: [resnet20]
datasets: [synthetic100]
opts: [cos-200]
epochs: 1
batch_sizes: [64]
root: {tmp_path / "no-data-here"}
results: {tmp_path / "results"}
""")
    # the data exists only on "compute nodes": the preflight is skipped, and the job fails with a record
    assert main(["submit", str(grid), "--executor", "local", "--wait", "--no-preflight"]) == 1
    out = capsys.readouterr().out
    assert "failed: 1" in out and "DataError: dataset synthetic100 not found" in out
    [run] = status.collect_status(str(tmp_path / "results"))
    assert run.status == "failed" and run.log and run.log.endswith(".err")


@pytest.mark.extended  # CI keeps test_local_submit_wait_status_and_resubmit (0) and the failed run (1)
def test_wait_exits_0_only_when_every_run_of_the_grid_completed(write_records, tmp_path, capsys):
    results = write_records([{"seed": 0}, {"seed": 1}])  # resnet20 cifar10 step-200 bs 64, completed

    def grid(seeds: str):
        path = tmp_path / "grid.yaml"
        path.write_text(
            f"models: [resnet20]\ndatasets: [cifar10]\nopts: [step-200]\nbatch_sizes: [64]\nseeds: {seeds}\n"
            f"root: {tmp_path / 'no-data-here'}\nresults: {results}\n"
        )
        return str(path)

    # nothing to submit, everything completed: 0 at once
    assert main(["submit", grid("[0, 1]"), "--executor", "local", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "2 already completed" in out and "submitted" not in out and "completed: 2" in out
    # one run more, which fails (its data is missing): the grid's runs have ended, not all completed, so 1
    assert main(["submit", grid("[0, 1, 2]"), "--executor", "local", "--wait", "--no-preflight"]) == 1
    out = capsys.readouterr().out
    assert "1 to submit" in out and "completed: 2" in out and "failed: 1" in out
