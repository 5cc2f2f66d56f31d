"""The SLURM paths on the real local cluster (``bash slurm/cluster.sh up``): a grid as one sbatch of one array,
requeue and resume, the time-limit signal, cancel and ``--retry-failed``, resubmission, and bad input that never
reaches the queue.

The cluster has two CPUs, so the scenarios share one four-task array (two tasks at a time), each task with its
own part to play. The array's tests run in file order, a few minutes in all; each also works alone.
"""

import io
import json
import re
import shutil
import subprocess
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster import queue, status
from cifarbench.config.grid import load_grid
from cifarbench.config.spec import RunSpec
from cifarbench.store import records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import read_manifests
from cifarbench.store.progress import read_progress
from cifarbench.train import data

pytestmark = pytest.mark.slurm


def _cluster_problem() -> str | None:
    if not all(shutil.which(tool) for tool in ("sinfo", "sbatch", "sacct", "scontrol")):
        return "SLURM is not installed (no sinfo/sbatch/sacct/scontrol on the PATH)"
    try:
        sinfo = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the SLURM cluster is not answering ({e}); start it with `bash slurm/cluster.sh up`"
    if sinfo.returncode != 0 or "UP" not in ping.stdout:
        said = " ".join((sinfo.stderr + ping.stdout + ping.stderr).split())
        return f"the SLURM cluster is not answering ({said}); start it with `bash slurm/cluster.sh up`"
    return None


_PROBLEM = _cluster_problem()
if _PROBLEM:
    pytest.skip(_PROBLEM, allow_module_level=True)

# Task 0 must outlive its first attempt. slurmctld checks time limits every 30 s and sends USR2 up to 30 s early,
# so with the 2-minute limit and submit.SIGNAL_DELAY_S = 60 the signal comes 30-60 s after the start, which
# leaves at most ~26 epochs at ~2 s each (one thread, 500 images) after ~8 s of start-up: 35 need two attempts,
# or three. On a busy machine epochs are slower and it takes more; max_requeues leaves room for that.
LONG_EPOCHS = 35
REQUEUED_EPOCHS = 40  # long enough to requeue it after its first checkpoint, well before it ends
GRID = """\
# index 0: outlives the time limit; 1: requeued by hand; 2: cancelled, then retried; 3: runs straight through
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: [0]
epochs: {long}
include:
  - {{seed: 1, epochs: {requeued}}}
  - {{seed: 2, epochs: 2}}
  - {{seed: 3, epochs: 2}}
precision: 32-true
root: {root}
results: {results}
slurm:
  gpus_per_node: 1
  cpus_per_task: 1
  time: "00:02:00"
  array_parallelism: 2
  max_requeues: 10
  setup: ["export OMP_NUM_THREADS=1"]
"""


# --- talking to SLURM ----------------------------------------------------------------------------------------------


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _jobs_from(folder, *, queued_only: bool = False) -> set[str]:
    """Every job (``123_4`` for an array task) sbatch'ed from a file under ``folder``: queued, or also ended."""
    lines = _out("squeue", "-h", "-r", "-o", "%i|%o").splitlines()  # %o: the sbatch script
    if not queued_only:
        lines += _out("sacct", "-n", "-P", "-X", "-S", "now-1days", "-o", "JobID,SubmitLine").splitlines()
    jobs = set()
    for line in lines:
        job, _, how = line.partition("|")
        if f"{folder}/" in how:
            jobs.update(queue.expand_job_id(job))
    return jobs


def _history(job: str) -> list[str]:
    """The states of every attempt of one job, first to last (requeued attempts included)."""
    out = _out("sacct", "-n", "-P", "-X", "-D", "-o", "State", "-j", job)
    return [line.split()[0] for line in out.splitlines() if line.strip()]  # "CANCELLED by 0" -> "CANCELLED"


def _ended(job: str) -> list[str] | None:
    """The job's history once its last attempt has ended in sacct (the record is written a moment before)."""
    history = _history(job)
    return history if history and history[-1] not in queue.ACTIVE_STATES else None


def _manifests(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "submissions").glob("*.json"))]


@dataclass
class Array:
    grid: Path
    results: Path
    specs: list[RunSpec]  # by array index
    manifest: dict
    output: str  # what `cifarbench submit` printed

    @property
    def job(self) -> str:
        return self.manifest["runs"][0]["array_job_id"]

    def statuses(self) -> dict[str, status.RunStatus]:
        return {s.run_id: s for s in status.collect_status(str(self.results), self.specs)}

    def record(self, index: int) -> dict | None:
        return records.read_record(Layout(self.results).record(self.specs[index].run_id))

    def wait(self, what: str, check, timeout: float):
        """Poll ``check()`` every 2 s until it returns something true; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                queue = _out("squeue", "-h", "-r", "-o", "%i %T %M %R")
                pytest.fail(
                    f"no {what} after {timeout:.0f} s\n{status.render(list(self.statuses().values()))}\n"
                    f"squeue:\n{queue}"
                )
            time.sleep(2)
        return value


@pytest.fixture(scope="module")
def array(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    data.write_synthetic("synthetic10", base / "data", train_size=500, test_size=100)
    grid, results = base / "grid.yaml", base / "results"
    grid.write_text(GRID.format(long=LONG_EPOCHS, requeued=REQUEUED_EPOCHS, root=base / "data", results=results))
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            assert main(["submit", str(grid)]) == 0
        [manifest] = _manifests(results)
        yield Array(
            grid=grid,
            results=results,
            specs=list(load_grid(grid, fingerprint=fingerprint).specs),
            manifest=manifest,
            output=out.getvalue(),
        )
    finally:
        jobs = {r["array_job_id"] for m in _manifests(results) for r in m["runs"]} if results.is_dir() else set()
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)


# --- one array, four parts -----------------------------------------------------------------------------------------


def test_a_grid_is_one_sbatch_of_one_array(array):
    assert "4 runs; 0 already completed, 0 pending or running; 4 to submit" in array.output
    assert f"submitted 4 runs (slurm) as job {array.job}\n" in array.output
    entries = array.manifest["runs"]
    assert [e["run_id"] for e in entries] == [s.run_id for s in array.specs]
    assert [(e["job_id"], e["array_job_id"], e["array_index"]) for e in entries] == [
        (f"{array.job}_{i}", array.job, i) for i in range(4)
    ]
    tasks = {f"{array.job}_{i}" for i in range(4)}

    def accounted() -> list[str]:
        listed = _out("sacct", "-n", "-P", "-X", "-j", array.job, "-o", "JobID,SubmitLine").splitlines()
        return {j for line in listed for j in queue.expand_job_id(line.partition("|")[0])} == tasks and listed

    # sacct shows the four tasks as one array from one submission line (one sbatch), and nothing else was
    # ever sbatch'ed from this results folder
    listed = array.wait("array in sacct", accounted, timeout=30)
    assert len({line.partition("|")[2] for line in listed}) == 1
    assert _jobs_from(array.results) == tasks


def test_cancelled_task_shows_cancelled_and_retry_failed_resubmits_only_it(array, capsys):
    spec, job = array.specs[2], f"{array.job}_2"
    # tasks 0 and 1 hold the array's two slots for a while yet
    assert _out("squeue", "-h", "-j", job, "-o", "%T").split() == ["PENDING"]
    subprocess.run(["scancel", job], check=True, timeout=60)
    # a task cancelled before it started leaves no record in sacct: it only drops out of the array's pending line
    array.wait("cancelled status", lambda: array.statuses()[spec.run_id].status == "cancelled", timeout=60)
    assert main(["status", str(array.results)]) == 0
    assert "cancelled: 1" in capsys.readouterr().out

    assert main(["submit", str(array.grid), "--retry-failed"]) == 0
    out = capsys.readouterr().out
    # how many of the other three have finished by now depends on the machine's speed
    counts = re.search(r"4 runs; (\d) already completed, (\d) pending or running, 0 not failed; 1 to submit", out)
    assert counts and int(counts[1]) + int(counts[2]) == 3, out
    first, retry = _manifests(array.results)
    assert first == array.manifest
    [entry] = retry["runs"]
    assert entry["run_id"] == spec.run_id and entry["array_job_id"] != array.job
    assert f"submitted 1 run (slurm) as job {entry['array_job_id']}\n" in out
    # the retry's completion is checked with the others, in test_every_run_completes_...


def test_status_of_a_running_run_has_an_eta_that_shrinks_as_epochs_complete(array):
    spec = array.specs[0]  # the long one: many epochs to watch
    seen: list[tuple[status.RunStatus, str]] = []  # the run, and what `status` printed then

    def three_epochs_watched():
        statuses = array.statuses()
        s = statuses[spec.run_id]
        if s.status == "running" and s.epochs_done and (not seen or s.epochs_done != seen[-1][0].epochs_done):
            seen.append((s, status.render(list(statuses.values()))))
        return len(seen) >= 3 or (s.status == "completed" and seen)

    array.wait("three epochs of task 0 seen running", three_epochs_watched, timeout=300)
    for s, text in seen:
        assert s.eta_s is not None and s.elapsed_s is not None and s.epoch_s and 0 <= s.test_acc <= 1, s
        assert "ETA of the runs left: about" in text and f"test acc {s.test_acc:.4f}" in text, text
    left = [s.epochs - s.epochs_done for s, _ in seen]
    assert left == sorted(left, reverse=True) and len(set(left)) == len(left)


def test_requeued_task_resumes_from_its_checkpoint(array):
    spec, job = array.specs[1], f"{array.job}_1"
    # On a loaded machine the task may also meet its time limit and be requeued by submitit; then it is briefly
    # not RUNNING and `scontrol requeue` is refused: wait for it to run again (bounded) and retry.
    for _ in range(5):
        array.wait(
            "task 1 running with a checkpoint",
            lambda: (
                (read_progress(spec.results, spec.run_id) or {}).get("epochs_done", 0) >= 1
                and _out("squeue", "-h", "-j", job, "-o", "%T").split() == ["RUNNING"]
            ),
            timeout=240,
        )
        if subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=60).returncode == 0:
            break
    else:
        pytest.fail("scontrol requeue was refused 5 times")
    record = array.wait(
        "completed record of task 1", lambda: (r := array.record(1)) and r["status"] == "completed" and r, timeout=360
    )
    assert record["attempts"] >= 2 and record["epochs_done"] == REQUEUED_EPOCHS
    assert len(record["test_acc"]) == REQUEUED_EPOCHS  # the history was resumed, not restarted or repeated
    assert (record["slurm_job_id"], record["slurm_array_task_id"]) == (array.job, "1")
    history = array.wait("accounting of task 1's end", lambda: _ended(job), timeout=60)
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED"
    log = Path(array.manifest["runs"][1]["stdout"]).read_text()
    assert log.count(f"] epoch 1/{REQUEUED_EPOCHS} ") == 1  # the second attempt went on from its checkpoint


def test_time_limit_signal_requeues_and_the_run_completes(array):
    seen = set()

    def completed():
        seen.add(array.statuses()[array.specs[0].run_id].status)
        return (r := array.record(0)) and r["status"] == "completed" and r

    record = array.wait("completed record of task 0", completed, timeout=600)
    # between attempts the run has a failed record (the signalled attempt's SystemExit), yet it is requeued
    assert seen <= {"pending", "running", "completed"}, seen
    assert record["attempts"] >= 2 and record["epochs_done"] == LONG_EPOCHS == len(record["test_acc"])
    # each attempt but the last was ended by USR2 ahead of the limit (not by the limit: no TIMEOUT), and requeued
    timeouts = record["attempts"] - 1
    log = Path(array.manifest["runs"][0]["stderr"]).read_text()
    assert log.count("Caught signal SIGUSR2 on ") == timeouts
    history = array.wait("accounting of task 0's end", lambda: _ended(f"{array.job}_0"), timeout=60)
    if history[-1] == "FAILED":
        # The last attempt can finish within a second of the next USR2, which then reaches the process as it
        # exits after success: SLURM counts the signal, the record (above) is complete all the same.
        out = Path(array.manifest["runs"][0]["stdout"]).read_text()
        assert "Exiting after successful completion" in out and log.rstrip().endswith("User defined signal 2"), log
        history[-1] = "COMPLETED"
    assert history == ["REQUEUED"] * timeouts + ["COMPLETED"]


def test_every_run_completes_and_resubmitting_submits_nothing(array, capsys):
    statuses = array.wait(
        "end of every run",
        lambda: (s := array.statuses()) and all(r.status in status.ENDED for r in s.values()) and s,
        timeout=600,
    )
    assert {r.status for r in statuses.values()} == {"completed"}, status.render(list(statuses.values()))
    latest = read_manifests(array.results)
    for index, spec in enumerate(array.specs):
        record = array.record(index)
        assert record["status"] == "completed" and record["epochs_done"] == spec.schedule.epochs
        assert record["slurm_job_id"] == latest[spec.run_id]["array_job_id"]  # the retry's job for task 2
    assert main(["status", str(array.results), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == {"completed": 4}

    # a job leaves the queue a moment after its run's record is written
    array.wait("empty queue", lambda: not _jobs_from(array.results, queued_only=True), timeout=60)
    manifests, jobs = _manifests(array.results), _jobs_from(array.results)
    assert main(["submit", str(array.grid)]) == 0
    out = capsys.readouterr().out
    assert "4 runs; 4 already completed, 0 pending or running; 0 to submit" in out and "submitted" not in out
    assert _manifests(array.results) == manifests
    assert _jobs_from(array.results) == jobs and _jobs_from(array.results, queued_only=True) == set()


# --- bad input never reaches the queue -----------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_collect_queues_a_collect_job_that_starts_after_the_array(tmp_path):
    data.write_synthetic("synthetic10", tmp_path / "data", train_size=200, test_size=100)
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: [0, 1]
epochs: 1
precision: 32-true
root: {tmp_path / "data"}
results: {tmp_path / "results"}
slurm: {{gpus_per_node: 0, cpus_per_task: 1, time: "00:05:00", setup: ["export OMP_NUM_THREADS=1"]}}
""")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["submit", str(grid), "--collect"]) == 0
    [manifest] = _manifests(tmp_path / "results")
    array = manifest["runs"][0]["array_job_id"]
    collect_job = re.search(r"collect: job (\d+) ", out.getvalue())
    try:
        assert collect_job, out.getvalue()
        job = collect_job.group(1)
        [script] = Layout(tmp_path / "results").logs.glob("collect-*.sh")
        assert _out("squeue", "-h", "-j", job, "-o", "%o").strip() in (str(script), ""), script  # "": already ended
        shown = _out("scontrol", "show", "job", job)
        # queued behind the array (or, on a fast machine, already released: the array then ended first)
        assert f"Dependency=afterany:{array}" in shown or "Dependency=(null)" in shown, shown
        layout = Layout(tmp_path / "results")
        deadline = time.monotonic() + 900  # the shared cluster may run other jobs first
        while not (layout.report.exists() and _ended(job)):
            assert time.monotonic() < deadline, _out("squeue", "-h", "-r", "-o", "%i %T %M %R")
            time.sleep(2)
    finally:
        subprocess.run(["scancel", array, *(collect_job.groups() if collect_job else ())], timeout=60)
    assert _history(job) == ["COMPLETED"]
    ends = _out("sacct", "-n", "-P", "-X", "-o", "End", "-j", array).split()
    [start] = _out("sacct", "-n", "-P", "-X", "-o", "Start", "-j", job).split()
    assert len(ends) == 2 and start >= max(ends)  # ISO times: as strings, in time order
    assert layout.tables.exists() and "2 runs: 2 completed, 0 failed." in layout.report.read_text()
    assert "report.html" in layout.collect_log(job).read_text()  # collect's "wrote ..." lines


VALID = {
    "models": "[resnet20]",
    "datasets": "[synthetic10]",
    "opts": "[step-160]",
    "batch_sizes": "[64]",
    "slurm": '{time: "00:10:00", partition: debug}',
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"models": "[resnet21]"}, "models[0]: unknown model 'resnet21'"),
        ({"slurm": '{time: "00:75:00"}'}, "slurm.time: '00:75:00' is out of range"),
        ({"slurm": "{time: 1:00:00}"}, "slurm.time: got the bare number 3600"),
        ({"slurm": "{partition: 'debug;reboot'}"}, "slurm.partition: 'debug;reboot' contains ';'"),
        ({"models": "[resnet20"}, "invalid YAML"),
        ({"seeds": "[]"}, "seeds: must be a non-empty list"),
        (None, "cannot read the grid file"),
    ],
    ids=[
        "unknown-model",
        "time-out-of-range",
        "time-unquoted",
        "partition-metacharacter",
        "yaml-syntax",
        "empty-axis",
        "missing-file",
    ],
)
def test_bad_input_is_one_line_exit_2_and_submits_nothing(tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(tmp_path)  # the default results folder, ./results, lands here too
    grid = tmp_path / "grid.yaml"
    if change is not None:
        grid.write_text("".join(f"{k}: {v}\n" for k, v in {**VALID, **change}.items()) + f"results: {tmp_path}\n")
    before = _jobs_from(tmp_path)
    assert main(["submit", str(grid)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"cifarbench: error: {grid}: ") and message in captured.err
    assert before == _jobs_from(tmp_path) == set()
    assert not (tmp_path / "submissions").exists() and not (tmp_path / "results").exists()


def test_a_grid_far_beyond_max_array_size_is_chunked_not_refused(tmp_path):
    limit = queue.max_array_size()
    n = 2 * limit + 100  # three arrays: limit, limit, 100
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: {list(range(n))}
root: {tmp_path / "data"}
results: {tmp_path / "results"}
slurm: {{gpus_per_node: 0, cpus_per_task: 1, time: "00:05:00", array_parallelism: 1}}
""")
    out = io.StringIO()
    try:
        with redirect_stdout(out):  # no data: the runs are cancelled before any starts
            assert main(["submit", str(grid), "--no-preflight"]) == 0
    finally:
        manifests = list((tmp_path / "results" / "submissions").glob("*.json"))
        arrays = sorted({e["array_job_id"] for m in manifests for e in json.loads(m.read_text())["runs"]})
        if arrays:
            subprocess.run(["scancel", *arrays], timeout=60)
    assert f"{n} to submit" in out.getvalue()
    entries = json.loads(manifests[0].read_text())["runs"]
    sizes = sorted(sum(e["array_job_id"] == a for e in entries) for a in arrays)
    assert len(manifests) == 1 and len(entries) == n
    assert sizes == [100, limit, limit]
    assert max(e["array_index"] for e in entries) == limit - 1
