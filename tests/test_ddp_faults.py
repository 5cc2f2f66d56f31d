"""Faults of a run on several processes (DDP, one SLURM task per rank): only rank 0 takes the run's lock and the
other ranks follow its decision; a killed rank fails the run with a record that names it, never a hang; a
requeued run resumes on every rank from the same checkpoint and ends as an uninterrupted one; a completed run
submitted again costs nothing.

The protocol's pieces are tested here on files; the faults themselves on the real local cluster (2 tasks on 1
node, gloo on CPU, ``bash slurm/cluster.sh up``), with submitit as ``cifarbench submit`` uses it."""

import dataclasses
import fcntl
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import record_row

from cifarbench.config.resources import Budget
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.errors import UsageError
from cifarbench.store import records
from cifarbench.store.layout import Layout
from cifarbench.store.progress import read_progress
from cifarbench.train import data, ranks
from cifarbench.train.job import RunJob, run_one

# Small steps, so that the numbers compare the code and not float32 chaos (as tests/test_fuse.py's GENTLE)
GENTLE = dataclasses.replace(get_recipe("step-200"), name="gentle", lr=0.002)
TIMEOUT_S = 20  # CIFARBENCH_DDP_TIMEOUT_S in the jobs: a hang becomes a failure within it


def _spec(root, results, **kw) -> RunSpec:
    fields = dict(
        model="resnet20",
        dataset="synthetic10",
        recipe=GENTLE,
        batch_size=64,
        seed=0,
        epochs=4,
        precision="32-true",
        deterministic=True,
        data_root=str(root),
        results=str(results),
        gpus_per_run=2,
    )
    return RunSpec(**{**fields, **kw})


# --- the protocol, on files ----------------------------------------------------------------------------------------


def test_the_error_names_every_rank_in_the_order_they_failed_and_the_silent_ones_last():
    said = ranks.failure(4, {1: "DataError: no data", 0: "RuntimeError: Connection closed by peer"})
    assert said == (
        "4 ranks: rank 1: DataError: no data; rank 0: RuntimeError: Connection closed by peer; "
        "rank 2 wrote no error (killed, or still blocked); rank 3 wrote no error (killed, or still blocked)"
    )
    assert (
        ranks.failure(2, {0: "x" * 1000})
        == f"2 ranks: rank 0: {'x' * 200}; rank 1 wrote no error (killed, or still blocked)"
    )


def test_rank_errors_are_one_line_each_in_the_order_written(tmp_path):
    ranks.report_error(tmp_path, 1, "RuntimeError: first\n  second line")
    os.utime(tmp_path / "rank-1.error", (1, 1))  # written before rank 0's, whatever the clock's resolution
    ranks.report_error(tmp_path, 0, "RuntimeError: later")
    (tmp_path / "rank-x.error").write_text("not a rank")
    assert ranks.rank_errors(tmp_path) == {1: "RuntimeError: first second line", 0: "RuntimeError: later"}
    assert list(ranks.rank_errors(tmp_path)) == [1, 0]
    assert ranks.rank_errors(tmp_path / "none") == {}


def test_the_other_ranks_wait_while_rank_0_waits_for_the_lock_and_follow_its_decision(tmp_path):
    ranks.begin(tmp_path / "a")

    def rank_0():
        with ranks.waiting(tmp_path / "a", timeout=0.8):
            time.sleep(2)  # longer than the timeout: the renewed file keeps the others waiting
        ranks.decide(tmp_path / "a", train=False)

    threading.Thread(target=rank_0).start()
    assert ranks.await_decision(tmp_path / "a", timeout=0.8) is False
    ranks.decide(tmp_path / "a", train=True)
    assert ranks.await_decision(tmp_path / "a", timeout=0.8) is True


def test_a_rank_0_that_never_decides_fails_the_others_within_the_timeout(tmp_path):
    with pytest.raises(TimeoutError, match="rank 0 did not start the run within 1 s"):
        ranks.await_decision(tmp_path, timeout=1)
    (tmp_path / ranks.START).write_text(ranks.WAITING)
    os.utime(tmp_path / ranks.START, (1, 1))  # a waiting rank 0 that stopped renewing: it died
    with pytest.raises(TimeoutError):
        ranks.await_decision(tmp_path, timeout=1)


def test_a_new_attempt_clears_the_earlier_attempts_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    folder = ranks.attempt_dir(tmp_path, "run")
    assert folder == Layout(tmp_path).run_dir("run") / "ranks" / "7.1"
    ranks.report_error(folder.with_name("7.0"), 1, "Cancelled")
    ranks.begin(folder)
    assert [p.name for p in folder.parent.iterdir()] == ["7.1"] and not any(folder.iterdir())


def test_the_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(ranks.TIMEOUT_ENV, raising=False)
    assert ranks.collective_timeout_s() == ranks.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(ranks.TIMEOUT_ENV, "2.5")
    assert ranks.collective_timeout_s() == 2.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(ranks.TIMEOUT_ENV, bad)
        with pytest.raises(UsageError, match=f"{ranks.TIMEOUT_ENV}='{bad}' is not a number of seconds above 0"):
            ranks.collective_timeout_s()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_completed_run_costs_no_rank_anything(rank, tmp_path, monkeypatch):
    spec = _spec(tmp_path / "no-data", tmp_path / "results")
    records.write_record(record_row(run_id=spec.run_id), spec.results)
    monkeypatch.setenv("SLURM_PROCID", rank)
    assert run_one(spec) == str(Layout(spec.results).record(spec.run_id))  # no data read, no process group
    assert not Layout(spec.results).lock(spec.run_id).exists()
    assert not (Layout(spec.results).run_dir(spec.run_id) / "ranks").exists()


# --- on the real cluster -------------------------------------------------------------------------------------------


def _cluster_problem() -> str | None:
    if not all(shutil.which(tool) for tool in ("sbatch", "sacct", "scontrol")):
        return "SLURM is not installed (no sbatch/sacct/scontrol on the PATH)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the SLURM cluster is not answering ({e})"
    return None if "UP" in ping.stdout else "the SLURM cluster is not answering; `bash slurm/cluster.sh up`"


cluster = pytest.mark.skipif(bool(problem := _cluster_problem()), reason=problem or "")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """synthetic10 with 256 training and 64 test images: 4 steps of 64 an epoch, 2 of 32 on each of 2 ranks."""
    root = tmp_path_factory.mktemp("tiny")
    data.write_synthetic("synthetic10", root, train_size=256, test_size=64)
    return root


def _submit(spec: RunSpec, folder: Path):
    """One 2-task job of ``spec``, as ``cifarbench submit`` asks SLURM for a 2-device run."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(
        tasks_per_node=spec.gpus_per_run,
        nodes=spec.nodes,
        cpus_per_task=1,
        gpus_per_node=0,
        timeout_min=10,
        slurm_signal_delay_s=60,
        slurm_setup=[f"export {ranks.TIMEOUT_ENV}={TIMEOUT_S}", "export OMP_NUM_THREADS=1"],
    )
    return executor.submit(RunJob(spec, Budget()))


def _wait(what: str, check, job, timeout: float):
    """Poll ``check()`` twice a second until it returns something true; fail with the job's logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(job.paths.folder.glob("*_log.*")))
            pytest.fail(f"no {what} after {timeout:.0f} s (job {job.job_id}: {job.state})\n{logs}")
        time.sleep(0.5)
    return value


def _ended(job) -> str | None:
    """The job's state once SLURM's accounting says it ended."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job.job_id], capture_output=True, text=True)
    states = out.stdout.split()
    return states[-1] if states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") else None


def _task_pid(job_id: str, rank: int) -> int | None:
    """The process of the job's task ``rank``: the python process whose environment says so (SLURM_PROCID)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = command.split(b"\0")
        # the batch script and srun have SLURM_PROCID=0 too; the task is the python process srun started
        if want <= environ and Path(argv[0].decode()).name.startswith("python") and b"submitit.core._submit" in argv:
            return int(entry.name)
    return None


def _lock_free(spec: RunSpec) -> bool:
    with open(Layout(spec.results).lock(spec.run_id), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def _record(spec: RunSpec) -> dict | None:
    return records.read_record(Layout(spec.results).record(spec.run_id))


@cluster
@pytest.mark.slurm
@pytest.mark.parametrize("killed", [1, pytest.param(0, marks=pytest.mark.extended)])
def test_a_killed_rank_fails_the_run_with_a_record_that_names_it(killed, tiny_root, tmp_path):
    spec = _spec(tiny_root, tmp_path / "results", epochs=200)  # far more than it gets to train
    job = _submit(spec, tmp_path / "logs")
    try:
        _wait("first epoch", lambda: (read_progress(spec.results, spec.run_id) or {}).get("epochs_done"), job, 120)
        pid = _wait(f"rank {killed}'s process", lambda: _task_pid(job.job_id, killed), job, 10)
        os.kill(pid, signal.SIGKILL)
        # the record is written on the way out (by rank 0, or where rank 0 is the one killed, by rank 1 once rank 0
        # has not answered within the timeout): read once the job ended
        assert _wait("the job's end", lambda: _ended(job), job, 4 * TIMEOUT_S) == "FAILED"
        record = _record(spec)
        assert record["status"] == "failed" and 1 <= record["epochs_done"] < 200
        assert record["error"].startswith(f"2 ranks: rank {1 - killed}: RuntimeError: ")  # its collective failed
        assert record["error"].endswith(f"rank {killed} wrote no error (killed, or still blocked)")
        assert _lock_free(spec)
    finally:
        job.cancel(check=False)


@pytest.fixture(scope="module")
def uninterrupted(tiny_root, tmp_path_factory):
    """A 2-rank run trained straight through on the cluster (queued at once: the tests that compare with it run
    meanwhile, one job at a time on the 2 CPUs)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    spec = _spec(tiny_root, base / "results", epochs=6)
    job = _submit(spec, base / "logs")
    yield spec, job
    job.cancel(check=False)


@cluster
@pytest.mark.slurm
@pytest.mark.extended
@pytest.mark.parametrize("how", ["scontrol requeue", "time-limit signal"])
def test_a_requeued_run_resumes_on_every_rank_and_equals_an_uninterrupted_one(how, uninterrupted, tmp_path):
    reference, reference_job = uninterrupted
    spec = dataclasses.replace(reference, results=str(tmp_path / "results"))
    job = _submit(spec, tmp_path / "logs")
    try:
        _wait("a checkpoint", lambda: Layout(spec.results).checkpoint(spec.run_id).is_file(), job, 300)
        if how == "scontrol requeue":  # SIGTERM to every task, then the job queues again
            subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=60)
        else:  # USR2, as SLURM signals every task ahead of the time limit; submitit's rank 0 requeues the job
            subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=60)
        done = _wait("completed record", lambda: (r := _record(spec)) and r["status"] == "completed" and r, job, 300)
        expected = _wait(
            "the uninterrupted run's record",
            lambda: (r := _record(reference)) and r["status"] == "completed" and r,
            reference_job,
            300,
        )
        assert done["attempts"] == 2 and expected["attempts"] == 1
        for key in ("train_loss", "test_loss", "test_acc"):
            assert done[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        assert _lock_free(spec)
    finally:
        job.cancel(check=False)


@cluster
@pytest.mark.slurm
@pytest.mark.extended
def test_a_completed_run_submitted_again_costs_no_training_and_ends(uninterrupted, tmp_path):
    spec, first = uninterrupted
    before = _wait(
        "the uninterrupted run's record", lambda: (r := _record(spec)) and r["status"] == "completed" and r, first, 300
    )
    job = _submit(spec, tmp_path / "logs")
    assert _wait("the job's end", lambda: _ended(job), job, 120) == "COMPLETED"
    assert _record(spec) == before  # untouched
    logs = [p.read_text() for p in job.paths.folder.glob("*_log.out")]
    assert len(logs) == 2 and all("already completed; nothing to do" in log for log in logs)
