"""A run whose job SLURM killed for its memory: recognised from sacct's state or the job's log (recorded text), shown
failed with why, and given the failed record that no process of the job lived to write.

The end-to-end check on the real cluster is in test_slurm_resources.py."""

from datetime import datetime, timezone
from pathlib import Path

import pytest

from cifarbench.cluster import queue, status
from cifarbench.cluster.status import memory_error, memory_killed, memory_record
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.store import records
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import write_manifest
from cifarbench.store.progress import write_progress

RECORDED = Path(__file__).parent / "recorded"
# jobacct_gather's OverMemoryKill (no cgroups) on the local cluster: a submitit job's srun step, and a batch step
STEP = (RECORDED / "job-log-overmemorykill-step.txt").read_text()
BATCH = (RECORDED / "job-log-overmemorykill-batch.txt").read_text()
# the OOM killer of a task/cgroup job, as SLURM 21.08 on (and before, "oom-kill event(s)") words it
CGROUP = (
    "slurmstepd: error: Detected 1 oom_kill event in StepId=440575.0. Some of the step tasks have been OOM Killed.\n"
    "srun: error: nid001277: tasks 1-3: Out Of Memory\n"
    "srun: Terminating StepId=440575.0\n"
)
CGROUP_OLD = (
    "slurmstepd: error: Detected 1 oom-kill event(s) in step 3495064.0 cgroup. Some of your processes may have been "
    "killed by the cgroup out-of-memory handler.\n"
)
TRACEBACK = """\
Traceback (most recent call last):
  File "/work/main/cifarbench/train/fit.py", line 300, in fit
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.25 GiB
"""


@pytest.mark.parametrize("log", [STEP, BATCH, CGROUP, CGROUP_OLD], ids=["step", "batch", "cgroup", "cgroup-old"])
def test_slurms_memory_kill_lines_are_recognised(log):
    assert memory_killed("FAILED", log) and memory_killed(None, log)


def test_other_endings_are_not_memory_kills():
    cancelled = "slurmstepd-vm: error: *** JOB 384 ON vm CANCELLED AT 2026-12-03T18:31:53 ***\n"
    timeout = "slurmstepd-vm: error: *** JOB 12 ON vm CANCELLED AT 2026-12-03T18:31:53 DUE TO TIME LIMIT ***\n"
    # the training process's own words are not SLURM's: a CUDA OOM leaves a record of its own
    for log in ("", cancelled, timeout, TRACEBACK, "print('Exceeded job memory limit')\n"):
        assert not memory_killed("FAILED", log), log
    assert memory_killed("OUT_OF_MEMORY", "")  # a cgroup's OOM killer, said by sacct


def test_the_error_says_what_the_job_asked_for_in_one_line():
    assert memory_error({"mem_gb": 2}) == (
        "OutOfMemory: SLURM killed the job for exceeding its memory (asked 2 GB: --mem=2048M); raise slurm.mem_gb, "
        "or use mem_gb: auto"
    )
    assert "(asked 0.5 GB: --mem=512M)" in memory_error({"mem_gb": 0.5})
    assert "(no --mem: the partition's default memory)" in memory_error({"mem_gb": None})
    assert "\n" not in memory_error(None)


def _run(tmp_path, seed=0) -> RunSpec:
    # the spec record_row writes for the same seed: the same run id
    return RunSpec(
        model="resnet20",
        dataset="cifar10",
        recipe=get_recipe("step-200"),
        batch_size=64,
        seed=seed,
        results=str(tmp_path / "results"),
    )


def test_the_record_is_the_runs_spec_its_job_and_how_far_it_got(tmp_path):
    run = _run(tmp_path)
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    entry = {"job_id": "123_4", "spec": run.to_dict(), "resources": {"mem_gb": 0.5}}
    row = memory_record(entry, epochs_done=3, now=now)
    assert row == {
        **records.spec_fields(run),
        "status": "failed",
        "error": memory_error({"mem_gb": 0.5}),
        "epochs_done": 3,
        "started_at": now,
        "ended_at": now,
        "slurm_job_id": "123",
        "slurm_array_task_id": "4",
    }
    assert records.to_table(row).num_rows == 1  # in the record schema
    alone = memory_record({**entry, "job_id": "123"}, epochs_done=0, now=now)
    assert (alone["slurm_job_id"], alone["slurm_array_task_id"]) == ("123", None)


@pytest.fixture
def killed(tmp_path, monkeypatch):
    """``killed(log, state="FAILED", seed=0) -> RunSpec``: a run submitted to SLURM as job 9001_<seed> (0.5 GB),
    whose log holds ``log`` and whose job sacct says ended in ``state`` (sacct itself is faked: the job ids are
    not this cluster's)."""
    states: dict[str, str] = {}
    monkeypatch.setattr(queue, "slurm_states", lambda jobs: {j: states[j] for j in jobs if j in states})

    def make(log: str | None, state: str = "FAILED", seed: int = 0) -> RunSpec:
        run = _run(tmp_path, seed)
        job = f"9001_{seed}"
        stderr = tmp_path / f"{job}.err"
        if log is not None:
            stderr.write_text(log)
        entry = {
            "run_id": run.run_id, "job_id": job, "array_job_id": "9001", "array_index": seed,
            "stdout": str(tmp_path / f"{job}.out"), "stderr": str(stderr), "spec": run.to_dict(),
            "resources": {"mem_gb": 0.5},
        }  # fmt: skip
        write_manifest(run.results, "slurm", None, [entry])
        states[job] = state
        return run

    return make


def test_status_shows_a_memory_killed_run_failed_and_writes_its_record_once(killed, monkeypatch):
    run = killed(STEP)
    write_progress(run.results, run.run_id, epochs_done=2, epochs=200)
    (found,) = status.collect_status(run.results)
    assert (found.status, found.error, found.epochs_done) == ("failed", memory_error({"mem_gb": 0.5}), 2)
    record = records.read_record(Layout(run.results).record(run.run_id))
    assert record["status"] == "failed" and record["error"] == found.error and record["epochs_done"] == 2
    assert (record["slurm_job_id"], record["slurm_array_task_id"], record["run_id"]) == ("9001", "0", run.run_id)

    def unread(log):
        raise AssertionError(f"read {log}: the record should have said it")

    monkeypatch.setattr(status, "_tail", unread)
    (again,) = status.collect_status(run.results)
    assert (again.status, again.error) == ("failed", found.error)
    assert status.state_map(run.results, [run]) == {run.run_id: "failed"}  # what --retry-failed retries


def test_a_memory_kill_replaces_an_earlier_attempts_failed_record(killed, write_records, tmp_path):
    write_records([{"status": "failed", "error": "ValueError: an earlier attempt"}], results=tmp_path / "results")
    run = killed(BATCH)
    (found,) = status.collect_status(run.results)
    assert found.status == "failed" and found.error.startswith("OutOfMemory: ")
    assert records.read_record(Layout(run.results).record(run.run_id))["error"] == found.error
    assert len(list(Layout(run.results).runs.iterdir())) == 1  # the earlier record was this run's, replaced


def test_sacct_out_of_memory_needs_no_log(killed):
    run = killed(None, state="OUT_OF_MEMORY")
    (found,) = status.collect_status(run.results)
    assert found.status == "failed" and "memory" in found.error and found.log is None


def test_a_completed_record_is_never_touched(killed, write_records, tmp_path):
    write_records([{"ended_at": datetime(2030, 1, 1, tzinfo=timezone.utc)}], results=tmp_path / "results")
    run = killed(STEP)
    before = Layout(run.results).record(run.run_id).read_bytes()
    (found,) = status.collect_status(run.results)
    assert found.status == "completed" and Layout(run.results).record(run.run_id).read_bytes() == before


def test_a_run_lost_for_another_reason_stays_lost_without_a_record(killed):
    run = killed("slurmstepd-vm: error: *** JOB 9001 ON vm CANCELLED AT 2026-12-03T18:31:53 DUE TO NODE FAILURE ***\n")
    (found,) = status.collect_status(run.results)
    assert found.status == "lost" and found.error is None
    assert not Layout(run.results).record(run.run_id).exists()
