"""Submission without a cluster: planning, job-state classification, sacct's array notation, the results-folder
check, and the sbatch file submitit writes for a grid's resources."""

import io
import os
import re
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from cifarbench.cli import main
from cifarbench.cluster import plan, queue, status, submit
from cifarbench.config.grid import parse_grid
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.errors import GridError, UsageError, plural

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def _specs(n: int) -> list[RunSpec]:
    return [
        RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-160"), batch_size=128, seed=s)
        for s in range(n)
    ]


# --- plan ----------------------------------------------------------------------------------------------------------

PLAN_STATES = ["completed", "failed", "lost", "cancelled", "pending", "running", "not submitted"]


def _plan(**flags):
    specs = _specs(len(PLAN_STATES))
    # "not submitted" is what a run missing from the map means
    states = {s.run_id: state for s, state in zip(specs, PLAN_STATES) if state != "not submitted"}
    p = plan.plan(specs, states, **flags)
    name = dict(zip((s.run_id for s in specs), PLAN_STATES))
    return {
        key: [name[s.run_id] for s in getattr(p, key)]
        for key in ("submit", "skipped_completed", "skipped_active", "skipped_other")
    }


def test_plan_skips_completed_and_active_runs():
    assert _plan() == {
        "submit": ["failed", "lost", "cancelled", "not submitted"],
        "skipped_completed": ["completed"],
        "skipped_active": ["pending", "running"],
        "skipped_other": [],
    }


def test_plan_force_reruns_completed_but_never_active_runs():
    assert _plan(force=True) == {
        "submit": ["completed", "failed", "lost", "cancelled", "not submitted"],
        "skipped_completed": [],
        "skipped_active": ["pending", "running"],
        "skipped_other": [],
    }


def test_plan_retry_failed_selects_failed_lost_and_cancelled_only():
    assert _plan(retry_failed=True) == {
        "submit": ["failed", "lost", "cancelled"],
        "skipped_completed": ["completed"],
        "skipped_active": ["pending", "running"],
        "skipped_other": ["not submitted"],
    }


def test_plan_keeps_the_grid_order():
    specs = _specs(5)
    states = {specs[1].run_id: "completed", specs[3].run_id: "running"}
    assert plan.plan(specs, states).submit == (specs[0], specs[2], specs[4])


def test_force_and_retry_failed_together_is_a_usage_error(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20]\ndatasets: [cifar10]\nopts: [step-160]\nbatch_sizes: [128]\n"
        f"results: {tmp_path / 'results'}\n"
    )
    assert main(["submit", str(grid), "--force", "--retry-failed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pick one" in err
    assert not (tmp_path / "results").exists()


def test_plural():
    assert [plural(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]


@pytest.mark.parametrize("seeds, runs", [("[0]", "1 run"), ("[0, 1]", "2 runs")])
def test_submit_says_1_run_and_2_runs(seeds, runs, tmp_path, synthetic_root, capsys, monkeypatch):
    monkeypatch.setattr("cifarbench.system.local_gpus", lambda: 0)  # local plans show this machine: say which
    monkeypatch.setattr("cifarbench.system.usable_cores", lambda: 1)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20]\ndatasets: [synthetic10]\nopts: [step-160]\nepochs: 1\nbatch_sizes: [64]\n"
        f"seeds: {seeds}\nroot: {synthetic_root}\nverify: false\nresults: {tmp_path / 'results'}\n"
        "slurm: {gpus_per_node: 0, cpus_per_task: 1}\n"
    )
    assert main(["submit", str(grid), "--dry-run", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert f"{grid}: {runs}; 0 already completed, 0 pending or running; {seeds.count(',') + 1} to submit" in out
    tasks = runs.replace("run", "task")
    assert f"group 1: {tasks} holding {runs} (one run each), 0 GPUs, 1 CPU, this machine;" in out
    assert f"total: {runs} in {tasks}, 1 group;" in out


def test_strict_refuses_a_time_limit_below_the_estimate(tmp_path, synthetic_root, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20]\ndatasets: [synthetic10]\nopts: [step-160]\nbatch_sizes: [64]\nseeds: [0]\n"
        f"root: {synthetic_root}\nverify: false\nresults: {tmp_path / 'results'}\n"
        "slurm: {gpus_per_node: 0, cpus_per_task: 1, time: '00:10:00'}\n"
    )
    assert main(["submit", str(grid), "--dry-run", "--executor", "local"]) == 0  # a warning: 160 epochs in 10 min
    assert "  warning: group 1's time 00:10:00 is below its longest task's estimate" in capsys.readouterr().out
    assert main(["submit", str(grid), "--executor", "local", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "group 1's time 00:10:00 is below" in err and "nothing was submitted (--strict" in err
    assert not (tmp_path / "results" / "submissions").exists()


@pytest.mark.parametrize("n, ended", [(1, "] 1/1 run ended  done 0"), (2, "] 2/2 runs ended  done 0")])
def test_the_wait_line_says_1_run_and_2_runs(tmp_path, n, ended):
    stream = io.StringIO()
    status.wait(tmp_path, _specs(n), stream=stream)  # never submitted: ended at once
    assert ended in stream.getvalue()


# --- classify ------------------------------------------------------------------------------------------------------

RECORDS = (None, "old", "fresh", "completed")  # absent; failed before the submission; failed after it; completed
SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "CANCELLED", "COMPLETED", None)  # None: sacct does not list it
AGES = {"recent": timedelta(seconds=status.GRACE_S - 1), "old": timedelta(seconds=status.GRACE_S + 1)}


def _classify(*, record, executor, state, age, alive=None):
    submitted = NOW - AGES[age]
    rows = {
        None: None,
        "old": {"status": "failed", "ended_at": submitted - timedelta(minutes=5)},
        "fresh": {"status": "failed", "ended_at": submitted + timedelta(seconds=1)},
        "completed": {"status": "completed", "ended_at": submitted + timedelta(seconds=1)},
    }
    entry = {"executor": executor, "submitted_at": submitted.isoformat()}
    return status.classify(record=rows[record], entry=entry, job_state=state, alive=alive, now=NOW)


def _expected_slurm(record, state, age):
    if record == "completed":
        return "completed"  # the record is the truth, whatever SLURM says
    if state in ("PENDING", "REQUEUED"):
        return "pending"  # REQUEUED: between two attempts, typically after a failed record was written
    if state == "RUNNING":
        return "running"
    if state == "CANCELLED":
        return "cancelled"
    if state is None and age == "recent" and record != "fresh":
        return "pending"  # sacct may not list a job in its first seconds
    return "lost" if record is None else "failed"  # the job ended without a completed record


@pytest.mark.parametrize("age", AGES)
@pytest.mark.parametrize("state", SLURM_STATES)
@pytest.mark.parametrize("record", RECORDS)
def test_classify_slurm(record, state, age):
    assert _classify(record=record, executor="slurm", state=state, age=age) == _expected_slurm(record, state, age)


def _expected_local(record, alive, state):
    if record == "completed":
        return "completed"
    if alive and record != "fresh":
        return "running" if state == "RUNNING" else "pending"
    return "failed" if record == "fresh" else "lost"  # a record older than the submission is not its outcome


# collect_status gives a local run RUNNING (alive, with progress) or None; the age of the submission does not matter
@pytest.mark.parametrize("age", AGES)
@pytest.mark.parametrize("state", ("RUNNING", None))
@pytest.mark.parametrize("alive", (True, False))
@pytest.mark.parametrize("record", RECORDS)
def test_classify_local(record, alive, state, age):
    got = _classify(record=record, executor="local", state=state, age=age, alive=alive)
    assert got == _expected_local(record, alive, state)


@pytest.mark.parametrize("state", ("CANCELLED", "CANCELLED by 0"))
def test_classify_cancelled_with_its_reason(state):
    assert _classify(record=None, executor="slurm", state=state, age="old") == "cancelled"


@pytest.mark.parametrize("state", ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"))
def test_classify_jobs_that_died_without_a_record_are_lost(state):
    assert _classify(record=None, executor="slurm", state=state, age="recent") == "lost"
    assert _classify(record="fresh", executor="slurm", state=state, age="recent") == "failed"


def test_classify_grace_window_edges():
    submitted = NOW - timedelta(seconds=status.GRACE_S)
    entry = {"executor": "slurm", "submitted_at": submitted.isoformat()}
    just_inside = status.classify(
        record=None, entry=entry, job_state=None, alive=None, now=NOW - timedelta(milliseconds=1)
    )
    assert (just_inside, status.classify(record=None, entry=entry, job_state=None, alive=None, now=NOW)) == (
        "pending",
        "lost",
    )


def test_classify_without_a_manifest_entry():
    assert status.classify(record=None, entry=None, job_state=None, alive=None) == "not submitted"
    assert status.classify(record={"status": "failed"}, entry=None, job_state=None, alive=None) == "failed"
    assert status.classify(record={"status": "completed"}, entry=None, job_state=None, alive=None) == "completed"


# --- sacct's array notation, chunks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job, ids",
    [
        ("12_[3-5,7%2]", ["12_3", "12_4", "12_5", "12_7"]),
        ("12_[0-3]", ["12_0", "12_1", "12_2", "12_3"]),
        ("12_[4]", ["12_4"]),
        ("12_[1,10-11%1]", ["12_1", "12_10", "12_11"]),
        ("12_4", ["12_4"]),
        ("12", ["12"]),
    ],
)
def test_expand_array_notation(job, ids):
    assert queue.expand_job_id(job) == ids


def test_chunks():
    assert plan.chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert plan.chunks(list(range(4)), 2) == [[0, 1], [2, 3]]
    assert plan.chunks(list(range(3)), 1001) == [[0, 1, 2]]
    assert plan.chunks([], 3) == []


# --- the results folder --------------------------------------------------------------------------------------------


def test_results_folder_is_created_and_left_clean(tmp_path):
    folder = tmp_path / "a" / "results"
    submit.check_results_writable(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_results_folder_that_is_a_file(tmp_path):
    (tmp_path / "results").write_text("")
    with pytest.raises(UsageError, match=r"results folder .*/results is a file; choose a folder"):
        submit.check_results_writable(tmp_path / "results")


# chmod does not stop root: a folder below a file and one in /proc cannot be made by anyone
@pytest.mark.parametrize("where", ("below a file", "in /proc"))
def test_results_folder_that_cannot_be_made(tmp_path, where):
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "results" if where == "below a file" else "/proc/cifarbench-results"
    with pytest.raises(UsageError, match=r"is not writable \(.+\); fix its permissions or choose another"):
        submit.check_results_writable(folder)


def test_results_folder_on_a_full_disk(tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    with pytest.raises(UsageError, match=r"has only \d+ MB free"):
        submit.check_results_writable(tmp_path, min_free_mb=free_mb + 10**9)


def test_results_folder_checked_without_being_made(tmp_path):
    submit.check_results_writable(tmp_path / "a" / "results", create=False)
    assert list(tmp_path.iterdir()) == []
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    with pytest.raises(UsageError, match=r"has only \d+ MB free"):
        submit.check_results_writable(tmp_path / "a" / "results", min_free_mb=free_mb + 10**9, create=False)


# the folders `submit` refuses (root writes through permission bits: a file, a folder below one, one in /proc)
@pytest.mark.parametrize("where", ("a file", "below a file", "in /proc"))
def test_a_dry_run_refuses_the_results_folders_that_submit_refuses(tmp_path, synthetic_root, capsys, where):
    (tmp_path / "file").write_text("mine")
    results = {"a file": tmp_path / "file", "below a file": tmp_path / "file" / "results"}.get(
        where, "/proc/cifarbench-results"
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20]\ndatasets: [synthetic10]\nopts: [step-160]\nepochs: 1\nbatch_sizes: [64]\nseeds: [0]\n"
        f"root: {synthetic_root}\nverify: false\nresults: {results}\nslurm: {{gpus_per_node: 0, cpus_per_task: 1}}\n"
    )
    before = sorted(tmp_path.rglob("*"))
    assert main(["submit", str(grid), "--executor", "local", "--dry-run"]) == 2
    dry = capsys.readouterr()
    assert main(["submit", str(grid), "--executor", "local"]) == 2
    real = capsys.readouterr().err
    assert dry.err == real and dry.err.count("\n") == 1 and f"results folder {results} is " in dry.err
    assert "submit  " not in dry.out  # no run listed as if it would be submitted
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "file").read_text() == "mine"


# --- the sbatch file -----------------------------------------------------------------------------------------------


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """submitit's SlurmExecutor refuses to exist without srun on the PATH. Building the sbatch text never runs it,
    so where SLURM is not installed an inert stand-in will do."""
    if shutil.which("srun") is None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def sbatch_text(resources: Resources, folder, runs: int) -> str:
    """The file submitit hands to sbatch for an array of ``runs`` tasks (as SlurmExecutor builds it for a batch)."""
    executor = submit._slurm_executor(resources, folder / "logs" / "%j")._executor
    return _make_sbatch_string(
        command="python -u -m submitit.core._submit logs", folder=executor.folder, map_count=runs, **executor.parameters
    )


def sbatch_options(text: str) -> dict[str, str | bool]:
    options = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            m = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(.+))?", line)
            assert m and m.group(1) not in options, line
            options[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return options


FULL = Resources(
    partition="gpu",
    account="proj1",
    qos="high",
    gpus_per_node=2,
    gpu_type="a100",
    cpus_per_task=8,
    mem_gb=32,
    time="1-02:03:04",
    constraint="a100&ib",
    array_parallelism=3,
    max_requeues=4,
    setup=("module load cuda/12.1", "source /opt/venv/bin/activate"),
    exclusive=True,
    extra=(
        ("mail-type", "END"),
        ("mail-user", "me@example.org"),
        ("comment", "nightly"),
        ("nodelist", "node[01-04]"),
    ),
)


def test_sbatch_for_every_resource(tmp_path, srun_on_path):
    text = sbatch_text(FULL, tmp_path, runs=10)
    options = sbatch_options(text)
    assert options == {
        "array": "0-9%3",
        "signal": f"USR2@{submit.SIGNAL_DELAY_S}",
        "time": str(26 * 60 + 3 + 1),
        "gres": "gpu:a100:2",
        "cpus-per-task": "8",
        "mem": "32GB",
        "nodes": "1",
        "ntasks-per-node": "1",
        "partition": "gpu",
        "account": "proj1",
        "qos": "high",
        "constraint": "'a100&ib'",
        "mail-type": "END",
        "mail-user": "me@example.org",
        "exclusive": True,
        "comment": "nightly",
        "nodelist": "'node[01-04]'",
        "job-name": "cifarbench",
        "wckey": "submitit",
        "open-mode": "append",
        "output": f"{tmp_path}/logs/%A_%a/%A_%a_0_log.out",
        "error": f"{tmp_path}/logs/%A_%a/%A_%a_0_log.err",
    }
    lines = text.splitlines()
    setup = lines.index("# setup")
    assert lines[setup + 1 : setup + 3] == ["module load cuda/12.1", "source /opt/venv/bin/activate"]
    assert next(i for i, line in enumerate(lines) if line.startswith("srun ")) > setup + 2


def test_sbatch_with_default_resources(tmp_path, srun_on_path):
    options = sbatch_options(sbatch_text(Resources(), tmp_path, runs=40))
    assert (options["array"], options["time"], options["gpus-per-node"], options["cpus-per-task"]) == (
        "0-39%16",
        "240",
        "1",
        "4",
    )
    assert not {"partition", "account", "qos", "constraint", "mem", "exclusive"} & set(options)
    lines = sbatch_text(Resources(), tmp_path, runs=40).splitlines()
    assert not any(lines[lines.index("# setup") + 1 : lines.index("# command")])  # no setup lines


@pytest.mark.parametrize("runs, parallelism, array", [(2, 16, "0-1%2"), (16, 16, "0-15%16"), (1000, 2, "0-999%2")])
def test_sbatch_array_throttle(tmp_path, srun_on_path, runs, parallelism, array):
    options = sbatch_options(sbatch_text(Resources(array_parallelism=parallelism), tmp_path, runs=runs))
    assert options["array"] == array


@pytest.mark.parametrize("time, minutes", [("00:02:00", "2"), ("02:30", "3"), ("00:02:01", "3"), ("04:00:00", "240")])
def test_sbatch_time_is_rounded_up_to_whole_minutes(tmp_path, srun_on_path, time, minutes):
    assert sbatch_options(sbatch_text(Resources(time=time), tmp_path, runs=2))["time"] == minutes


def test_sbatch_from_a_grid_file(tmp_path, srun_on_path):
    grid = parse_grid(
        "models: [resnet20]\ndatasets: [cifar10]\nopts: [step-160]\nbatch_sizes: [128]\n"
        'slurm:\n  partition: gpu\n  time: "00:30:00"\n  constraint: a100|h100\n'
        '  setup: ["export OMP_NUM_THREADS=1"]\n  exclusive: true\n  extra: {reservation: bench}\n'
    )
    [resources] = set(grid.resources.values())
    text = sbatch_text(resources, tmp_path, runs=len(grid.specs) + 1)
    options = sbatch_options(text)
    assert (options["partition"], options["time"], options["constraint"], options["reservation"]) == (
        "gpu",
        "30",
        "'a100|h100'",
        "bench",
    )
    assert options["exclusive"] is True and "\nexport OMP_NUM_THREADS=1\n" in text
    assert options["mem"] == "0"  # a whole node's memory, where the grid does not say how much


@pytest.mark.parametrize(
    "slurm, where",
    [
        ("{partition: 'gpu;reboot'}", "slurm.partition: 'gpu;reboot' contains ';'"),
        ("{qos: 'high$(reboot)'}", "slurm.qos: 'high$(reboot)' contains '$()'"),
        ('{setup: ["module load cuda\\nreboot"]}', "slurm.setup: 'module load cuda\\nreboot' contains '\\n'"),
        ("{extra: {comment: 'a`reboot`'}}", "slurm.extra.comment: 'a`reboot`' contains '`'"),
        ("{extra: {wrap: reboot}}", "slurm.extra: unknown sbatch option 'wrap'"),
    ],
)
def test_shell_metacharacters_never_reach_sbatch(slurm, where):
    with pytest.raises(GridError) as info:
        parse_grid(
            f"models: [resnet20]\ndatasets: [cifar10]\nopts: [step-160]\nbatch_sizes: [128]\nslurm: {slurm}\n",
            source="g.yaml",
        )
    assert str(info.value).startswith(f"g.yaml: {where}")
