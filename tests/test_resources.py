"""Resources per run (rules, include entries), time estimates and time limits: pure functions, no cluster."""

import dataclasses
import re

import pytest

from cifarbench.cluster import estimate, plan, submit
from cifarbench.config.grid import parse_grid
from cifarbench.config.resources import Resources, format_time, parse_time
from cifarbench.config.spec import ARCHS, RunSpec, get_recipe
from cifarbench.errors import GridError

GRID = """\
models: [resnet20, resnet110, resnet1202]
datasets: [cifar10]
opts: [step-200]
batch_sizes: [128, 256]
slurm: {time: "04:00:00", mem_gb: 16, partition: gpu}
"""


def by_model(grid):
    return {(s.model, s.batch_size): grid.resources[s.run_id] for s in grid.specs}


def test_without_rules_every_run_gets_the_slurm_block():
    g = parse_grid(GRID)
    assert set(by_model(g).values()) == {Resources(time="04:00:00", mem_gb=16, partition="gpu")}


def test_rules_apply_in_order_and_later_ones_override_the_fields_they_set():
    g = parse_grid(
        GRID
        + """resources:
  - match: {model: [resnet110, resnet1202]}
    time: "2-00:00:00"
    mem_gb: 64
  - match: {model: resnet1202, batch_size: 256}
    constraint: "a100|h100"
    mem_gb: 128
"""
    )
    r = by_model(g)
    assert r["resnet20", 128] == r["resnet20", 256] == Resources(time="04:00:00", mem_gb=16, partition="gpu")
    assert r["resnet110", 256] == Resources(time="2-00:00:00", mem_gb=64, partition="gpu")
    assert r["resnet1202", 128] == Resources(time="2-00:00:00", mem_gb=64, partition="gpu")
    assert r["resnet1202", 256] == Resources(time="2-00:00:00", mem_gb=128, partition="gpu", constraint="a100|h100")


def test_an_include_entrys_own_slurm_comes_last():
    g = parse_grid(
        GRID
        + """resources: [{match: {model: resnet20}, time: "01:00:00", cpus_per_task: 2}]
include:
  - {model: resnet20, batch_size: 64, slurm: {time: "00:30:00"}}
"""
    )
    r = by_model(g)
    assert r["resnet20", 64] == Resources(time="00:30:00", mem_gb=16, partition="gpu", cpus_per_task=2)
    assert r["resnet20", 128].time == "01:00:00"


@pytest.mark.parametrize(
    "match, matched",
    [
        ("{opt: step-200}", 6),
        ("{opt: [cos-200]}", 0),
        ("{dataset: cifar10, seed: 0}", 6),
        ("{batch_size: [128]}", 3),
        ("{precision: auto}", 6),
        ("{epochs: 200}", 6),  # the recipe's own length matches a run that does not shorten it
        ("{epochs: 2}", 0),
        ("{compile: false}", 6),
        ("{loader: torchvision}", 0),
    ],
)
def test_match_takes_any_run_field(match, matched):
    g = parse_grid(GRID + f"resources: [{{match: {match}, qos: high}}]\n")
    assert sum(r.qos == "high" for r in g.resources.values()) == matched


def test_resources_do_not_change_run_ids():
    plain = parse_grid(GRID)
    ruled = parse_grid(GRID + 'resources: [{match: {model: resnet20}, time: "00:10:00", mem_gb: 2}]\n')
    assert [s.run_id for s in plain.specs] == [s.run_id for s in ruled.specs]


@pytest.mark.parametrize(
    "rules, message",
    [
        ("[{match: {modle: resnet20}, time: auto}]", "resources[0].match: unknown key 'modle' (did you mean 'model'?)"),
        ("[{match: {model: resnet21}, time: auto}]", "resources[0].match.model: unknown model 'resnet21'"),
        ("[{match: {model: resnet20}, tiem: auto}]", "resources[0]: unknown key 'tiem' (did you mean 'time'?)"),
        ("[{match: {model: resnet20}}]", "resources[0]: a rule sets some of"),
        ("[{time: auto}]", "resources[0].match: a rule needs a mapping of run fields"),
        ("[{match: {model: []}, time: auto}]", "resources[0].match.model: an empty list matches no run"),
        ("[{match: {model: resnet20}, time: 60}]", "resources[0].time: got the bare number 60"),
        ("[{match: {model: resnet20}, time: soon}]", "resources[0].time: 'soon' is not a time limit"),
        ("[{match: {model: resnet20}, time_margin: 0.5}]", "resources[0].time_margin: must be a number from 1 to 100"),
        ("[{match: {opt: step-300}, time: auto}]", "resources[0].match.opt: unknown recipe 'step-300'"),
        ("[{match: {batch_size: big}, time: auto}]", "resources[0].match.batch_size: must be an integer"),
        ("{match: {model: resnet20}}", "resources: must be a list"),
    ],
)
def test_bad_rules_are_one_line_errors(rules, message):
    with pytest.raises(GridError) as e:
        parse_grid(GRID + f"resources: {rules}\n", source="g.yaml")
    assert str(e.value).startswith("g.yaml: ") and message in str(e.value) and "\n" not in str(e.value)


def test_a_bad_include_slurm_field_names_its_entry():
    with pytest.raises(GridError, match=r"include\[0\]\.slurm\.mem_gb: must be a positive number"):
        parse_grid(GRID + "include: [{model: resnet20, batch_size: 64, slurm: {mem_gb: -1}}]\n")


# --- estimates ---------------------------------------------------------------------------------------------


def spec(model="resnet56", seed=0, **kw) -> RunSpec:
    return RunSpec(model=model, dataset="cifar100", recipe=get_recipe("step-200"), batch_size=64, seed=seed, **kw)


def record(**kw) -> dict:
    base = {"run_id": "x", "status": "completed", "model": "resnet56", "dataset": "cifar100", "batch_size": 64,
            "precision": "auto", "precision_used": "bf16-mixed", "loader": "device", "compile": None,
            "epochs_done": 10, "train_seconds": 100.0, "test_seconds": 20.0, "device_name": "NVIDIA H100",
            "pack_size": 1, "fuse_size": None, "alloc_cpus": 8}  # fmt: skip
    return base | kw


def evidence(*records, bench=()) -> estimate.Evidence:
    return estimate.Evidence(
        records=estimate.samples_from_records(records), bench=estimate.samples_from_bench(list(bench))
    )


GPU, CPU = Resources(), Resources(gpus_per_node=0, cpus_per_task=4)
BENCH_ROW = {"what": "train", "variant": "lightning fit", "images_per_s": 5000.0, "eval_images_per_s": 20000.0,
             "model": "resnet56", "dataset": "synthetic100", "batch_size": 64, "precision": "bf16-mixed",
             "device": "NVIDIA H200", "torch_threads": 16}  # fmt: skip


def per_epoch(est: estimate.Estimate, epochs: int = 200) -> float:
    return (est.seconds - estimate.START_S) / epochs


def test_records_give_seconds_per_epoch_and_the_slowest_gpu_counts():
    ev = evidence(
        record(),
        record(train_seconds=120.0),
        record(train_seconds=140.0),  # H100 median: (120 + 20) / 10 = 14 s/epoch
        record(device_name="NVIDIA A100", train_seconds=180.0),  # 20 s/epoch: the slowest GPU counts
        record(status="failed", train_seconds=10_000.0),  # failed runs say nothing about speed
        record(batch_size=128, train_seconds=50.0),
    )
    est = estimate.estimate_task([spec()], GPU, ev)
    assert est.source == "records" and per_epoch(est) == pytest.approx(20.0)
    assert "1 record on NVIDIA A100, bf16-mixed: 20.0 s/epoch" in est.detail


def test_a_named_gpu_type_takes_its_own_rows_first():
    ev = evidence(record(), record(device_name="NVIDIA A100", train_seconds=180.0))
    typed = estimate.estimate_task([spec()], Resources(gpu_type="h100"), ev)
    assert per_epoch(typed) == pytest.approx(12.0) and "NVIDIA H100 (h100)" in typed.detail
    absent = estimate.estimate_task([spec()], Resources(gpu_type="v100"), ev)
    assert per_epoch(absent) == pytest.approx(20.0) and "(none of v100)" in absent.detail


def test_a_cpu_record_is_never_evidence_for_a_gpu_run_and_the_other_way_round():
    # the reproduction: one smoke run on a CPU planned a GPU grid of the same model at CPU speed
    cpu_record = record(device_name="cpu", precision_used="32-true", train_seconds=3000.0, alloc_cpus=2)
    gpu = estimate.estimate_task([spec()], GPU, evidence(cpu_record))
    assert gpu.source == "prior" and "GPU" in gpu.detail
    cpu = estimate.estimate_task([spec()], CPU, evidence(record(), cpu_record))
    # (3000 + 20) / 10 = 302 s/epoch on 2 cores; on the 4 asked for, half
    assert cpu.source == "records" and per_epoch(cpu) == pytest.approx(151.0)
    assert "on cpu, 32-true, scaled from 2 to 4 cores: 151.0 s/epoch" in cpu.detail


def test_evidence_is_grouped_by_the_precision_used():
    ev = evidence(record(precision_used="32-true", train_seconds=400.0), record(precision_used="16-mixed"))
    auto = estimate.estimate_task([spec()], GPU, ev)  # auto on a GPU: bf16-mixed, else 16-mixed; never 32-true
    assert per_epoch(auto) == pytest.approx(12.0) and "16-mixed" in auto.detail
    fp32 = estimate.estimate_task([spec(precision="32-true")], GPU, ev)
    assert per_epoch(fp32) == pytest.approx(42.0)
    # an older GPU record of precision auto does not say which it trained in: no evidence
    assert estimate.estimate_task([spec()], GPU, evidence(record(precision_used=None))).source == "prior"


def test_start_up_comes_from_the_records_wall_time_where_they_have_it():
    # 30 s and 5 s outside their epochs: the longest counts (a fresh process pays for its imports)
    ev = evidence(record(wall_seconds=150.0), record(wall_seconds=125.0))
    measured = estimate.estimate_task([spec()], GPU, ev)
    assert measured.seconds == pytest.approx(30.0 + 200 * 12.0) and "start-up 30 s" in measured.detail
    assert estimate.estimate_task([spec()], GPU, evidence(record())).seconds == pytest.approx(
        estimate.START_S + 200 * 12.0
    )


def test_evidence_is_projected_onto_the_images_a_run_will_take():
    # the reproduction: a record of a 500-image synthetic set planned a 5,000-image one as if it were as small
    small = record(dataset="synthetic10", train_images=500, test_images=100, train_seconds=10.0, test_seconds=2.0)
    s = dataclasses.replace(spec(), dataset="synthetic10")
    data = {(s.dataset, s.data_root): (5_000, 1_000)}
    est = estimate.estimate_task([s], GPU, evidence(small), data=data)
    assert per_epoch(est) == pytest.approx(10 * (12.0 / 10))  # (10 + 2) s over 10 epochs, ten times the images
    assert "scaled from 500 + 100 to 5,000 + 1,000 images: 12.0 s/epoch" in est.detail
    same = estimate.estimate_task([s], GPU, evidence(small), data={(s.dataset, s.data_root): (500, 100)})
    assert per_epoch(same) == pytest.approx(1.2) and "scaled" not in same.detail
    # a validation split takes its images from training; an older record trained on CIFAR's own
    held = dataclasses.replace(s, val_split=1_000)
    assert estimate.planned_images(held, data) == (4_000, 1_000)
    assert estimate.planned_images(spec(), None) == (50_000, 10_000)
    old = estimate.estimate_task(
        [spec()], GPU, evidence(record()), data={(spec().dataset, spec().data_root): (5_000, 1_000)}
    )
    assert per_epoch(old) == pytest.approx(10.0 / 10 + 2.0 / 10) and "scaled from 50,000 + 10,000" in old.detail
    # the prior counts the images too
    prior = estimate.estimate_task([s], GPU, estimate.Evidence.none(), data=data)
    full = estimate.estimate_task([s], GPU, estimate.Evidence.none())
    assert per_epoch(prior) == pytest.approx(per_epoch(full) / 10) and "5,000 + 1,000 images" in prior.detail


def test_an_older_record_without_test_time_is_charged_a_share_of_its_training_time():
    est = estimate.estimate_task([spec()], GPU, evidence(record(test_seconds=None)))
    assert per_epoch(est) == pytest.approx(10.0 * (1 + estimate.TEST_SHARE_OF_TRAINING))


def test_the_estimate_prefers_records_then_bench_then_the_prior():
    ev = evidence(record(), bench=[BENCH_ROW])
    from_records = estimate.estimate_task([spec()], GPU, ev)
    assert from_records.source == "records" and from_records.seconds == pytest.approx(estimate.START_S + 200 * 12.0)
    from_bench = estimate.estimate_task([spec()], GPU, evidence(bench=[BENCH_ROW]))
    assert from_bench.source == "bench" and "NVIDIA H200, bf16-mixed" in from_bench.detail
    assert per_epoch(from_bench) == pytest.approx(50_000 / 5000 + 10_000 / 20_000)
    prior = estimate.estimate_task([spec()], GPU, estimate.Evidence.none())
    flops = (50_000 * 6 + 10_000 * 2) * ARCHS["resnet56"].macs / estimate.PRIOR_FLOPS["gpu"]
    assert prior.source == "prior" and per_epoch(prior) == pytest.approx(flops)
    # the torchvision loader is not what bench measures; a compiled run is not an eager one; a GPU row is no CPU's
    assert estimate.estimate_task([spec(loader="torchvision")], GPU, ev).source == "prior"
    assert estimate.estimate_task([spec(compile="default")], GPU, ev).source == "prior"
    assert estimate.estimate_task([spec()], CPU, evidence(bench=[BENCH_ROW])).source == "prior"


def test_the_cpu_prior_scales_with_the_cores_asked_for():
    one = estimate.estimate_task([spec()], Resources(gpus_per_node=0, cpus_per_task=1), estimate.Evidence.none())
    four = estimate.estimate_task([spec()], CPU, estimate.Evidence.none())
    assert per_epoch(one) == pytest.approx(4 * per_epoch(four))


def test_a_fused_group_without_evidence_of_its_own_assumes_no_gain():
    # the reproduction: 5 fused resnet56 seeds were given one run's estimate x 1.5
    members = [spec(seed=s) for s in range(5)]
    ev = evidence(record())
    group = estimate.estimate_task(members, GPU, ev, fused=True)
    assert per_epoch(group) == pytest.approx(5 * 12.0)
    assert "fused x5, no gain assumed: 5 x one run alone" in group.detail


def test_a_fused_group_takes_fused_evidence_of_its_k_or_the_nearest_k():
    members = [spec(seed=s) for s in range(5)]
    own = evidence(record(), record(fuse_size=5, train_seconds=280.0))  # the group's epoch: 30 s
    assert per_epoch(estimate.estimate_task(members, GPU, own, fused=True)) == pytest.approx(30.0)
    smaller = evidence(record(fuse_size=4, train_seconds=220.0))  # 24 s for 4: scaled to 5, 30 s
    est = estimate.estimate_task(members, GPU, smaller, fused=True)
    assert per_epoch(est) == pytest.approx(30.0) and "fused x5 from fused x4, x5/4" in est.detail
    larger = evidence(record(fuse_size=8, train_seconds=380.0), record(fuse_size=2, train_seconds=100.0))
    assert per_epoch(estimate.estimate_task(members, GPU, larger, fused=True)) == pytest.approx(40.0)
    # a fused member's record holds its group's time: it is no evidence for a run alone
    assert estimate.estimate_task([spec()], GPU, own).source == "records"
    assert per_epoch(estimate.estimate_task([spec()], GPU, own)) == pytest.approx(12.0)
    assert estimate.estimate_task([spec()], GPU, larger).source == "prior"


def test_a_pack_uses_packed_evidence_as_measured_else_k_times_one_run_alone():
    pack4 = Resources(pack=4)
    runs = [spec(seed=s) for s in range(4)]
    packed = evidence(record(), record(pack_size=4, train_seconds=280.0))  # each run 30 s/epoch while packed
    est = estimate.estimate_task(runs, pack4, packed)
    assert per_epoch(est) == pytest.approx(30.0) and "packed 4 per task: 1 record" in est.detail
    alone = estimate.estimate_task(runs, pack4, evidence(record()))
    assert per_epoch(alone) == pytest.approx(4 * 12.0) and "no gain assumed" in alone.detail
    # on two GPUs (a whole node's, say) two of the four train on each, side by side with the other two
    two = estimate.estimate_task(runs, Resources(pack=4, gpus_per_node=2), evidence(record()))
    assert per_epoch(two) == pytest.approx(2 * 12.0) and "no gain assumed: 2 per GPU on 2 x one run" in two.detail
    # a packed record is no evidence for a run alone
    assert estimate.estimate_task([spec()], GPU, evidence(record(pack_size=4))).source == "prior"


def test_a_task_of_runs_of_several_lengths_lasts_as_long_as_its_longest():
    long, short = spec(model="resnet110"), spec(model="resnet20")
    est = estimate.estimate_task([short, long], Resources(pack=2), estimate.Evidence.none())
    alone = estimate.estimate_task([long], GPU, estimate.Evidence.none())
    assert per_epoch(est) == pytest.approx(2 * per_epoch(alone)) and "the longest of 2 runs" in est.detail


@pytest.mark.parametrize(
    "estimate_s, margin, max_time, expected",
    [
        (60, 1.5, None, (600, False)),  # at least 10 minutes
        (1000, 1.5, None, (1500, False)),  # 1500 s: already on a 5-minute step
        (1001, 1.5, None, (1800, False)),  # rounded up to 5 minutes
        (3600, 2.0, None, (7200, False)),
        (10 * 3600, 1.5, 8 * 3600, (8 * 3600, True)),  # the partition's MaxTime caps it
        (3600, 1.5, 8 * 3600, (5400, False)),
    ],
)
def test_time_limit(estimate_s, margin, max_time, expected):
    assert estimate.time_limit(estimate_s, margin, max_time) == expected


def tasks_of(g, max_time=None, ev=None) -> list[plan.Task]:
    return plan.make_tasks(g.specs, g.resources, g.fuse, ev or estimate.Evidence.none(), max_time)


def test_time_auto_becomes_a_limit_and_a_budget():
    g = parse_grid(GRID + "resources: [{match: {model: resnet20}, time: auto, time_margin: 2}]\n")
    tasks = tasks_of(g, {("gpu", None): 3600})
    auto = [t for t in tasks if t.specs[0].model == "resnet20"]
    assert all(t.auto and t.resources.time != "auto" for t in auto)
    for t in auto:
        wanted, capped = estimate.time_limit(t.estimate.seconds, 2, 3600)
        assert t.resources.seconds == wanted and t.capped == capped
        assert t.budget.time_limit_s == wanted and t.budget.estimated_s == pytest.approx(t.estimate.seconds, abs=0.1)
        assert t.budget.estimate_source.startswith("prior: 200 epochs")
    fixed = [t for t in tasks if t.specs[0].model != "resnet20"]
    assert all(not t.auto and t.resources.time == "04:00:00" and t.budget.time_limit_s == 4 * 3600 for t in fixed)


def test_a_fused_groups_limit_is_its_tasks_not_one_runs():
    # the reproduction: 5 fused resnet56 seeds with time: auto got one run's estimate x 1.5
    grid = GRID.replace("[resnet20, resnet110, resnet1202]", "[resnet56]").replace("[128, 256]", "[64]")
    g = parse_grid(grid + "seeds: [0, 1, 2, 3, 4]\nfuse: seeds\nresources: [{match: {model: resnet56}, time: auto}]\n")
    ev = evidence(record(batch_size=64, dataset="cifar10", train_seconds=100.0, test_seconds=20.0))  # 12 s/epoch
    [task] = tasks_of(g, ev=ev)
    assert task.fused and len(task.specs) == 5
    assert task.estimate.seconds == pytest.approx(estimate.START_S + 200 * 5 * 12.0)
    assert task.resources.seconds == estimate.time_limit(task.estimate.seconds, 1.5, None)[0]
    assert task.budget.estimate_source.startswith("records: 200 epochs; fused x5, no gain assumed")


def test_runs_in_packs_share_their_tasks_limit_and_reserve_it_once():
    g = parse_grid(GRID.replace("[128, 256]", "[128]") + "seeds: [0, 1, 2, 3]\npack: 4\n"
                   "resources: [{match: {model: resnet20}, time: auto}]\n")  # fmt: skip
    tasks = tasks_of(g)
    assert [(t.specs[0].model, len(t.specs)) for t in tasks] == [("resnet20", 4), ("resnet1202", 4), ("resnet110", 4)]
    lines = plan.describe(tasks, max_array_size=1000)
    r20 = tasks[0]
    # 8 runs of 04:00:00 packed 4 per task: two allocations, 8 GPU-h reserved, not 32 (the longest runs first)
    assert (
        lines[1].startswith("group 2: 2 tasks holding 8 runs (packed 4 per task), 1 GPU") and "reserved 8.0" in lines[1]
    )
    assert f"reserved {r20.resources.seconds / 3600:.1f} GPU-h" in lines[0]


def test_groups_describe_tasks_runs_resources_and_hours():
    g = parse_grid(GRID + 'resources: [{match: {model: resnet1202}, time: "2-00:00:00", gpus_per_node: 2, pack: 2}]\n')
    tasks = tasks_of(g)
    assert [len(members) for members in plan.arrays(tasks).values()] == [4, 1]
    lines = plan.describe(tasks, max_array_size=3)
    assert lines[0].startswith(
        "group 1: 4 tasks holding 4 runs (one run each), 1 GPU, 4 CPUs, 16 GB, time 04:00:00, partition gpu; 2 arrays;"
    )
    assert "reserved 16.0 GPU-h" in lines[0] and "estimates: 4 from prior" in lines[0]
    # one task of 2 GPUs for 48 hours: 96 GPU-h, whatever it holds
    assert (
        lines[1].startswith("group 2: 1 task holding 2 runs (packed 2 per task), 2 GPUs")
        and "reserved 96.0" in lines[1]
    )
    assert lines[-1].startswith("total: 6 runs in 5 tasks, 2 groups, 3 arrays;") and "reserved GPU-h 112.0" in lines[-1]


def test_a_fixed_time_below_the_estimate_is_warned_about_per_group():
    g = parse_grid(
        GRID.replace('time: "04:00:00"', 'time: "00:30:00"') + "resources: [{match: {model: resnet20}, time: auto}]\n"
    )
    tasks = tasks_of(g)
    [short] = plan.short_limits(tasks)  # one line for the group of resnet110 and resnet1202, none for time: auto
    longest = max(tasks, key=lambda t: t.estimate.seconds)
    assert longest.specs[0].model == "resnet1202"
    estimated = format_time(round(longest.estimate.seconds))
    assert short.startswith(f"group 2's time 00:30:00 is below its longest task's estimate, {estimated} (prior), ")
    assert short.endswith("its tasks would reach the limit and requeue; use time: auto, or a longer time")
    assert f"  warning: {short}" in plan.describe(tasks, max_array_size=1000)
    resnet20 = GRID.replace("[resnet20, resnet110, resnet1202]", "[resnet20]")
    assert plan.short_limits(tasks_of(parse_grid(resnet20))) == []  # 4 hours are enough


def test_a_capped_group_is_warned_about():
    g = parse_grid(GRID + "resources: [{match: {model: resnet1202}, time: auto}]\n")
    lines = plan.describe(tasks_of(g, {("gpu", None): 3600}), max_array_size=1000)
    assert any("warning" in line and "MaxTime" in line and "01:00:00" in line for line in lines)


@pytest.mark.parametrize(
    "slurm, message",
    [
        ("gpus_per_node: 2", "gpus_per_node: 2 GPUs per task, but a run trains on one GPU"),
        ("gpus_per_node: 4, pack: 2", "pack: 2 would leave 2 GPUs idle; ask for gpus_per_node: 1, pack: 4"),
        ("gpus_per_node: 2, pack: 2", None),
    ],
)
def test_gpus_a_task_would_leave_idle_are_refused(slurm, message):
    grid = (
        GRID.replace("[128, 256]", "[128]") + f"seeds: [0, 1]\nresources: [{{match: {{model: resnet20}}, {slurm}}}]\n"
    )
    if message is None:
        assert len(parse_grid(grid).specs) == 6
        return
    with pytest.raises(GridError, match=re.escape(message)):
        parse_grid(grid)
    fused = (
        GRID.replace("[128, 256]", "[128]")
        + "seeds: [0, 1]\nfuse: seeds\nresources: [{match: {model: resnet20}, gpus_per_node: 2, pack: 2}]\n"
    )
    with pytest.raises(GridError, match="a fused group trains on one GPU"):
        parse_grid(fused)


def test_format_time_round_trips():
    for text in ("00:10:00", "04:00:00", "1-00:00:00", "2-03:04:05"):
        assert format_time(parse_time(text)) == text


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            "sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: "
            "Invalid partition name specified",
            "sbatch refused the job: Batch job submission failed: Invalid partition name specified; `sinfo -s`",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds "
            "some limit)",
            "Requested time limit is invalid (missing or exceeds some limit); the partition's MaxTime",
        ),
        (
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
            "Unable to contact slurm controller (connect failure); is the cluster up",
        ),
        ("sbatch: error: Batch job submission failed: Something new", "Something new"),
    ],
)
def test_sbatch_refusals_are_one_line_with_the_hint_that_fits(error, expected):
    said = submit.refusal(error)
    assert expected in said and "\n" not in said
    if "Something new" in error:
        assert said == "sbatch refused the job: Batch job submission failed: Something new"


def test_tasks_keep_the_specs_unchanged():
    g = parse_grid(GRID + "resources: [{match: {model: resnet20}, time: auto}]\n")
    tasks = tasks_of(g)
    assert sorted(s.run_id for t in tasks for s in t.specs) == sorted(s.run_id for s in g.specs)
    assert all(dataclasses.replace(t.resources, time="auto") == g.resources[t.specs[0].run_id] for t in tasks if t.auto)
