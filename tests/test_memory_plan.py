"""mem_gb: auto and pack: auto: memory and runs per GPU planned from recorded peaks; pure functions, no cluster."""

import math

import pytest

from cifarbench.cluster import estimate, inventory, memory, plan, preflight
from cifarbench.cluster.memory import BASE_MB, MEM_MARGIN, PlanError
from cifarbench.config.grid import parse_grid
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.errors import GridError
from cifarbench.store.datasets import STANDARD_IMAGES

CIFAR = sum(STANDARD_IMAGES)


def spec(model="resnet56", seed=0, batch_size=128, **kw) -> RunSpec:
    return RunSpec(model=model, dataset="cifar10", recipe=get_recipe("step-200"), batch_size=batch_size, seed=seed,
                   **kw)  # fmt: skip


def record(**kw) -> dict:
    """A completed record's summary, as read_evidence reads it: resnet56 at batch 128 on a CPU, alone."""
    base = {"run_id": "x", "status": "completed", "model": "resnet56", "dataset": "cifar10", "batch_size": 128,
            "precision": "auto", "precision_used": "32-true", "loader": "device", "compile": None,
            "epochs_done": 2, "train_seconds": 100.0, "test_seconds": 20.0, "device_name": "cpu",
            "pack_size": 1, "fuse_size": None, "alloc_cpus": 4, "alloc_gpus": 0, "train_images": 50_000,
            "test_images": 10_000, "val_split": 0, "images_per_s": 500.0, "peak_host_mb": 2000.0,
            "peak_device_mb": None}  # fmt: skip
    return base | kw


def gpu_record(**kw) -> dict:
    on_gpu = {"device_name": "NVIDIA H200", "precision_used": "bf16-mixed", "peak_host_mb": 3000.0,
              "peak_device_mb": 3000.0, "alloc_gpus": 1}  # fmt: skip
    return record(**(on_gpu | kw))


def evidence(*records, bench=()) -> estimate.Evidence:
    mem, packs = estimate.from_bench_packs(bench)
    on_records = estimate.memory_from_records(records)
    for key, found in mem.items():
        on_records.setdefault(key, []).extend(found)
    rates = estimate.packs_from_records(records)
    for key, found in packs.items():
        rates.setdefault(key, []).extend(found)
    return estimate.Evidence(records={}, bench={}, memory=on_records, packs=rates)


def asked_mb(peak: float) -> int:
    return max(memory.MIN_MEM_MB, math.ceil(peak * MEM_MARGIN / memory.MEM_STEP_MB) * memory.MEM_STEP_MB)


CPU = Resources(gpus_per_node=0, cpus_per_task=4, mem_gb="auto")
GPU = Resources(gpus_per_node=1, cpus_per_task=8, mem_gb="auto", gpu_type="h200")


def test_a_run_alone_asks_for_its_highest_peak_times_the_margin():
    ev = evidence(record(), record(peak_host_mb=2400.0), record(peak_host_mb=1800.0))
    m = memory.task_memory([spec()], CPU, ev)
    assert m.source == "records" and m.peak_mb == 2400.0 and m.mb == asked_mb(2400.0) == 3072
    assert "3 peaks of resnet56 bs 128 on cpu, 32-true: 2,400 MiB" in m.detail and "x1.25 = 3 GB" in m.detail


def test_evidence_is_of_the_same_model_batch_size_precision_and_kind_of_device():
    ev = evidence(
        record(model="resnet110", peak_host_mb=9000.0),
        record(batch_size=512, peak_host_mb=9000.0),
        record(precision_used="bf16-mixed", peak_host_mb=9000.0),  # a CPU run in bf16 is no evidence for 32-true
        gpu_record(peak_host_mb=9000.0),  # nor a GPU run's host memory for a CPU run
        record(status="failed", peak_host_mb=9000.0),
        record(peak_host_mb=None),  # written before record/6
    )
    assert memory.task_memory([spec()], CPU, ev).source == "prior"
    assert memory.task_memory([spec()], CPU, evidence(*ev_records(), record())).peak_mb == 2000.0


def ev_records():
    return [record(model="resnet110", peak_host_mb=9000.0), gpu_record(peak_host_mb=9000.0)]


def test_a_peak_measured_on_less_data_is_raised_for_the_data_the_run_holds():
    small = record(train_images=500, test_images=100)
    m = memory.task_memory([spec()], CPU, evidence(small))
    assert m.peak_mb == pytest.approx(2000.0 + (CIFAR - 600) * memory.DATA_BYTES_PER_IMAGE / 2**20)
    assert "raised for 60,000 images" in m.detail
    # and the other way round it is not lowered: the larger run's peak stands for the smaller one
    data = {("cifar10", spec().data_root): (500, 100)}
    assert memory.task_memory([spec()], CPU, evidence(record()), data=data).peak_mb == 2000.0


def test_a_pack_asks_for_the_sum_of_its_workers_and_the_job_process():
    ev = evidence(record(), record(model="resnet20", peak_host_mb=1200.0, pack_size=3))
    runs = [spec(), spec(model="resnet20"), spec(seed=1)]
    m = memory.task_memory(runs, Resources(gpus_per_node=0, cpus_per_task=3, pack=3, mem_gb="auto"), ev)
    assert m.peak_mb == 2000.0 + 1200.0 + 2000.0 + memory.SUPERVISOR_MB
    assert m.mb == asked_mb(m.peak_mb) and m.detail.startswith("3 packed runs' peaks (5,200 MiB)")


def test_a_fused_group_scales_the_part_above_the_process_base():
    group = [spec(seed=s) for s in range(4)]
    # from runs alone, on a CPU: the members' activations are host memory
    alone = memory.task_memory(group, CPU, evidence(record()), fused=True)
    assert alone.peak_mb == pytest.approx(BASE_MB + (2000.0 - BASE_MB) * 4)
    # from a fused group of 2: scaled by 4 / 2; from one of 8: as it is
    fused2 = record(fuse_size=2, peak_host_mb=3000.0)
    assert memory.task_memory(group, CPU, evidence(fused2), fused=True).peak_mb == pytest.approx(
        BASE_MB + (3000.0 - BASE_MB) * 2
    )
    fused8 = record(fuse_size=8, peak_host_mb=5000.0)
    assert memory.task_memory(group, CPU, evidence(fused2, fused8), fused=True).peak_mb == 5000.0
    # on a GPU the activations are device memory: one process's host memory
    assert memory.task_memory(group, GPU, evidence(gpu_record()), fused=True).peak_mb == 3000.0


def test_without_evidence_a_prior_per_model_family_and_kind_of_device():
    deep, wide = (
        memory.task_memory([spec("resnet110")], CPU, estimate.Evidence.none()),
        memory.task_memory([spec("resnet50")], CPU, estimate.Evidence.none()),
    )
    assert deep.source == wide.source == "prior"
    assert "cifar ResNets on a CPU" in deep.detail and "imagenet ResNets on a CPU" in wide.detail
    assert memory.task_memory([spec("resnet20")], CPU, estimate.Evidence.none()).mb < deep.mb
    on_gpu = memory.task_memory([spec()], GPU, estimate.Evidence.none())
    assert on_gpu.peak_mb == memory.PRIOR_GPU_HOST_MB


GRID = """\
models: [resnet56]
datasets: [cifar10]
opts: [step-200]
batch_sizes: [128]
seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""


def test_the_dry_run_shows_each_groups_memory_and_where_it_came_from():
    g = parse_grid(GRID + "slurm: {gpus_per_node: 0, cpus_per_task: 4, mem_gb: auto, time: auto}\n")
    tasks = plan.make_tasks(g.specs, g.resources, g.fuse, evidence(record(peak_host_mb=2400.0)))
    assert {t.resources.mem_gb for t in tasks} == {3.0}
    lines = plan.describe(tasks, max_array_size=1000)
    assert ", 3 GB (auto), time" in lines[0]
    assert lines[1] == "  memory: records: 1 peak of resnet56 bs 128 on cpu, 32-true: 2,400 MiB; x1.25 = 3 GB"


def test_preflight_names_the_auto_request_against_the_nodes_memory():
    limits = inventory.ClusterLimits(
        partitions={
            "cpu": inventory.Partition(
                name="cpu",
                default=True,
                state="UP",
                max_time=None,
                max_cpus_per_node=None,
                max_mem_per_node_mb=None,
                max_mem_per_cpu_mb=1000,
            ),
        },
        nodes=(inventory.Node(name="n1", cpus=8, memory_mb=2500, gpus=0, partitions=("cpu",)),),
    )
    g = parse_grid(GRID + "slurm: {gpus_per_node: 0, cpus_per_task: 4, mem_gb: auto}\n")
    big = plan.make_tasks(g.specs, g.resources, g.fuse, evidence(record(peak_host_mb=2400.0)))
    [line] = preflight.problems(big, limits, data=False)
    assert line.startswith("slurm.mem_gb: auto asks 3 GB (records: 1 peak of resnet56") and "(2500 MB)" in line
    assert "\n" not in line
    # 2 GB fits a node, but not MaxMemPerCPU x 2 CPUs: SLURM would hand the task more CPUs
    g = parse_grid(GRID + "slurm: {gpus_per_node: 0, cpus_per_task: 2, mem_gb: auto}\n")
    small = plan.make_tasks(g.specs, g.resources, g.fuse, evidence(record(peak_host_mb=1500.0)))
    [line] = preflight.problems(small, limits, data=False)
    assert "auto asks 2 GB" in line and "MaxMemPerCPU (1000 MB) x 2 CPUs" in line and "cpus_per_task: 3" in line
    assert preflight.problems(small, None, data=False) == []


def test_max_mem_per_cpu_is_read_from_scontrol():
    text = "PartitionName=p MaxNodes=UNLIMITED MaxTime=01:00:00 MaxMemPerCPU=4000 State=UP\n"
    assert inventory.parse_partitions(text)["p"].max_mem_per_cpu_mb == 4000


# --- pack: auto ---------------------------------------------------------------------------------------------


def bench_pack(k: int, images_per_s: float, peak_mb: float | None = None) -> dict:
    return {"what": "pack", "model": "resnet56", "dataset": "synthetic10", "batch_size": 128, "pack": k,
            "images_per_s": images_per_s, "peak_memory_mb": peak_mb if peak_mb is not None else 2500.0 * k,
            "device": "NVIDIA H200", "precision": "bf16-mixed"}  # fmt: skip


def test_pack_auto_fits_device_memory_and_stops_where_throughput_stops_growing():
    runs = [spec(seed=s) for s in range(40)]
    r = Resources(gpus_per_node=1, cpus_per_task=32, gpu_type="h200", pack="auto")
    # memory alone: 141 GB less 10% in runs of 3,000 MiB peak + 1,024 per process -> 32
    choice = memory.pack_size(runs, r, evidence(gpu_record()))
    assert choice.k == 32 and "memory: 32 (32 per GPU of 141 GB (h200)" in choice.detail
    assert "throughput measured at 1 run per GPU only" in choice.detail
    # one CPU per run
    assert memory.pack_size(runs, Resources(gpus_per_node=1, cpus_per_task=6, gpu_type="h200", pack="auto"),
                            evidence(gpu_record())).k == 6  # fmt: skip
    # measured throughput: 1 run 10k images/s, 2 at once 17k, 4 at once 21k, 8 at once 21.5k -> 4 is within 5%
    curve = [bench_pack(1, 10_000), bench_pack(2, 17_000), bench_pack(4, 21_000), bench_pack(8, 21_500)]
    choice = memory.pack_size(runs, r, evidence(gpu_record(), bench=curve))
    assert choice.k == 4 and "throughput: 4 (no gain past 4 per GPU" in choice.detail
    # still gaining at the most runs measured: no cap from throughput
    rising = [bench_pack(1, 10_000), bench_pack(2, 19_000)]
    assert memory.pack_size(runs, r, evidence(gpu_record(), bench=rising)).k == 32


def test_pack_auto_uses_the_largest_peak_of_its_runs_and_bench_peaks_too():
    r = Resources(gpus_per_node=1, cpus_per_task=64, gpu_mem_gb=40, pack="auto")
    only_bench = evidence(bench=[bench_pack(4, 20_000, peak_mb=4 * 8000.0)])  # 8,000 MiB per run
    assert memory.pack_size([spec(seed=s) for s in range(10)], r, only_bench).k == int(40 * 1024 * 0.9 // 9024)
    mixed = evidence(gpu_record(), gpu_record(model="resnet110", peak_device_mb=12_000.0))
    runs = [spec(), spec("resnet110")] * 3
    assert memory.pack_size(runs, r, mixed).k == int(40 * 1024 * 0.9 // 13_024)


def test_pack_auto_refuses_without_device_memory_evidence_naming_the_command():
    r = Resources(gpus_per_node=1, gpu_type="h200", pack="auto")
    cpu_only = evidence(record())
    with pytest.raises(PlanError) as e:
        memory.pack_size([spec()], r, cpu_only)
    said = str(e.value)
    assert "no GPU memory was measured for resnet56 at batch size 128" in said and "\n" not in said
    assert "cifarbench bench --what pack --model resnet56 --batch-size 128" in said


@pytest.mark.parametrize(
    ("fields", "gb", "said"),
    [
        ({"gpu_type": "h200"}, 141, "141 GB (h200)"),
        ({"gpu_type": "a100"}, 40, "set gpu_mem_gb: 80 for the 80 GB part"),
        ({"gpu_type": "a100_80gb"}, 80, "80 GB (a100_80gb)"),
        ({"gpu_type": "tesla-v100-32g"}, 32, "32 GB"),
        ({"gpu_type": "a100", "gpu_mem_gb": 80}, 80, "gpu_mem_gb 80"),
    ],
)
def test_a_gpus_memory_comes_from_gpu_mem_gb_or_its_type(fields, gb, said):
    mb, text = memory.gpu_memory_mb(Resources(gpus_per_node=1, **fields))
    assert mb == gb * 1024 and said in text


def test_an_unknown_gpu_type_asks_for_gpu_mem_gb():
    with pytest.raises(PlanError, match="gpu_type 'mystery' is not one cifarbench knows the memory of; set slurm.gpu_"):
        memory.gpu_memory_mb(Resources(gpus_per_node=1, gpu_type="mystery"))


def test_pack_auto_in_a_grid_plans_the_tasks_and_the_dry_run_says_why():
    g = parse_grid(GRID + "slurm: {gpus_per_node: 1, cpus_per_task: 4, gpu_type: h200, time: auto}\npack: auto\n")
    tasks = plan.make_tasks(g.specs, g.resources, g.fuse, evidence(gpu_record()))
    assert [len(t.specs) for t in tasks] == [4, 4, 2] and {t.resources.pack for t in tasks} == {4}
    lines = plan.describe(tasks, max_array_size=1000)
    assert "(packed 4 per task)" in lines[0]
    assert lines[1].startswith("  pack auto: 4 = the least of memory: 32 (32 per GPU of 141 GB (h200)")
    assert "CPUs: 4 (one per run)" in lines[1]


def test_pack_auto_is_for_gpus_and_errors_are_one_line():
    with pytest.raises(GridError, match="pack: auto fits runs into a GPU's memory, but gpus_per_node is 0"):
        parse_grid(GRID + "slurm: {gpus_per_node: 0}\npack: auto\n")
    with pytest.raises(GridError, match='mem_gb: must be a positive number of gigabytes or "auto"'):
        parse_grid(GRID + "slurm: {mem_gb: lots}\n")
    with pytest.raises(GridError, match="gpu_mem_gb: gives the GPUs' memory, but gpus_per_node is 0"):
        parse_grid(GRID + "slurm: {gpus_per_node: 0, gpu_mem_gb: 80}\n")


def test_read_evidence_takes_peaks_from_records_and_bench_pack_tables(write_records, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cifarbench.store.layout import Layout

    results = write_records(
        [{"model": "resnet56", "batch_size": 128, "dataset": "cifar10", "device_name": "cpu", "peak_host_mb": 1500.0,
          "train_images": 50_000, "test_images": 10_000}]
    )  # fmt: skip
    Layout(results).bench.mkdir(parents=True)
    rows = [bench_pack(1, 10_000), bench_pack(2, 17_000), bench_pack(4, 21_000), bench_pack(8, 21_500)]
    pq.write_table(pa.Table.from_pylist(rows), Layout(results).bench / "pack.parquet")
    ev = estimate.read_evidence(results)
    assert memory.task_memory([spec()], CPU, ev).peak_mb == 1500.0
    r = Resources(gpus_per_node=1, cpus_per_task=16, gpu_type="h200", pack="auto")
    choice = memory.pack_size([spec(seed=s) for s in range(16)], r, ev)  # 2,500 MiB a run, as bench measured
    assert choice.k == 4 and "4 peaks on NVIDIA H200" in choice.detail
