"""The default resources: one place (Resources), the line of docs/resources.md that states them, and the two cases
where they are fitted to the machine the runs get (a partition without GPUs, local execution)."""

import dataclasses
import re
from pathlib import Path

import pytest

from cifarbench import cli
from cifarbench.cluster import estimate, inventory, plan, preflight
from cifarbench.config.grid import parse_grid
from cifarbench.config.resources import Resources

RESOURCES_PAGE = (Path(__file__).parent.parent / "docs" / "resources.md").read_text()

GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-200]
epochs: 1
batch_sizes: [64]
seeds: [0, 1]
precision: 32-true
root: {root}
results: {results}
"""
CPU_SITE = inventory.ClusterLimits(
    partitions=inventory.parse_partitions(
        "PartitionName=cpu Default=YES MaxTime=UNLIMITED Nodes=c01 State=UP\n"
        "PartitionName=gpu Default=NO MaxTime=UNLIMITED Nodes=g01 State=UP\n"
    ),
    nodes=tuple(
        inventory.parse_nodes(
            "NodeName=c01 CPUTot=64 Gres=(null) RealMemory=256000 Partitions=cpu\n"
            "NodeName=g01 CPUTot=64 Gres=gpu:a100:4 RealMemory=512000 Partitions=gpu\n"
        )
    ),
)


def test_the_resources_page_states_the_defaults_resources_has():
    line = " ".join(
        RESOURCES_PAGE.split("A grid without `slurm:` asks each run's task for ", 1)[1].split("\n\n")[0].split()
    )
    stated = dict(re.findall(r"`(\w+): \"?([\w:.]+)\"?`", line.split(", and no `mem_gb`")[0]))
    defaults = {f.name: str(getattr(Resources(), f.name)) for f in dataclasses.fields(Resources)}
    assert stated and all(defaults[k] == v for k, v in stated.items()), (stated, defaults)
    assert Resources().mem_gb is None and Resources().partition is None


def test_a_grid_says_whether_it_sets_gpus():
    grid = GRID.format(root="data", results="results")
    assert not parse_grid(grid).gpus_set
    assert parse_grid(grid + "slurm: {gpus_per_node: 1}\n").gpus_set
    assert parse_grid(grid + "resources: [{match: {seed: 1}, gpus_per_node: 0}]\n").gpus_set
    assert not parse_grid(grid + "slurm: {cpus_per_task: 2}\n").gpus_set


def test_the_default_gpu_on_a_partition_without_gpus_becomes_cpus_with_a_note():
    g = parse_grid(GRID.format(root="data", results="results"))
    fitted, notes = preflight.without_gpus(g.resources, CPU_SITE)
    assert {r.gpus_per_node for r in fitted.values()} == {0}
    assert notes == [
        "note: the grid does not set gpus_per_node and the nodes of partition 'cpu' have no GPUs: its runs ask for "
        "none and train on CPUs (set slurm.gpus_per_node to choose)"
    ]
    tasks = plan.make_tasks(g.specs, fitted, g.fuse, estimate.Evidence.none())
    assert preflight.problems(tasks, CPU_SITE, data=False) == []
    # without the fitting, preflight refuses the default GPU there
    tasks = plan.make_tasks(g.specs, g.resources, g.fuse, estimate.Evidence.none())
    assert "slurm.gpus_per_node: 1, but the nodes of the default partition 'cpu' have no GPUs" in " ".join(
        preflight.problems(tasks, CPU_SITE, data=False)
    )
    # a partition with GPUs keeps the default; so does a grid that chose its GPUs
    on_gpus = parse_grid(GRID.format(root="data", results="results") + "slurm: {partition: gpu}\n")
    assert preflight.without_gpus(on_gpus.resources, CPU_SITE) == (dict(on_gpus.resources), [])


def test_local_resources_are_this_machines():
    r = Resources(partition="gpu", gpus_per_node=2, gpu_type="a100", pack=2, mem_gb=64, cpus_per_task=8)
    cpu = plan.local_resources(r, gpus=0, cpus=2)
    assert (cpu.gpus_per_node, cpu.gpu_type, cpu.partition, cpu.mem_gb, cpu.cpus_per_task) == (0, None, None, None, 2)
    assert plan.local_resources(r, gpus=1, cpus=16).gpus_per_node == 1
    with pytest.raises(ValueError, match="pack: auto packs runs onto a GPU, and this machine has none"):
        plan.local_resources(Resources(pack="auto"), gpus=0, cpus=2)


def test_a_local_dry_run_plans_this_machine_not_slurms_defaults(tmp_path, synthetic_root, capsys, monkeypatch):
    monkeypatch.setattr("cifarbench.system.local_gpus", lambda: 0)
    monkeypatch.setattr("cifarbench.system.usable_cores", lambda: 2)
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(root=synthetic_root, results=tmp_path / "results"))
    assert cli.main(["submit", str(path), "--executor", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "group 1: 2 tasks holding 2 runs (one run each), 0 GPUs, 2 CPUs, this machine; " in out, out
    assert "GPU-h" not in out and "partition" not in out and "array" not in out, out
