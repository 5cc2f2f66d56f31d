"""status while runs train: elapsed time, latest test accuracy and ETA of each running run, and of the grid; what
status --json says of every run; status of a folder without runs."""

import json
import os
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from cifarbench.cli import main
from cifarbench.cluster import status
from cifarbench.cluster.status import RunStatus, duration, grid_eta, progress_times
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.store.manifests import write_manifest
from cifarbench.store.progress import read_progress, write_progress


def spec(tmp_path, model="resnet20", seed=0, epochs=10) -> RunSpec:
    return RunSpec(
        model=model,
        dataset="synthetic10",
        recipe=get_recipe("step-200"),
        batch_size=64,
        seed=seed,
        epochs=epochs,
        results=str(tmp_path / "results"),
    )


def test_a_runs_times_from_its_progress_file(tmp_path):
    run = spec(tmp_path)
    write_progress(run.results, run.run_id, epochs_done=2, epochs=10, epoch_seconds=[12.0, 4.0], test_acc=0.31)
    progress = read_progress(run.results, run.run_id)
    times = progress_times(progress, progress["updated_at"] + 1.0)
    # the first epoch (warm-up) is left out of the pace; one second of the third epoch is spent
    assert times == {"elapsed_s": 17.0, "test_acc": 0.31, "epoch_s": 4.0, "eta_s": 8 * 4.0 - 1.0}
    assert progress_times(progress, progress["updated_at"] + 1000)["eta_s"] == 0.0  # late, not negative
    older = {"epochs_done": 2, "epochs": 10}  # a progress file of an earlier cifarbench
    assert progress_times(older, 0.0) == {"elapsed_s": None, "test_acc": None, "epoch_s": None, "eta_s": None}


def test_the_eta_never_grows_as_epochs_complete_at_a_steady_pace(tmp_path):
    run = spec(tmp_path)
    etas = []
    for done in range(1, 11):
        write_progress(run.results, run.run_id, epochs_done=done, epochs=10, epoch_seconds=[5.0] * done)
        progress = read_progress(run.results, run.run_id)
        etas.append(progress_times(progress, progress["updated_at"])["eta_s"])
    assert etas == sorted(etas, reverse=True) and etas[-1] == 0.0 and etas[0] == 45.0


def running(eta, epoch_s=10.0, done=5, epochs=10, job="7_0"):
    return RunStatus(
        run_id=f"r{job}", model="resnet20", dataset="cifar10", recipe="step-200", batch_size=64, seed=0,
        status="running", epochs_done=done, epochs=epochs, job_id=job, eta_s=eta, epoch_s=epoch_s,
        resources={"array_parallelism": 2},
    )  # fmt: skip


def test_the_grid_eta_shares_the_work_among_the_runs_running(tmp_path):
    pending = [
        RunStatus(run_id=f"p{i}", model="resnet20", dataset="cifar10", recipe="step-200", batch_size=64, seed=i,
                  status="pending", epochs=10, job_id=f"7_{i + 2}", resources={"array_parallelism": 2})
        for i in range(2)
    ]  # fmt: skip
    two = [running(50.0, job="7_0"), running(30.0, epoch_s=6.0, job="7_1")]
    eta = grid_eta(two + pending)
    # 50 + 30 s left of the running runs, two pending runs of 10 epochs at the mean 8 s, two at a time
    assert eta == {"eta_s": (50 + 30 + 2 * 10 * 8.0) / 2, "run_epochs_left": 5 + 5 + 20, "epoch_s": 8.0, "parallel": 2}
    # never before the slowest running run ends: (500 + 10 + 200) / 2 < 500
    assert grid_eta([running(500.0), running(10.0, job="7_1"), *pending])["eta_s"] == 500.0
    waiting = [RunStatus(**{**p.__dict__, "epoch_s": 10.0}) for p in pending]
    assert grid_eta(waiting)["parallel"] == 2  # none running: the array's %limit runs them
    assert grid_eta(pending) is None  # no epoch time known yet
    assert grid_eta([]) is None


@pytest.mark.parametrize(
    "seconds, text", [(5, "5s"), (125, "2m05s"), (3 * 3600 + 300, "3h05m"), (2 * 86400 + 4 * 3600, "2d04h")]
)
def test_durations(seconds, text):
    assert duration(seconds) == text


def test_status_shows_a_running_runs_progress(tmp_path):
    """A local job (this test's own process stands for it: alive) with a progress file is running."""
    run = spec(tmp_path)
    entry = {
        "run_id": run.run_id,
        "job_id": str(os.getpid()),
        "array_job_id": str(os.getpid()),
        "array_index": 0,
        "stdout": str(tmp_path / "out"),
        "stderr": str(tmp_path / "err"),
        "spec": run.to_dict(),
    }
    write_manifest(run.results, "local", None, [entry])
    write_progress(run.results, run.run_id, epochs_done=3, epochs=10, epoch_seconds=[9.0, 3.0, 3.0], test_acc=0.4567)
    (found,) = status.collect_status(run.results)
    assert found.status == "running" and found.epochs_done == 3
    assert found.test_acc == 0.4567 and found.epoch_s == 3.0 and 0 <= found.eta_s <= 21.0
    text = status.render([found])
    assert "test acc 0.4567" in text and "ETA " in text and "(3s/epoch)" in text
    assert "ETA of the runs left: about" in text and "7 run-epochs at 3s each, 1 at a time" in text
    assert status.as_json([found])["eta"]["run_epochs_left"] == 7


def test_status_json_has_each_runs_budget_and_a_completed_runs_test_acc(write_records, tmp_path, capsys):
    results = tmp_path / "results"
    done, running = (
        RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-200"), batch_size=64, seed=seed)
        for seed in (0, 1)
    )
    budget = {"time_limit_s": 5400, "estimated_s": 3000.0, "estimate_source": "records: 2 epochs; 3 records on cpu"}
    gone = subprocess.Popen(["true"])  # the completed run's job has ended; the running one's is this process
    gone.wait()
    entries = [
        {"run_id": run.run_id, "job_id": job, "array_job_id": job, "array_index": 0, "stdout": str(tmp_path / "out"),
         "stderr": str(tmp_path / "err"), "spec": run.to_dict(), "budget": budget}
        for run, job in ((done, str(gone.pid)), (running, str(os.getpid())))
    ]  # fmt: skip
    write_manifest(results, "local", None, entries)
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    write_records([{"model": "resnet20", "seed": 0, "final_test_acc": 0.8123, "ended_at": later}], results=results)
    write_progress(results, running.run_id, epochs_done=3, epochs=200, epoch_seconds=[9.0, 3.0, 3.0], test_acc=0.4567)

    assert main(["status", str(results), "--json"]) == 0
    runs = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs[done.run_id]["status"] == "completed" and runs[done.run_id]["test_acc"] == 0.8123
    assert runs[running.run_id]["status"] == "running" and runs[running.run_id]["test_acc"] == 0.4567
    assert runs[done.run_id]["budget"] == runs[running.run_id]["budget"] == budget
    assert main(["status", str(results)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(done.run_id))
    assert "completed" in line and line.endswith("test acc 0.8123")


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_status_of_a_folder_without_runs_says_so_in_one_line_as_collect_does(tmp_path, capsys, json_flag):
    assert main(["status", str(tmp_path), *json_flag]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"cifarbench: error: {status.no_runs(tmp_path)}"
    assert "no submitted runs found" in err
    assert main(["collect", str(tmp_path)]) == 2  # collect on the same folder: the same exit code, one line
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "no cifarbench records found" in err
