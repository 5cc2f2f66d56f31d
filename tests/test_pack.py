"""Packing: ``pack: K`` trains K runs at once in one array task. The grid's checks, the plan, the status of a
packed run, and on the real local SLURM cluster: one array of packed tasks whose records equal the same runs trained
alone, a task on two GPUs whose workers get one each, a requeued packed task, a worker killed inside one, and the
same on the local executor."""

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster import status
from cifarbench.config.grid import load_grid, parse_grid
from cifarbench.config.resources import STOPPED, Packing
from cifarbench.config.spec import RunSpec
from cifarbench.store import records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.store.progress import read_progress
from cifarbench.train import data
from cifarbench.train.pack import gpu_shares, shares, visible_gpus, worker_env

AXES = "models: [resnet20]\ndatasets: [synthetic10]\nopts: [step-160]\nbatch_sizes: [64]\n"
METRICS = ("final_test_acc", "final_test_loss", "final_train_loss", "test_acc", "train_loss", "epochs_done")


# --- the grid, the plan, the status: no cluster --------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        ("pack: 0", "pack: must be an integer >= 1, got 0"),
        ("pack: -1", "pack: must be an integer >= 1, got -1"),
        ("pack: two", "pack: must be an integer >= 1, got 'two'"),
        ("pack: 8", "pack: 8 runs per task, but the grid has only 4 runs with these resources; set pack to at most 4"),
        ("slurm: {pack: 2}\npack: 2", "pack: set both here and in slurm; keep one"),
        ("pack: 4\nslurm: {gpus_per_node: 0, cpus_per_task: 2}", ": pack: 4 runs on 2 CPUs leaves some run"),
        ("resources: [{match: {seed: 0}, pack: 2}]", "pack: 2 runs per task, but the grid has only 1 run"),
        ("include: [{seed: 7, pack: 0}]", "include[0].pack: must be an integer >= 1, got 0"),
        ("mps: sometimes", "mps: must be one of auto, on, off, got 'sometimes'"),
    ],
    ids=["zero", "negative", "word", "larger-than-grid", "twice", "cpus", "rule", "include", "mps"],
)
def test_bad_pack_is_one_line_exit_2(tmp_path, monkeypatch, capsys, lines, message):
    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"{AXES}seeds: [0, 1, 2, 3]\n{lines}\nresults: {tmp_path / 'results'}\n")
    assert main(["submit", str(grid), "--executor", "local", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"cifarbench: error: {grid}: ") and message in captured.err, captured.err
    assert not (tmp_path / "results").exists()


def test_pack_is_set_at_the_top_in_a_rule_or_in_an_include_and_never_changes_run_ids():
    alone = parse_grid(f"{AXES}seeds: [0, 1, 2, 3]\n")
    packed = parse_grid(f"{AXES}seeds: [0, 1, 2, 3]\npack: 2\nmps: off\n")
    assert [s.run_id for s in packed.specs] == [s.run_id for s in alone.specs]
    assert {(r.pack, r.mps) for r in packed.resources.values()} == {(2, "off")}
    assert {r.pack for r in alone.resources.values()} == {1}
    ruled = parse_grid(f"{AXES}seeds: [0, 1, 2]\nresources: [{{match: {{seed: [1, 2]}}, pack: 2}}]\n")
    assert [ruled.resources[s.run_id].pack for s in ruled.specs] == [1, 2, 2]
    included = parse_grid(f"{AXES}seeds: [0]\ninclude: [{{seed: 1, pack: 2}}, {{seed: 2, slurm: {{pack: 2}}}}]\n")
    assert [included.resources[s.run_id].pack for s in included.specs] == [1, 2, 2]
    assert parse_grid(f"{AXES}seeds: [0, 1]\npack: 2\nmps: on\n").resources[alone.specs[0].run_id].mps == "on"


def test_dry_run_counts_packed_tasks_and_says_when_the_last_is_smaller(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cifarbench.system.local_gpus", lambda: 1)  # a local plan is this machine's: one GPU
    monkeypatch.setattr("cifarbench.system.usable_cores", lambda: 4)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"{AXES}seeds: [0, 1, 2, 3, 4]\npack: 2\nslurm: {{gpus_per_node: 1, time: '01:00:00'}}\n"
        f"results: {tmp_path / 'results'}\n"
    )
    assert main(["submit", str(grid), "--executor", "local", "--dry-run", "--no-preflight"]) == 0
    out = capsys.readouterr().out
    assert "group 1: 3 tasks holding 5 runs (packed 2 per task), 1 GPU, 4 CPUs, this machine;" in out
    assert "reserved 3.0 GPU-h" in out  # 3 allocations of 1 GPU for 1 hour, the last holding one run
    assert "note: group 1 has a task of 1 run, not 2: the runs of its resources do not divide into packs of 2" in out


def test_threads_and_cores_are_shared_out_evenly():
    assert shares(2, 4, [0, 1, 2, 3]) == (2, [[0, 1], [2, 3]])
    assert shares(3, 4, [0, 1, 2, 3]) == (1, [[0], [1], [2]])
    assert shares(4, 2, [0, 1]) == (1, None)  # more runs than cores: threads only
    assert shares(2, 8, [0, 1, 2, 3]) == (4, None)  # SLURM's count says 8, the process may use 4


def test_workers_get_the_allocations_gpus_round_robin():
    assert gpu_shares(8, ["0", "1", "2", "3"]) == ["0", "1", "2", "3", "0", "1", "2", "3"]
    assert gpu_shares(3, ["0", "1"]) == ["0", "1", "0"]  # more workers than GPUs, not a multiple
    assert gpu_shares(2, ["GPU-a1", "GPU-b2"]) == ["GPU-a1", "GPU-b2"]  # names kept as SLURM gave them
    assert gpu_shares(3, []) == [None, None, None]  # no GPU: the workers keep the job's environment


@pytest.mark.parametrize(
    "visible, expected",
    [("2,3", ["2", "3"]), (" 0 , 1 ", ["0", "1"]), ("GPU-a1,GPU-b2", ["GPU-a1", "GPU-b2"]), ("-1", []), ("", [])],
    ids=["slurm", "spaces", "uuids", "hidden", "empty"],
)
def test_the_jobs_gpus_are_those_cuda_visible_devices_names(monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr("cifarbench.train.pack.local_gpus", lambda: 8)  # never asked while the variable is set
    assert visible_gpus() == expected


def test_without_cuda_visible_devices_the_jobs_gpus_are_numbered_from_0(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("cifarbench.train.pack.local_gpus", lambda: 2)
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setattr("cifarbench.train.pack.local_gpus", lambda: 0)
    assert visible_gpus() == []


def test_a_workers_own_gpu_overrides_the_jobs_and_the_mps_client_variables_stay():
    job = {"CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/usr/bin", "SLURM_JOB_ID": "7"}
    mps = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/j/mps-pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/j/mps-log"}
    env = worker_env(job, mps, "1")
    assert env == {**job, **mps, "CUDA_VISIBLE_DEVICES": "1", "PYTHONUNBUFFERED": "1"}
    assert job["CUDA_VISIBLE_DEVICES"] == "0,1"  # the job's own environment is left as it was
    assert worker_env(job, {}, None) == {**job, "PYTHONUNBUFFERED": "1"}  # no GPU to give: the job's stays
    assert worker_env({}, {}, "0") == {"CUDA_VISIBLE_DEVICES": "0", "PYTHONUNBUFFERED": "1"}


def test_the_record_says_who_shared_the_device():
    packing = Packing(runs=("a", "b", "c"), mps="on")
    assert packing.to_dict("b", on_gpu=True) == {"pack_size": 3, "packed_with": ["a", "c"], "mps": "on"}
    assert packing.to_dict("b", on_gpu=False)["mps"] is None  # CPUs split, no GPU shared
    assert Packing().to_dict("a", on_gpu=True) == {"pack_size": 1, "packed_with": [], "mps": None}
    assert {"pack_size", "packed_with", "mps"} <= set(records.SCHEMA.names)


def test_status_shows_a_packed_run_that_failed_while_its_task_goes_on():
    submitted = datetime(2026, 1, 1, tzinfo=timezone.utc)
    entry = {"executor": "slurm", "submitted_at": submitted.isoformat(), "packed_with": ["other"]}
    later = submitted + timedelta(minutes=5)

    def failed(error):
        return {"status": "failed", "ended_at": later, "error": error}

    state = dict(entry=entry, job_state="RUNNING", alive=None, now=later)
    assert status.classify(record=failed("WorkerKilled: killed by SIGKILL"), **state) == "failed"
    # stopped by its job (time limit, requeue): it resumes, so it is still the job's
    assert status.classify(record=failed(f"{STOPPED}: stopped by its job (SIGTERM)"), **state) == "running"
    assert status.classify(record=None, **state) == "running"
    alone = {**entry, "packed_with": []}
    assert status.classify(record=failed("ValueError: x"), **{**state, "entry": alone}) == "running"
    # a fused member that diverged: its group trains on without it
    fused = {"executor": "slurm", "submitted_at": submitted.isoformat(), "fused_with": ["other"]}
    diverged = failed("Diverged: training loss nan in epoch 3")
    assert status.classify(record=diverged, **{**state, "entry": fused}) == "failed"


def test_a_stopped_worker_records_the_error_status_knows():
    from cifarbench.train.pack import Stopped

    assert Stopped.__name__ == STOPPED


# --- on the real local SLURM cluster -------------------------------------------------------------------------------


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "UP" in out.stdout


GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
epochs: {epochs}
batch_sizes: [64]
seeds: {seeds}
precision: 32-true
deterministic: true
root: {root}
results: {results}
pack: 2
slurm:
  gpus_per_node: {gpus}
  cpus_per_task: 2
  time: "00:10:00"
  max_requeues: 3
"""


def _grid(base: Path, *, epochs: int, seeds: list[int], gpus: int = 0) -> tuple[Path, Path, list[RunSpec]]:
    data.write_synthetic("synthetic10", base / "data", train_size=256, test_size=64)
    grid, results = base / "grid.yaml", base / "results"
    grid.write_text(GRID.format(epochs=epochs, seeds=seeds, root=base / "data", results=results, gpus=gpus))
    return grid, results, list(load_grid(grid, fingerprint=fingerprint).specs)  # as submit names the runs


def _reference(specs: list[RunSpec], results: Path) -> subprocess.Popen:
    """The runs trained alone, one after another in a process of one thread: a packed run's share."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from cifarbench.config.spec import RunSpec; from cifarbench.train.fit import fit\n"
        "for d in json.loads(sys.argv[1]): fit(RunSpec.from_dict(d))"
    )
    alone = [dataclasses.replace(s, results=str(results)).to_dict() for s in specs]
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(alone)], stdout=subprocess.DEVNULL)


def _record(results: Path, spec: RunSpec) -> dict | None:
    return records.read_record(Layout(results).record(spec.run_id))


def _wait(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T %M %R"], capture_output=True, text=True)
            pytest.fail(f"no {what} after {timeout:.0f} s; squeue:\n{queue.stdout}")
        time.sleep(2)
    return value


def _completed(results: Path, specs: list[RunSpec]):
    return lambda: all((r := _record(results, s)) and r["status"] == "completed" for s in specs)


def _submit(grid: Path, *args: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["submit", str(grid), *args]) == 0
    return out.getvalue()


def _manifests(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "submissions").glob("*.json"))]


def _cancel(results: Path) -> None:
    jobs = {e["array_job_id"] for m in _manifests(results) for e in m["runs"]} if results.is_dir() else set()
    if jobs:
        subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)


def _same_as_alone(results: Path, reference: Path, specs: list[RunSpec]) -> None:
    for spec in specs:
        ours, alone = _record(results, spec), _record(reference, spec)
        assert alone is not None and alone["status"] == "completed"
        assert {k: ours[k] for k in METRICS} == {k: alone[k] for k in METRICS}, spec.run_id


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster")
def test_four_runs_packed_two_per_task_are_one_array_and_equal_the_runs_alone(tmp_path, capsys):
    # on 2 GPUs per task: the node's GPUs are fake (SLURM grants them and sets CUDA_VISIBLE_DEVICES, torch trains on
    # the CPU), and each worker of a task gets one of its own
    grid, results, specs = _grid(tmp_path, epochs=2, seeds=[0, 1, 2, 3], gpus=2)
    reference = _reference(specs, tmp_path / "alone")
    try:
        out = _submit(grid)
        assert "group 1: 2 tasks holding 4 runs (packed 2 per task)" in out and "; 1 array;" in out
        [manifest] = _manifests(results)
        job = manifest["runs"][0]["array_job_id"]
        assert f"submitted 4 runs (slurm) as job {job}\n" in out  # one sbatch: one array
        tasks = [(e["job_id"], e["array_index"], e["pack_size"]) for e in manifest["runs"]]
        assert tasks == [(f"{job}_0", 0, 2), (f"{job}_0", 0, 2), (f"{job}_1", 1, 2), (f"{job}_1", 1, 2)]
        _wait("4 completed records", _completed(results, specs), timeout=600)
    finally:
        _cancel(results)
    assert reference.wait(timeout=300) == 0
    _same_as_alone(results, tmp_path / "alone", specs)
    for i, spec in enumerate(specs):
        record = _record(results, spec)
        partner = specs[i ^ 1].run_id
        assert (record["pack_size"], record["packed_with"], record["mps"]) == (2, [partner], None)
        assert record["slurm_array_task_id"] == str(i // 2)
        assert (record["alloc_gpus"], record["alloc_cpus"]) == (2, 2)
        # its own worker process's peak; the GPUs are fake, so none trained
        assert record["peak_host_mb"] > 50 and record["peak_device_mb"] is None
    assert main(["status", str(results), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == {"completed": 4}
    for entry in manifest["runs"][::2]:
        log = Path(entry["stdout"]).read_text()
        first, second = (s.run_id for s in specs if s.run_id in (entry["run_id"], *entry["packed_with"]))
        assert "GPUs 0,1 round robin" in log, log
        assert f"[{first}] CUDA_VISIBLE_DEVICES=0" in log and f"[{second}] CUDA_VISIBLE_DEVICES=1" in log, log
        assert f"[{first}] epoch 2/2 " in log and f"[{second}] epoch 2/2 " in log


def _queued(job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=60).stdout.strip())


def _worker_pid(spec: RunSpec) -> int | None:
    """The worker process training ``spec`` inside a packed task."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cifarbench.train.pack" in args and len(args) >= 2:
            try:
                task = json.loads(args[-2] or args[-1])
            except ValueError:
                continue
            if RunSpec.from_dict(task["spec"]).run_id == spec.run_id:
                return int(proc.name)
    return None


def _training(results: Path, specs: list[RunSpec], job: str):
    """Whether every run of a packed task has a checkpoint while the task runs."""

    def check():
        running = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
        epochs = [(read_progress(results, s.run_id) or {}).get("epochs_done", 0) for s in specs]
        return running.stdout.split() == ["RUNNING"] and min(epochs) >= 1

    return check


@pytest.mark.extended
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster")
def test_a_requeued_packed_task_resumes_both_runs(tmp_path):
    epochs = 12
    grid, results, specs = _grid(tmp_path, epochs=epochs, seeds=[0, 1])
    reference = _reference(specs, tmp_path / "alone")
    try:
        _submit(grid)
        job = _manifests(results)[0]["runs"][0]["job_id"]
        _wait("both runs training with a checkpoint", _training(results, specs, job), timeout=300)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        _wait("2 completed records", _completed(results, specs), timeout=600)
    finally:
        _cancel(results)
    assert reference.wait(timeout=300) == 0
    _same_as_alone(results, tmp_path / "alone", specs)
    log = Path(_manifests(results)[0]["runs"][0]["stdout"]).read_text()
    for spec in specs:
        record = _record(results, spec)
        assert record["attempts"] >= 2 and len(record["test_acc"]) == epochs
        assert log.count(f"[{spec.run_id}] epoch 1/{epochs} ") == 1  # resumed from its checkpoint, not restarted


@pytest.mark.extended
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster")
def test_the_preemption_signal_stops_the_workers_and_requeues_the_packed_task(tmp_path):
    # USR2 is what SLURM sends ahead of a time limit or a preemption (--signal=USR2@60); sent by hand it comes
    # once both runs have a checkpoint, whatever the machine's speed
    epochs = 12
    grid, results, specs = _grid(tmp_path, epochs=epochs, seeds=[0, 1])
    reference = _reference(specs, tmp_path / "alone")
    try:
        _submit(grid)
        entry = _manifests(results)[0]["runs"][0]
        _wait("both runs training with a checkpoint", _training(results, specs, entry["job_id"]), timeout=300)
        subprocess.run(["scancel", "--signal=USR2", entry["job_id"]], check=True, timeout=60)
        _wait("2 completed records", _completed(results, specs), timeout=600)
    finally:
        _cancel(results)
    assert reference.wait(timeout=300) == 0
    _same_as_alone(results, tmp_path / "alone", specs)
    err = Path(entry["stderr"]).read_text()
    assert "Caught signal SIGUSR2" in err and "Requeued job" in Path(entry["stdout"]).read_text() + err
    log = Path(entry["stdout"]).read_text()
    for spec in specs:
        record = _record(results, spec)
        assert record["attempts"] >= 2 and len(record["test_acc"]) == epochs
        assert record["packed_with"] == [s.run_id for s in specs if s is not spec]
        assert log.count(f"[{spec.run_id}] epoch 1/{epochs} ") == 1
        assert f"[{spec.run_id}] stopped by its job (SIGTERM)" in err


@pytest.mark.extended
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster")
def test_a_killed_worker_fails_alone_and_retry_failed_resubmits_only_it(tmp_path):
    grid, results, specs = _grid(tmp_path, epochs=10, seeds=[0, 1])
    killed, other = specs
    reference = _reference(specs, tmp_path / "alone")
    try:
        _submit(grid)
        job = _manifests(results)[0]["runs"][0]["job_id"]
        _wait("both runs training with a checkpoint", _training(results, specs, job), timeout=300)
        os.kill(_wait("the worker's process", lambda: _worker_pid(killed), timeout=30), signal.SIGKILL)
        record = _wait("the killed run's record", lambda: (r := _record(results, killed)) and r, timeout=120)
        states = {s.run_id: s.status for s in status.collect_status(str(results), specs)}
        assert record["status"] == "failed" and record["error"].startswith("WorkerKilled: "), record["error"]
        assert "SIGKILL" in record["error"] and record["epochs_done"] >= 1
        assert record["peak_host_mb"] is None and record["wall_seconds"] is None  # measured by the process killed
        assert states[killed.run_id] == "failed" and states[other.run_id] in ("running", "completed"), states
        _wait("the other run completed", _completed(results, [other]), timeout=300)

        out = _submit(grid, "--retry-failed")
        assert "2 runs; 1 already completed, 0 pending or running, 0 not failed; 1 to submit" in out, out
        retry = _manifests(results)[-1]["runs"]
        assert [e["run_id"] for e in retry] == [killed.run_id]
        _wait("the retried run completed", _completed(results, [killed]), timeout=300)
    finally:
        _cancel(results)
    assert reference.wait(timeout=300) == 0
    _same_as_alone(results, tmp_path / "alone", specs)
    assert _record(results, killed)["attempts"] == 2  # resumed from the checkpoint it had when killed


@pytest.mark.extended
@pytest.mark.slow
def test_local_execution_packs_the_same_way(tmp_path, monkeypatch):
    grid, results, specs = _grid(tmp_path, epochs=2, seeds=[0, 1])
    monkeypatch.setattr("cifarbench.cluster.submit.usable_cores", lambda: 2)  # one thread each, as the reference
    reference = _reference(specs, tmp_path / "alone")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["submit", str(grid), "--executor", "local", "--wait"]) == 0
    assert "completed: 2" in out.getvalue()
    [manifest] = _manifests(results)
    assert len({e["job_id"] for e in manifest["runs"]}) == 1 and {e["pack_size"] for e in manifest["runs"]} == {2}
    assert reference.wait(timeout=300) == 0
    _same_as_alone(results, tmp_path / "alone", specs)
    assert [_record(results, s)["packed_with"] for s in specs] == [[specs[1].run_id], [specs[0].run_id]]
