"""Resources per run on the real local cluster: one array per resource group with the limits SLURM was asked
for, time: auto from earlier records, the reserved hours a dry run prints against what SLURM queued, and sbatch
refusals that leave nothing behind; and a job over its memory, killed by SLURM and shown failed by status.

Arrays are submitted held (``extra: {hold: true}``) and cancelled at the end of each test: what is checked is
what SLURM recorded, not training; only the memory check's job runs, for the seconds it takes to be killed."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster import estimate, queue
from cifarbench.config.resources import format_time, parse_time
from cifarbench.store import records
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import read_manifests

pytestmark = pytest.mark.slurm

if (
    not shutil.which("sbatch")
    or "UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout
):
    pytest.skip("no local SLURM cluster (bash slurm/cluster.sh up)", allow_module_level=True)

GRID = """\
models: [resnet20, resnet32]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: [0, 1]
epochs: 2
precision: 32-true
root: {root}
results: {results}
slurm:
  gpus_per_node: 0
  cpus_per_task: 1
  mem_gb: 1
  time: "00:15:00"
  extra: {{hold: true}}
{rules}"""


def _queue() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split())


def _job(array: str) -> dict[str, str]:
    """``scontrol show job -o`` of a (pending) array: its fields, from the first line."""
    out = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout.splitlines()[0]))


@pytest.fixture
def held(tmp_path, synthetic_root):
    """Write a grid (``GRID`` or ``grid=``, format ``rules``), submit it, yield its manifest's arrays; cancel them
    afterwards."""
    submitted: list[str] = []

    def submit(rules: str = "", *extra: str, grid: str = GRID) -> dict[str, list[dict]]:
        path = tmp_path / "grid.yaml"
        path.write_text(grid.format(root=synthetic_root, results=tmp_path / "results", rules=rules))
        assert main(["submit", str(path), *extra]) == 0
        arrays: dict[str, list[dict]] = {}
        for entry in read_manifests(tmp_path / "results").values():
            arrays.setdefault(entry["array_job_id"], []).append(entry)
        submitted.extend(arrays)
        return arrays

    yield submit
    if submitted:
        subprocess.run(["scancel", *submitted], check=False)


def test_two_resource_groups_are_two_arrays_with_their_own_limits(held, capsys):
    arrays = held('resources: [{match: {model: resnet32}, time: "00:25:00", mem_gb: 2}]\n')
    out = capsys.readouterr().out
    assert "group 1: 2 tasks holding 2 runs (one run each), 0 GPUs, 1 CPU, 1 GB, time 00:15:00" in out
    assert "group 2: 2 tasks holding 2 runs (one run each), 0 GPUs, 1 CPU, 2 GB, time 00:25:00" in out
    assert len(arrays) == 2
    seen = {}
    for array, entries in arrays.items():
        job = _job(array)
        models = {e["spec"]["model"] for e in entries}
        assert len(entries) == 2 and len(models) == 1
        seen[models.pop()] = (job["TimeLimit"], job["MinMemoryNode"], entries[0]["resources"]["time"])
    assert seen == {"resnet20": ("00:15:00", "1G", "00:15:00"), "resnet32": ("00:25:00", "2G", "00:25:00")}


def test_time_and_memory_auto_from_earlier_records(held, write_records, tmp_path, capsys):
    # two completed runs of resnet20 in this results folder, 2 epochs in 30 s of training and 6 s of test each, on the
    # grid's data (synthetic_root's 1,000 + 500 images), whose processes peaked at 1,300 and 1,400 MiB
    write_records(
        [
            {"model": "resnet20", "dataset": "synthetic10", "recipe": "step-160", "batch_size": 64, "seed": s,
             "epochs": 2, "precision": "32-true", "train_seconds": 30.0, "test_seconds": 6.0, "epochs_done": 2,
             "test_acc": [0.5, 0.6], "final_test_acc": 0.6, "device_name": "cpu", "train_images": 1000,
             "test_images": 500, "peak_host_mb": peak}
            for s, peak in ((5, 1300.0), (6, 1400.0))
        ],
        results=tmp_path / "results",
    )  # fmt: skip
    arrays = held("resources: [{match: {model: resnet20}, time: auto, time_margin: 3, mem_gb: auto}]\n")
    out = capsys.readouterr().out
    wanted, _ = estimate.time_limit(estimate.START_S + 2 * 18.0, 3, None)
    limits = {}
    for array, entries in arrays.items():
        model = entries[0]["spec"]["model"]
        limits[model] = parse_time(_job(array)["TimeLimit"])
        if model == "resnet20":
            budget = entries[0]["budget"]
            assert budget["estimated_s"] == pytest.approx(estimate.START_S + 36.0)
            assert budget["estimate_source"].startswith("records: 2 epochs; 2 records on cpu, 32-true: 18.0 s/epoch")
    assert limits == {"resnet20": wanted, "resnet32": 15 * 60}
    assert "estimates: 2 from records" in out and "estimates: 2 from prior" in out
    # the highest peak x 1.25, rounded up to 0.5 GB: what the queue holds, beside the grid's fixed 1 GB
    queued = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%F %m"], capture_output=True,
                            text=True).stdout.split("\n")  # fmt: skip
    memory = {arrays[a][0]["spec"]["model"]: m for a, m in (line.split() for line in queued if line)}
    assert memory == {"resnet20": "2G", "resnet32": "1G"}, queued
    assert "2 GB (auto)" in out and "memory: records: 2 peaks of resnet20 bs 64 on cpu, 32-true: 1,400 MiB" in out


# A group with time: auto, one with a fixed time, one packing 2 runs on 2 GPUs, and CPU-only runs
RESERVED_RULES = """\
resources:
  - {{match: {{model: resnet20}}, gpus_per_node: 1, time: auto}}
  - {{match: {{model: resnet32}}, gpus_per_node: 1, time: "{fixed}"}}
  - {{match: {{model: resnet44}}, gpus_per_node: 2, cpus_per_task: 2, pack: 2, time: "00:30:00"}}
  - {{match: {{model: resnet56}}, cpus_per_task: 2, time: "00:07:00"}}
"""


def _reserved_s(array: str, limit: str, gpus: int, cpus: int) -> tuple[str, int, str]:
    """(array, device-seconds one of its tasks reserves, their unit): GPU-seconds, or CPU-core-seconds without GPU."""
    return (array, parse_time(limit) * gpus, "GPU-h") if gpus else (array, parse_time(limit) * cpus, "CPU-core-h")


def _by_array(tasks) -> dict[str, tuple[int, str]]:
    """Array -> (device-seconds its tasks reserve, unit), from ``_reserved_s`` of each task."""
    out: dict[str, tuple[int, str]] = {}
    for array, seconds, unit in tasks:
        out[array] = (out.get(array, (0, unit))[0] + seconds, unit)
    return out


def _queued_reserved(arrays) -> dict[str, tuple[int, str]]:
    """What the queue holds: each array task's time limit and GRES as squeue shows them."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%F %i %l %b %C"], capture_output=True, text=True
    )
    tasks = []
    for line in out.stdout.splitlines():
        array, _, limit, gres, cpus = line.split()
        gpus = re.search(r"gpu(?::[^:,]+)?:(\d+)", gres)  # gres:gpu:2, gres:gpu:a100:2, N/A
        tasks.append(_reserved_s(array, limit, int(gpus.group(1)) if gpus else 0, int(cpus)))
    return _by_array(tasks)


def _planned_reserved(arrays: dict[str, list[dict]]) -> dict[str, tuple[int, str]]:
    """What the plan counted: each task's time limit (its budget's, as SLURM gets it) and GPUs (CPUs), from the
    manifest."""
    tasks = {e["job_id"]: (a, e) for a, entries in arrays.items() for e in entries}  # a pack: one task
    return _by_array(
        _reserved_s(a, format_time(e["budget"]["time_limit_s"]), e["resources"]["gpus_per_node"],
                    e["resources"]["cpus_per_task"])
        for a, e in tasks.values()
    )  # fmt: skip


def _reserved(line: str) -> tuple[str, str]:
    """(reserved hours, unit) as a group line of ``submit`` prints them."""
    return re.search(r"reserved (\d+\.\d) (GPU-h|CPU-core-h)", line).groups()


def test_the_reserved_hours_a_dry_run_prints_are_what_the_sbatch_calls_asked_for(
    held, tmp_path, synthetic_root, capsys
):
    fixed = "00:20:30"  # sbatch gets whole minutes: 21
    grid = GRID.replace("models: [resnet20, resnet32]", "models: [resnet20, resnet32, resnet44, resnet56]")
    rules = RESERVED_RULES.format(fixed=fixed)
    path = tmp_path / "grid.yaml"
    path.write_text(grid.format(root=synthetic_root, results=tmp_path / "results", rules=rules))
    assert main(["submit", str(path), "--dry-run"]) == 0
    dry = capsys.readouterr().out.splitlines()
    arrays = held(rules, grid=grid)  # the same grid file, submitted (held)
    out = capsys.readouterr().out.splitlines()
    groups = [line for line in dry if line.startswith("group ")]
    assert groups == [line for line in out if line.startswith("group ")]  # the submission planned the same tasks
    planned = _planned_reserved(arrays)
    queued = _queued_reserved(arrays)
    seen = "dry run:\n" + "\n".join(dry[:6]) + f"\nplanned (device-s): {planned}\nqueued (device-s): {queued}"
    assert len(groups) == len(arrays) == 4, seen
    for line, array in zip(groups, arrays):  # one array per group, submitted in the order of the groups
        seconds, unit = queued[array]
        assert _reserved(line) == (f"{seconds / 3600:.1f}", unit), seen
    total = next(line for line in dry if line.startswith("total: "))
    for unit in ("GPU-h", "CPU-core-h"):
        hours = sum(s for s, u in queued.values() if u == unit) / 3600
        assert f"reserved {unit} {hours:.1f}" in total, seen
    assert planned == queued, seen  # exactly, not only to the 0.1 h printed


def test_an_sbatch_refusal_is_one_line_and_leaves_nothing_behind(tmp_path, synthetic_root, capsys):
    path = tmp_path / "grid.yaml"
    results = tmp_path / "results"
    path.write_text(
        GRID.format(root=synthetic_root, results=results, rules="").replace(
            "mem_gb: 1", "mem_gb: 1\n  partition: nosuch"
        )
    )
    before = _queue()
    assert main(["submit", str(path), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sbatch refused the job:" in err and "Invalid partition" in err, err
    assert "sinfo -s" in err and "is the cluster up" not in err
    assert _queue() == before
    logs = results / "logs"
    assert not logs.exists() or not any(logs.rglob("*")), sorted(logs.rglob("*"))
    assert not (results / "submissions").exists()


def test_time_auto_is_capped_at_the_partitions_max_time(held, capsys):
    arrays = held("resources: [{match: {model: resnet32}, partition: short, time: auto, time_margin: 100}]\n")
    out = capsys.readouterr().out
    assert "warning: group 2's tasks are estimated to need more than the partition's MaxTime" in out
    limits = {entries[0]["spec"]["model"]: _job(array)["TimeLimit"] for array, entries in arrays.items()}
    assert limits == {"resnet20": "00:15:00", "resnet32": "00:30:00"}


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("root: {root}", "root: {root}/elsewhere", "dataset synthetic10 not found in"),
        (
            "  mem_gb: 1\n",
            "  mem_gb: 1\n  partition: shrot\n",
            "no partition 'shrot' on this cluster (did you mean 'short'?)",
        ),
        ('  time: "00:15:00"', '  partition: short\n  time: "01:00:00"', "is longer than partition 'short' allows"),
        ("  cpus_per_task: 1", "  cpus_per_task: 64", "have at most"),
        ("  mem_gb: 1\n", "  mem_gb: 1\n  qos: nosuchqos\n", "unknown QOS 'nosuchqos'"),
    ],
    ids=["missing-data", "unknown-partition", "over-max-time", "too-many-cpus", "unknown-qos"],
)
def test_a_grid_the_cluster_cannot_run_is_refused_before_anything_is_queued(
    tmp_path, synthetic_root, capsys, old, new, expected
):
    text = GRID.replace(old, new).format(root=synthetic_root, results=tmp_path / "results", rules="")
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    before = _queue()
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.rstrip().endswith("nothing was submitted (--no-preflight skips these checks)")
    assert all(line.startswith("cifarbench: error: ") for line in err.splitlines())
    assert _queue() == before and not (tmp_path / "results" / "submissions").exists()


def test_a_typo_in_a_rule_is_a_did_you_mean(tmp_path, synthetic_root, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(root=synthetic_root, results=tmp_path / "results",
                                rules="resources: [{match: {modle: resnet20}, time: auto}]\n"))  # fmt: skip
    before = _queue()
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'modle' (did you mean 'model'?)" in err
    assert _queue() == before


MEMORY_GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: [0]
epochs: 1
precision: 32-true
root: {root}
results: {results}
slurm: {{gpus_per_node: 0, cpus_per_task: 1, mem_gb: 0.5, time: "00:05:00", setup: ["export OMP_NUM_THREADS=1"]}}
"""


def _lines(*cmd: str) -> list[str]:
    """What a command printed, line by line; nothing where it failed (squeue, once the job has left the queue)."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.splitlines()


def test_a_job_over_its_memory_is_killed_and_status_says_so(tmp_path, synthetic_root, capsys):
    # a training process needs more than 1 GB: SLURM kills the job within seconds of its start (OverMemoryKill, see
    # slurm/slurm.conf.in), before any of it could write the run's record; status writes it
    path, results = tmp_path / "grid.yaml", tmp_path / "results"
    path.write_text(MEMORY_GRID.format(root=synthetic_root, results=results))
    assert main(["submit", str(path)]) == 0
    capsys.readouterr()
    [entry] = read_manifests(results).values()
    job, seen, asked = entry["job_id"], [], set()
    try:
        deadline = time.monotonic() + 180  # the cluster may be running another test's jobs first
        while True:
            queued = _lines("squeue", "-h", "-o", "%T %m", "-j", job)  # "PENDING 512M"
            accounted = _lines("sacct", "-n", "-P", "-X", "-o", "State,ExitCode,ReqMem", "-j", job)
            seen.append(f"{time.strftime('%H:%M:%S')} squeue: {queued}  sacct: {accounted}")
            asked.update(line.split()[-1] for line in queued)
            if accounted and accounted[0].split("|")[0].split()[0] not in queue.ACTIVE_STATES:
                break
            assert time.monotonic() < deadline, "\n".join(seen)
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], timeout=60)
    ended: list[str] = []
    for _ in range(30):  # sacct's ReqMem reads "16?" until slurmdbd has the job's TRES, a few seconds after its end
        if "512M" in asked or (ended := _lines("sacct", "-n", "-P", "-X", "-o", "ReqMem", "-j", job)) == ["512M"]:
            break
        time.sleep(1)
    log = Path(entry["stderr"])
    said = "\n".join([*seen, f"sacct ReqMem after the end: {ended or '(not asked: squeue said it)'}", "log:"])
    said += "\n" + (log.read_text()[-3000:] if log.exists() else "(none)")
    assert "512M" in asked or ended == ["512M"], said
    assert main(["status", str(results), "--json"]) == 0
    [run] = json.loads(capsys.readouterr().out)["runs"]
    assert run["status"] == "failed" and "memory" in run["error"] and "--mem=512M" in run["error"], (run, said)
    record = records.read_record(Layout(results).record(entry["run_id"]))
    assert record and (record["status"], record["error"]) == ("failed", run["error"]), said
    print(said)  # what SLURM said, for pytest -rP
