"""``exclusive: true``: whole nodes, every GPU and CPU of the node, ``pack: K`` runs on each GPU. The grid's field,
the sizing from the partition's nodes (pure, on scontrol text), local execution's whole machine, the plan and
its lines, the sbatch text, and on the real local SLURM cluster: one whole-node task whose two runs get a fake GPU
each."""

import dataclasses
import io
import json
import subprocess
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from test_submit import sbatch_options, sbatch_text, srun_on_path  # noqa: F401 (a fixture)

from cifarbench.cli import main
from cifarbench.cluster import estimate, inventory, memory, plan, preflight
from cifarbench.cluster.memory import PlanError
from cifarbench.config.grid import load_grid, parse_grid
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.errors import GridError
from cifarbench.store import records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.train import data

RECORDED = Path(__file__).parent / "recorded"
AXES = "models: [resnet20]\ndatasets: [cifar10]\nopts: [step-160]\nbatch_sizes: [64]\n"

# A site in scontrol's format: a GPU partition whose nodes differ (4 and 8 a100s; a down node of 8 h100s that
# takes no jobs), a CPU partition with a per-node CPU cap, and a partition mixing GPU and CPU nodes.
SITE = inventory.ClusterLimits(
    partitions=inventory.parse_partitions(
        "PartitionName=gpu Default=YES MaxTime=2-00:00:00 Nodes=g[01-03] State=UP\n"
        "PartitionName=cpu Default=NO MaxCPUsPerNode=32 Nodes=c01 State=UP\n"
        "PartitionName=mixed Default=NO Nodes=g01,c01 State=UP\n"
    ),
    nodes=tuple(
        inventory.parse_nodes(
            "NodeName=g01 CPUTot=64 Gres=gpu:a100:4 RealMemory=512000 Features=ib Partitions=gpu,mixed State=IDLE\n"
            "NodeName=g02 CPUTot=128 Gres=gpu:a100:8 RealMemory=1024000 Features=ib,big Partitions=gpu State=MIXED\n"
            "NodeName=g03 CPUTot=256 Gres=gpu:h100:8 RealMemory=1024000 Partitions=gpu State=DOWN\n"
            "NodeName=c01 CPUTot=128 Gres=(null) RealMemory=256000 Partitions=cpu,mixed State=IDLE\n"
        )
    ),
)
# The local cluster as scontrol printed it: node vm, 2 CPUs and 2 GPUs, in partitions debug and short
LOCAL = inventory.ClusterLimits(
    partitions=inventory.parse_partitions((RECORDED / "scontrol-show-partition.txt").read_text()),
    nodes=tuple(inventory.parse_nodes((RECORDED / "scontrol-show-node.txt").read_text())),
)
WHOLE = Resources(exclusive=True, time="01:00:00")
NO_EVIDENCE = estimate.Evidence(records={}, bench={})


def spec(seed: int = 0) -> RunSpec:
    return RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-160"), batch_size=64, seed=seed)


def whole(r: Resources, limits: inventory.ClusterLimits = SITE) -> tuple[Resources, list[str]]:
    asked, notes = plan.whole_nodes({"run": r}, limits)
    return asked["run"], notes


# --- the grid's field -------------------------------------------------------------------------------------------


def test_exclusive_is_set_in_slurm_a_rule_or_an_include_and_never_changes_run_ids():
    plain = parse_grid(AXES + "seeds: [0, 1]\n")
    g = parse_grid(
        AXES + "seeds: [0, 1]\nslurm: {exclusive: true}\n"
        "resources: [{match: {seed: 1}, exclusive: false}]\ninclude: [{seed: 7, slurm: {exclusive: false}}]\n"
    )
    assert [s.run_id for s in g.specs][:2] == [s.run_id for s in plain.specs]
    assert [g.resources[s.run_id].exclusive for s in g.specs] == [True, False, False]
    with pytest.raises(GridError, match="slurm.exclusive: must be true or false, got 'yes'"):
        parse_grid(AXES + "slurm: {exclusive: 'yes'}\n")
    with pytest.raises(GridError, match="slurm.extra: 'exclusive' has its own field; set slurm.exclusive instead"):
        parse_grid(AXES + "slurm: {extra: {exclusive: true}}\n")


# --- the node's size --------------------------------------------------------------------------------------------


def test_a_whole_node_is_every_gpu_and_cpu_and_pack_k_runs_on_each_gpu():
    r, notes = whole(WHOLE, LOCAL)  # the local cluster: one node of 2 GPUs and 2 CPUs
    assert (r.gpus_per_node, r.cpus_per_task, r.runs_per_task, r.exclusive, notes) == (2, 2, 2, True, [])
    assert whole(Resources(exclusive=True, pack=3), LOCAL)[0].runs_per_task == 6
    assert whole(Resources(exclusive=True, gpu_type="a100", pack=2, partition="gpu"))[0].runs_per_task == 8
    plain = Resources(pack=2)
    assert whole(plain)[0] is plain  # only exclusive resources change


def test_nodes_that_differ_give_what_every_one_has_with_a_note():
    r, notes = whole(dataclasses.replace(WHOLE, partition="gpu", pack=2))
    assert (r.gpus_per_node, r.cpus_per_task, r.runs_per_task) == (4, 64, 8)  # g01; g03 is down
    assert notes == [
        "note: the nodes of partition 'gpu' differ (4-8 GPUs, 64-128 CPUs): exclusive tasks ask for what every one "
        "has, 4 GPUs and 64 CPUs, and leave the rest of a larger node idle (a constraint can pick the larger nodes)"
    ]
    # a constraint narrows the nodes to those it matches
    big, notes = whole(Resources(exclusive=True, partition="gpu", constraint="big"))
    assert (big.gpus_per_node, big.cpus_per_task, notes) == (8, 128, [])


def test_gpu_runs_take_the_gpu_nodes_and_cpu_runs_a_whole_cpu_node():
    r, notes = whole(Resources(exclusive=True, partition="mixed"))  # GPU runs: the node with GPUs only
    assert (r.gpus_per_node, r.cpus_per_task, notes) == (4, 64, [])
    cpu, _ = whole(Resources(exclusive=True, partition="cpu", gpus_per_node=0, pack=8))
    assert (cpu.gpus_per_node, cpu.cpus_per_task, cpu.runs_per_task) == (0, 32, 8)  # MaxCPUsPerNode=32: K share
    with pytest.raises(ValueError, match="pack: 40 runs on a whole node of 32 CPUs leaves some run without a CPU"):
        whole(Resources(exclusive=True, partition="cpu", gpus_per_node=0, pack=40))


@pytest.mark.parametrize(
    "fields",
    [{"partition": "nowhere"}, {"partition": "cpu"}, {"partition": "gpu", "gpu_type": "v100"}, {"constraint": "x"}],
    ids=["no-partition", "no-gpus", "no-such-type", "no-node-matches"],
)
def test_where_no_node_could_take_the_task_preflight_refuses_it(fields):
    r = Resources(exclusive=True, **fields)
    assert whole(r) == (r, [])
    assert preflight.check_resources(r, SITE)  # says why, with the fix


def test_without_the_clusters_limits_exclusive_is_refused_in_one_line(tmp_path, capsys):
    data.write_synthetic("synthetic10", tmp_path / "data", train_size=64, test_size=32)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        AXES.replace("cifar10", "synthetic10") + f"root: {tmp_path / 'data'}\nresults: {tmp_path / 'results'}\n"
        "slurm: {exclusive: true}\n"
    )
    assert main(["submit", str(grid), "--executor", "slurm", "--no-preflight", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exclusive: whole nodes take the size of the partition's nodes" in err
    assert plan.whole_nodes({"run": Resources()}, None) == ({"run": Resources()}, [])  # nothing exclusive: fine


# --- local execution: the whole machine --------------------------------------------------------------------------


def test_local_execution_gives_an_exclusive_task_the_whole_machine_one_task_at_a_time():
    assert plan.local_devices(4, 10) == 4 and plan.local_devices(4, 10, whole=True) == 1
    assert plan.local_cpus(4, 32, 10) == 8 and plan.local_cpus(4, 32, 10, whole=True) == 32
    r = plan.local_resources(Resources(exclusive=True, partition="gpu", mem_gb=64, pack=2), gpus=4, cpus=32)
    assert (r.gpus_per_node, r.cpus_per_task, r.runs_per_task, r.partition, r.mem_gb) == (4, 32, 8, None, None)
    cpu = plan.local_resources(Resources(exclusive=True, pack=2), gpus=0, cpus=2)
    assert (cpu.gpus_per_node, cpu.cpus_per_task, cpu.runs_per_task) == (0, 2, 2)


def test_a_local_dry_run_says_runs_per_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # local_gpus: 2, without a GPU to read
    monkeypatch.setattr("cifarbench.system.usable_cores", lambda: 8)
    data.write_synthetic("synthetic10", tmp_path / "data", train_size=64, test_size=32)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        AXES.replace("cifar10", "synthetic10") + f"seeds: [0, 1, 2, 3, 4, 5]\nroot: {tmp_path / 'data'}\n"
        f"results: {tmp_path / 'results'}\npack: 2\nslurm: {{exclusive: true}}\n"
    )
    assert main(["submit", str(grid), "--executor", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "group 1: 2 whole-node tasks (exclusive) holding 6 runs (2 per GPU, 4 per task), 2 GPUs, 8 CPUs" in out
    assert "  note: group 1 has a task of 2 runs, not 4: the runs of its resources do not divide" in out


# --- the plan ----------------------------------------------------------------------------------------------------


def test_the_plan_packs_k_per_gpu_and_counts_every_gpu_of_the_node():
    r, _ = whole(Resources(exclusive=True, partition="gpu", gpu_type="a100", pack=2, time="01:00:00"))
    specs = [spec(s) for s in range(9)]
    tasks = plan.make_tasks(specs, {s.run_id: r for s in specs}, {}, NO_EVIDENCE)
    assert [len(t.specs) for t in tasks] == [8, 1]
    assert tasks[0].hours(3600) == 4 and tasks[0].unit == "GPU-h"  # the node's 4 GPUs for an hour
    lines = plan.describe(tasks, max_array_size=1000)
    assert lines[0].startswith(
        "group 1: 2 whole-node tasks (exclusive) holding 9 runs (2 per GPU, 8 per task), 4 GPUs (a100), 64 CPUs, "
        "all the node's memory, time 01:00:00, partition gpu; 1 array;"
    )
    assert "reserved 8.0 GPU-h" in lines[0]
    assert "  note: group 1 has a task of 1 run on a whole node of 4 GPUs: it leaves 3 of them idle" in lines


def test_a_fused_group_is_not_given_a_whole_node_of_several_gpus():
    specs = [spec(s) for s in range(2)]
    r, _ = whole(Resources(exclusive=True, partition="gpu"))
    with pytest.raises(PlanError, match="exclusive: a fused group trains on one GPU, and a whole node here has 4"):
        plan.make_tasks(specs, {s.run_id: r for s in specs}, {s.run_id: 8 for s in specs}, NO_EVIDENCE)


def test_pack_auto_plans_as_many_runs_on_every_gpu_of_the_node():
    bench = [{"what": "pack", "model": "resnet20", "batch_size": 64, "device": "NVIDIA A100", "pack": 1,
              "precision": "bf16-mixed", "images_per_s": 9000.0, "peak_memory_mb": 3000.0}]  # fmt: skip
    mem, packs = estimate.from_bench_packs(bench)
    evidence = estimate.Evidence(records={}, bench={}, memory=mem, packs=packs)
    runs = [spec(s) for s in range(40)]
    # a GPU of 40 GB (a100) holds 9 runs of 3,000 + 1,024 MiB; the node's 38 CPUs, 9 runs on each of its 4 GPUs
    r = plan.whole_node(Resources(exclusive=True, gpu_type="a100", pack="auto", time="01:00:00"), gpus=4, cpus=38)
    choice = memory.pack_size(runs, r, evidence)
    assert choice.k == 36 and "CPUs: 36 (one per run, 9 per GPU)" in choice.detail
    # fewer runs than 9 per GPU: one task holds them all, round robin over the GPUs
    tasks = plan.make_tasks(runs[:6], {s.run_id: r for s in runs}, {}, evidence)
    assert [len(t.specs) for t in tasks] == [6]
    assert (
        "holding 6 runs (1-2 per GPU, 6 per task), 4 GPUs (a100), 38 CPUs" in plan.describe(tasks, max_array_size=9)[0]
    )
    # fewer runs than GPUs: the plan says which stay idle
    assert memory.pack_size(runs[:3], r, evidence).k == 3


# --- the sbatch text ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("srun_on_path")
def test_sbatch_asks_for_the_whole_node_and_all_its_memory(tmp_path):
    r, _ = whole(Resources(exclusive=True, gpu_type="a100", partition="gpu"))
    options = sbatch_options(sbatch_text(r, tmp_path, runs=3))
    assert (options["exclusive"], options["gres"], options["cpus-per-task"], options["mem"]) == (True, "gpu:a100:4",
                                                                                                 "64", "0")  # fmt: skip
    r, _ = whole(Resources(exclusive=True, mem_gb=400), LOCAL)
    options = sbatch_options(sbatch_text(r, tmp_path, runs=3))
    assert (options["exclusive"], options["gpus-per-node"], options["mem"]) == (True, "2", "400GB")
    assert "exclusive" not in sbatch_options(sbatch_text(Resources(), tmp_path, runs=3))


# --- on the real local SLURM cluster -------------------------------------------------------------------------------


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "UP" in out.stdout


def _grid(base: Path, *, seeds: list[int], pack: int = 1) -> tuple[Path, Path, list[RunSpec]]:
    data.write_synthetic("synthetic10", base / "data", train_size=128, test_size=32)
    grid, results = base / "grid.yaml", base / "results"
    grid.write_text(
        AXES.replace("cifar10", "synthetic10") + f"epochs: 1\nseeds: {seeds}\nprecision: 32-true\npack: {pack}\n"
        f"root: {base / 'data'}\nresults: {results}\nslurm: {{exclusive: true, time: '00:10:00'}}\n"
    )
    return grid, results, list(load_grid(grid, fingerprint=fingerprint).specs)  # as submit names the runs


def _submit(grid: Path, *args: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["submit", str(grid), *args]) == 0
    return out.getvalue()


def _manifest(results: Path) -> dict:
    [manifest] = [json.loads(p.read_text()) for p in (results / "submissions").glob("*.json")]
    return manifest


def _ended(results: Path, specs: list[RunSpec]) -> list[dict] | None:
    found = [records.read_record(Layout(results).record(s.run_id)) for s in specs]
    return found if all(r and r["status"] in ("completed", "failed") for r in found) else None


def _wait(results: Path, specs: list[RunSpec], timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not (ended := _ended(results, specs)):
        assert time.monotonic() < deadline, f"the runs did not end within {timeout:.0f} s"
        time.sleep(1)
    return ended


def _cancel(results: Path) -> None:
    manifests = (results / "submissions").glob("*.json") if results.is_dir() else ()
    jobs = {e["array_job_id"] for p in manifests for e in json.loads(p.read_text())["runs"]}
    if jobs:
        subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)


def _each_on_its_gpu(log: str, specs: list[RunSpec], gpus: int) -> None:
    """The pack job's log: each worker's CUDA_VISIBLE_DEVICES, the task's GPUs round robin, one thread each."""
    devices = ",".join(str(i % gpus) for i in range(len(specs)))
    assert f"packed job: {len(specs)} runs to train (0 completed or failed), 1 thread each, GPUs {devices}" in log, log
    for i, spec in enumerate(specs):
        assert f"[{spec.run_id}] CUDA_VISIBLE_DEVICES={i % gpus}\n" in log, log


@pytest.mark.slurm
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster")
def test_a_whole_node_task_gives_each_run_a_gpu_of_its_own(tmp_path):
    # node vm: 2 CPUs and 2 fake GPUs (SLURM grants them and sets CUDA_VISIBLE_DEVICES; torch trains on the CPU)
    grid, results, specs = _grid(tmp_path, seeds=[0, 1])
    try:
        out = _submit(grid)
        assert "1 whole-node task (exclusive) holding 2 runs (1 per GPU, 2 per task), 2 GPUs, 2 CPUs" in out
        ended = _wait(results, specs)
    finally:
        _cancel(results)
    assert {(r["status"], r["alloc_gpus"], r["alloc_cpus"], r["pack_size"]) for r in ended} == {("completed", 2, 2, 2)}
    entry = _manifest(results)["runs"][0]
    script = (results / "logs" / entry["job_id"] / f"{entry['job_id']}_submission.sh").read_text()
    for line in ("--exclusive", "--gpus-per-node=2", "--cpus-per-task=2", "--mem=0"):
        assert f"\n#SBATCH {line}\n" in script, script
    _each_on_its_gpu(Path(entry["stdout"]).read_text(), specs, gpus=2)


@pytest.mark.extended
@pytest.mark.slurm
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster")
def test_pack_2_puts_two_runs_on_each_gpu_of_the_node(tmp_path):
    grid, results, specs = _grid(tmp_path, seeds=[0, 1, 2, 3], pack=2)
    try:
        assert "1 whole-node task (exclusive) holding 4 runs (2 per GPU, 4 per task), 2 GPUs" in _submit(grid)
        ended = _wait(results, specs)
    finally:
        _cancel(results)
    assert {(r["status"], r["alloc_gpus"], r["pack_size"]) for r in ended} == {("completed", 2, 4)}
    _each_on_its_gpu(Path(_manifest(results)["runs"][0]["stdout"]).read_text(), specs, gpus=2)


@pytest.mark.extended
def test_local_execution_gives_an_exclusive_task_the_whole_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # two GPUs that torch cannot use: the runs train on the CPU
    for where in ("cifarbench.system", "cifarbench.cluster.submit"):  # the plan's cores and the job's: one thread each
        monkeypatch.setattr(f"{where}.usable_cores", lambda: 2)
    grid, results, specs = _grid(tmp_path, seeds=[0, 1])
    out = _submit(grid, "--executor", "local", "--wait")
    assert "1 whole-node task (exclusive) holding 2 runs (1 per GPU, 2 per task), 2 GPUs, 2 CPUs, this machine" in out
    assert {(r["status"], r["alloc_gpus"], r["pack_size"]) for r in _ended(results, specs) or ()} == {
        ("completed", 2, 2)
    }
    _each_on_its_gpu(Path(_manifest(results)["runs"][0]["stdout"]).read_text(), specs, gpus=2)
