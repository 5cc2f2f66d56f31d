"""One run on several processes (DDP), as the control plane sees it: ``gpus_per_run``, ``nodes`` and ``sync_bn`` in a
grid (each place they may be written, their errors, the run ids), the Resources and the sbatch script they make,
the refusals (local execution, packing, fusion, whole nodes), preflight's node checks, plans' device-hours and
time estimates from evidence of the same world size, and collect's device-hours; once on the real cluster, a held
array task whose job SLURM records with two tasks. Training itself is tested in tests/test_train.py's DDP tests."""

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest
from conftest import record_row
from submitit.slurm.slurm import _make_sbatch_string

from cifarbench.cli import main
from cifarbench.cluster import estimate, inventory, plan, preflight, submit
from cifarbench.cluster.inventory import ClusterLimits
from cifarbench.config.grid import parse_grid
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.errors import GridError
from cifarbench.report.tables import CPU_H, GPU_H, allocations, device_hours
from cifarbench.store.manifests import read_manifests

BASE = "models: [resnet20, resnet32]\ndatasets: [cifar10]\nopts: [step-160]\nbatch_sizes: [128]\n"


def grid(text: str):
    return parse_grid(text, source="g.yaml")


def error(text: str) -> str:
    """The one-line message a grid fails with."""
    with pytest.raises(GridError) as info:
        grid(text)
    message = str(info.value)
    assert message.startswith("g.yaml: ") and "\n" not in message
    return message


def by_model(g) -> dict[str, tuple[RunSpec, Resources]]:
    return {s.model: (s, g.resources[s.run_id]) for s in g.specs}


# --- the grid ----------------------------------------------------------------------------------------------------


def test_top_level_fields_set_every_runs_spec_and_resources():
    runs = by_model(grid(BASE + "gpus_per_run: 2\nnodes: 2\nslurm: {cpus_per_task: 3, mem_gb: 16}\n"))
    for spec, r in runs.values():
        assert (spec.gpus_per_run, spec.nodes, spec.sync_bn, spec.world_size) == (2, 2, True, 4)
        assert (r.tasks_per_node, r.nodes, r.gpus_per_node, r.cpus_per_task, r.mem_gb) == (2, 2, 2, 3, 16)
        assert r.processes == 4


def test_a_rule_sets_them_for_the_runs_it_matches_and_an_include_entry_for_its_own():
    text = BASE + (
        "resources:\n  - {match: {model: resnet32}, gpus_per_run: 2, time: '02:00:00'}\n"
        "include:\n  - {model: resnet56, gpus_per_run: 4, nodes: 2, sync_bn: false}\n"
    )
    runs = by_model(grid(text))
    assert [(s.world_size, s.sync_bn, r.tasks_per_node, r.nodes) for s, r in runs.values()] == [
        (1, True, 1, 1),
        (2, True, 2, 1),
        (8, False, 4, 2),
    ]
    assert runs["resnet32"][1].time == "02:00:00"


def test_an_include_entry_overrides_the_rule_that_matches_its_run():
    text = (
        BASE
        + "resources:\n  - {match: {model: resnet56}, gpus_per_run: 2}\ninclude:\n  - {model: resnet56, nodes: 2}\n"
    )
    spec, r = by_model(grid(text))["resnet56"]
    assert (spec.gpus_per_run, spec.nodes, r.tasks_per_node, r.nodes) == (2, 2, 2, 2)


def test_on_cpus_the_processes_ask_for_no_gpus():
    spec, r = by_model(grid(BASE + "gpus_per_run: 2\nslurm: {gpus_per_node: 0}\n"))["resnet20"]
    assert (spec.world_size, r.gpus_per_node, r.tasks_per_node) == (2, 0, 2)


def test_one_device_and_sync_bn_keep_the_run_id_and_per_device_statistics_change_it():
    plain = {s.model: s.run_id for s in grid(BASE).specs}
    assert {s.model: s.run_id for s in grid(BASE + "gpus_per_run: 2\nnodes: 2\n").specs} == plain
    assert {s.model: s.run_id for s in grid(BASE + "sync_bn: false\n").specs} == plain  # one device: nothing to sync
    apart = {s.model: s.run_id for s in grid(BASE + "gpus_per_run: 2\nsync_bn: false\n").specs}
    assert set(apart.values()).isdisjoint(plain.values())
    assert {s.model: s.run_id for s in grid(BASE + "nodes: 2\nsync_bn: false\n").specs} == apart  # 2 devices both


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpus_per_run: 0\n", "g.yaml: gpus_per_run: must be"),
        ("gpus_per_run: 2.5\n", "g.yaml: gpus_per_run: "),
        ("nodes: -1\n", "g.yaml: nodes: must be"),
        ("sync_bn: 1\n", "g.yaml: sync_bn: must be true or false, got 1"),
        ("gpus_per_runs: 2\n", "unknown key 'gpus_per_runs' (did you mean 'gpus_per_run'?)"),
        ("slurm: {tasks_per_node: 2}\n", "g.yaml: slurm: unknown key 'tasks_per_node'"),
        ("gpus_per_run: 3\n", "top level: batch_size: 128 is the global batch of 3 devices"),
        ("gpus_per_run: 2\npack: 2\n", "top level: pack: 2 packs runs onto a task's devices"),
        ("gpus_per_run: 2\npack: auto\n", "top level: pack: auto packs runs onto a task's devices"),
        ("nodes: 2\nfuse: seeds\nseeds: [0, 1]\n", "top level: fuse: seeds trains a group on one device"),
        ("gpus_per_run: 2\nslurm: {exclusive: true}\n", "top level: exclusive: whole nodes are sized by the node"),
        ("gpus_per_run: 2\nslurm: {gpus_per_node: 4}\n", "top level: gpus_per_node: 4, but gpus_per_run: 2 takes"),
        ("gpus_per_run: 2\nslurm: {mem_gb: auto}\n", "top level: mem_gb: auto plans one process's memory"),
        (
            "resources:\n  - {match: {model: resnet20}, gpus_per_rn: 2}\n",
            "resources[0]: unknown key 'gpus_per_rn' (did you mean 'gpus_per_run'?)",
        ),
        ("resources:\n  - {match: {model: resnet20}, nodes: 0}\n", "g.yaml: resources[0].nodes: must be"),
        (
            "include:\n  - {model: resnet56, gpus_per_run: 2, pack: 2}\n",
            "include[0]: pack: 2 packs runs onto a task's devices",
        ),
        ("include:\n  - {model: resnet56, sync_bn: no_thanks}\n", "include[0].sync_bn: must be true or false"),
    ],
)
def test_a_bad_value_is_one_located_line(text, message):
    assert message in error(BASE + text)


# --- resources and the sbatch script -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["tasks_per_node", "nodes"])
def test_resources_refuse_fewer_than_one_task_or_node(field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        Resources(**{field: 0})


def _sbatch(resources: Resources, folder, runs: int) -> str:
    """The file submitit hands to sbatch for an array of ``runs`` tasks (as SlurmExecutor builds it for a batch)."""
    executor = submit._slurm_executor(resources, folder / "logs" / "%j")._executor
    return _make_sbatch_string(
        command="python -u -m submitit.core._submit logs", folder=executor.folder, map_count=runs, **executor.parameters
    )


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """submitit's SlurmExecutor refuses to exist without srun on the PATH; building the sbatch text never runs it."""
    if shutil.which("srun") is None:
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "bin" / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize(
    "slurm, gpus",
    [
        ("", {"gpus-per-node": "2"}),
        ("gpu_type: a100", {"gres": "gpu:a100:2"}),
        ("gpus_per_node: 0", {"gpus-per-node": "0"}),
    ],
)
def test_the_sbatch_script_asks_for_nodes_tasks_and_a_gpu_per_task(slurm, gpus, tmp_path, srun_on_path):
    text = BASE + f"gpus_per_run: 2\nnodes: 2\nslurm: {{cpus_per_task: 3, mem_gb: 8, {slurm}}}\n"
    [r] = set(grid(text).resources.values())
    script = _sbatch(r, tmp_path, runs=1)
    options = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)$", script, re.M))
    assert {"nodes": "2", "ntasks-per-node": "2", "cpus-per-task": "3", "mem": "8GB"}.items() <= options.items()
    assert {k: v for k, v in options.items() if k in ("gpus-per-node", "gres")} == gpus
    assert "\nsrun --unbuffered" in script  # one process per task, started by srun


def test_local_execution_refuses_a_run_of_several_processes():
    r = grid(BASE + "gpus_per_run: 2\nslurm: {gpus_per_node: 0}\n").resources
    with pytest.raises(ValueError, match="a run of 2 processes is started by srun on SLURM.*run it on SLURM"):
        plan.local_resources(next(iter(r.values())), gpus=0, cpus=2)
    assert plan.local_resources(Resources(gpus_per_node=0), gpus=0, cpus=2).processes == 1


# --- preflight ----------------------------------------------------------------------------------------------------

SITE_PARTITIONS = """\
PartitionName=gpu Default=YES MaxTime=2-00:00:00 Nodes=g[01-02] State=UP
PartitionName=cpu Default=NO MaxTime=7-00:00:00 Nodes=c01 State=UP
"""
SITE_NODES = """\
NodeName=g01 CPUTot=64 Gres=gpu:a100:4 RealMemory=512000 Partitions=gpu
NodeName=g02 CPUTot=32 Gres=gpu:v100:2 RealMemory=192000 Partitions=gpu
NodeName=c01 CPUTot=16 Gres=(null) RealMemory=64000 Partitions=cpu
"""
SITE = ClusterLimits(
    partitions=inventory.parse_partitions(SITE_PARTITIONS), nodes=tuple(inventory.parse_nodes(SITE_NODES))
)


@pytest.mark.parametrize(
    "resources, problem",
    [
        (Resources(tasks_per_node=2, gpus_per_node=2, nodes=2, cpus_per_task=8), None),
        (
            Resources(tasks_per_node=2, gpus_per_node=2, nodes=3),
            "slurm: nodes: 3, but the default partition 'gpu' has 2 that take jobs",
        ),
        (
            Resources(tasks_per_node=4, gpus_per_node=4, nodes=2),
            "slurm: nodes: 2, but the default partition 'gpu' has 1 that take jobs and have 4 GPUs",
        ),
        (Resources(tasks_per_node=2, gpus_per_node=2, nodes=2, gpu_type="v100"), "has 1 that take jobs"),
        (
            Resources(tasks_per_node=8, gpus_per_node=8),
            "gpus_per_run: 8, but the nodes of the default partition 'gpu' have at most 4 GPUs",
        ),
        (
            Resources(partition="cpu", tasks_per_node=4, gpus_per_node=0, cpus_per_task=8),
            "slurm.cpus_per_task: 8 x 4 processes of a run = 32, but the nodes of partition 'cpu' have at most 16 "
            "CPUs; ask for at most 4",
        ),
    ],
)
def test_node_checks_count_each_nodes_tasks_and_the_nodes(resources, problem):
    found = preflight.check_resources(resources, SITE)
    assert (problem is None and found == []) or (problem is not None and any(problem in p for p in found)), found


def test_a_partition_without_gpus_keeps_the_runs_processes():
    r = grid(BASE + "gpus_per_run: 2\nslurm: {partition: cpu}\n").resources
    changed, notes = preflight.without_gpus(r, SITE)
    assert {(x.gpus_per_node, x.tasks_per_node) for x in changed.values()} == {(0, 2)} and notes


# --- plans --------------------------------------------------------------------------------------------------------


def _tasks(text: str, evidence=None) -> list:
    g = grid(text)
    return plan.make_tasks(g.specs, g.resources, g.fuse, evidence or estimate.Evidence.none())


def test_a_run_counts_every_gpu_or_core_of_its_nodes_for_its_wall_time():
    [t] = _tasks(BASE.replace("resnet20, resnet32", "resnet20") + "gpus_per_run: 2\nnodes: 2\n")
    assert t.hours(3600) == 4 and t.unit == "GPU-h"
    [t] = _tasks(BASE.replace("resnet20, resnet32", "resnet20") + "gpus_per_run: 2\nslurm: {gpus_per_node: 0}\n")
    assert t.hours(3600) == 2 * 4 and t.unit == "CPU-core-h"  # 2 processes of the default 4 CPUs


def test_the_dry_run_says_nodes_and_gpus_per_run():
    lines = plan.describe(_tasks(BASE + "gpus_per_run: 4\nnodes: 2\nslurm: {time: '01:00:00'}\n"), max_array_size=100)
    assert "2 tasks holding 2 runs (one run each), 2 nodes x 4 GPUs per run, 4 CPUs per process" in lines[0]
    assert "reserved 16.0 GPU-h" in lines[0]  # 2 tasks x 1 h x 8 GPUs
    lines = plan.describe(_tasks(BASE + "gpus_per_run: 2\nslurm: {gpus_per_node: 0}\n"), max_array_size=100)
    assert "1 node x 2 processes on CPUs (gloo) per run, 4 CPUs per process" in lines[0]


def _record(world_size: int | None, train_seconds: float) -> dict:
    return record_row(
        precision="32-true", device_name="NVIDIA A100", train_seconds=train_seconds, test_seconds=0.0,
        world_size=world_size,
    )  # fmt: skip


def test_time_auto_uses_evidence_of_the_same_world_size_only():
    # 200 epochs: 10 s an epoch on one device (a record from before record/8 says nothing of its world size), 6 s on 2
    evidence = estimate.Evidence(
        records=estimate.samples_from_records([_record(None, 2000.0), _record(2, 1200.0)]), bench={}
    )

    def estimated(gpus: int) -> estimate.Estimate:
        spec = RunSpec(
            model="resnet20", dataset="cifar10", recipe=get_recipe("step-200"), batch_size=64, seed=0,
            precision="32-true", gpus_per_run=gpus,
        )  # fmt: skip
        return estimate.estimate_task([spec], Resources(gpus_per_node=gpus, tasks_per_node=gpus), evidence)

    one, two, four = estimated(1), estimated(2), estimated(4)
    assert one.seconds == estimate.START_S + 200 * 10 and "2 processes" not in one.detail
    assert two.seconds == estimate.START_S + 200 * 6 and "2 processes: 1 record on NVIDIA A100" in two.detail
    assert four.seconds == one.seconds and four.source == "records"
    assert "no records of 4 processes: one device's figure, no speed-up assumed" in four.detail


def test_memory_and_packing_evidence_leave_out_runs_of_several_processes():
    rows = [_record(2, 1200.0) | {"peak_host_mb": 900.0, "peak_device_mb": 300.0}]
    assert estimate.memory_from_records(rows) == {} and estimate.packs_from_records(rows) == {}


# --- collect ------------------------------------------------------------------------------------------------------


def test_collects_device_hours_follow_the_whole_runs_allocation():
    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "status": ["completed"] * 3,
            "world_size": [2, 1, 2],
            "alloc_gpus": [2, 1, 0],
            "alloc_cpus": [8, 4, 4],  # the whole run's: every task's cores
            "wall_seconds": [3600.0, 3600.0, 1800.0],
            "estimated_s": [3000.0] * 3,
            "time_limit_s": [7200.0] * 3,
            "estimate_source": ["records: x"] * 3,
            "packed_with": [None] * 3,
            "fused_with": [None] * 3,
        }
    )
    tasks, task_of = allocations(runs)
    hours = device_hours(tasks, task_of).hours
    assert hours["used", GPU_H] == 3.0 and hours["used", CPU_H] == 2.0
    assert hours["reserved", GPU_H] == 6.0


# --- the real cluster ----------------------------------------------------------------------------------------------

GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
epochs: 1
precision: 32-true
root: {root}
results: {results}
gpus_per_run: 2
slurm:
  cpus_per_task: 1
  mem_gb: 1
  time: "00:10:00"
  extra: {{hold: true}}
"""


def test_local_execution_of_a_ddp_grid_is_one_line(tmp_path, synthetic_root, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(root=synthetic_root, results=tmp_path / "results"))
    assert main(["submit", str(path), "--dry-run", "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run it on SLURM" in err and "\n" not in err


@pytest.mark.slurm
def test_a_held_ddp_task_is_one_job_of_two_tasks_on_the_real_cluster(tmp_path, synthetic_root, capsys):
    if (
        not shutil.which("sbatch")
        or "UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout
    ):
        pytest.skip("no local SLURM cluster (bash slurm/cluster.sh up)")
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(root=synthetic_root, results=tmp_path / "results"))
    assert main(["submit", str(path), "--dry-run"]) == 0
    assert "1 task holding 1 run (one run each), 1 node x 2 GPUs per run, 1 CPU per process" in capsys.readouterr().out
    assert main(["submit", str(path)]) == 0
    [entry] = read_manifests(tmp_path / "results").values()
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", entry["array_job_id"]], capture_output=True, text=True, check=True
        ).stdout
        job = dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))
        # a pending job's node count is a range: at least and at most 1
        assert (job["NumNodes"], job["NumTasks"], job["JobState"]) == ("1-1", "2", "PENDING"), out
        assert " NtasksPerN:B:S:C=2:" in out, out
        assert "gres/gpu=2" in job["TRES"] and "cpu=2" in job["TRES"], out
        assert entry["resources"]["tasks_per_node"] == 2 and entry["spec"]["gpus_per_run"] == 2
    finally:
        subprocess.run(["scancel", entry["array_job_id"]], check=False)
