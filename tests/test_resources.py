"""Resources per run (rules, include entries), time estimates and time limits: pure functions, no cluster."""

import dataclasses

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


def spec(model="resnet56", **kw) -> RunSpec:
    return RunSpec(model=model, dataset="cifar100", recipe=get_recipe("step-200"), batch_size=64, seed=0, **kw)


def record(**kw) -> dict:
    base = {"run_id": "x", "status": "completed", "model": "resnet56", "dataset": "cifar100", "batch_size": 64,
            "precision": "auto", "loader": "device", "compile": None, "epochs_done": 10, "train_seconds": 100.0,
            "test_seconds": 20.0, "device_name": "NVIDIA H100"}  # fmt: skip
    return base | kw


def test_records_give_seconds_per_epoch_and_the_slowest_device_counts():
    evidence = estimate.per_epoch_from_records(
        [
            record(),
            record(train_seconds=120.0),
            record(train_seconds=140.0),  # H100 median: (120 + 20) / 10 = 14 s/epoch
            record(device_name="NVIDIA A100", train_seconds=180.0),  # 20 s/epoch: the slowest device counts
            record(status="failed", train_seconds=10_000.0),  # failed runs say nothing about speed
            record(batch_size=128, train_seconds=50.0),
        ]
    )
    key = ("resnet56", "cifar100", 64, "auto", "device", None)
    assert evidence[key][0] == pytest.approx(20.0) and "1 record on NVIDIA A100" in evidence[key][1]
    assert evidence["resnet56", "cifar100", 128, "auto", "device", None][0] == pytest.approx(7.0)


def test_an_older_record_without_test_time_is_charged_a_share_of_its_training_time():
    evidence = estimate.per_epoch_from_records([record(test_seconds=None)])
    assert evidence["resnet56", "cifar100", 64, "auto", "device", None][0] == pytest.approx(
        10.0 * (1 + estimate.TEST_SHARE_OF_TRAINING)
    )


def test_the_estimate_prefers_records_then_bench_then_the_prior():
    s = spec()
    gpu = Resources()
    records = estimate.per_epoch_from_records([record()])
    bench = estimate.per_epoch_from_bench(
        [
            {
                "what": "train",
                "variant": "lightning fit",
                "images_per_s": 5000.0,
                "eval_images_per_s": 20000.0,
                "model": "resnet56",
                "dataset": "synthetic100",
                "batch_size": 64,
                "precision": "bf16-mixed",
                "device": "NVIDIA H200",
            }
        ]
    )
    from_records = estimate.estimate(s, gpu, records, bench)
    assert from_records.source == "records"
    assert from_records.seconds == pytest.approx(estimate.START_S + 200 * 12.0)
    from_bench = estimate.estimate(s, gpu, {}, bench)
    assert from_bench.source == "bench" and "NVIDIA H200" in from_bench.detail
    assert from_bench.seconds == pytest.approx(estimate.START_S + 200 * (50_000 / 5000 + 10_000 / 20_000))
    prior = estimate.estimate(s, gpu, {}, {})
    per_epoch = (50_000 * 6 + 10_000 * 2) * ARCHS["resnet56"].macs / estimate.PRIOR_FLOPS["gpu"]
    assert prior.source == "prior" and prior.seconds == pytest.approx(estimate.START_S + 200 * per_epoch)
    # the torchvision loader is not what bench measures; a compiled run is not an eager one
    assert estimate.estimate(spec(loader="torchvision"), gpu, {}, bench).source == "prior"
    assert estimate.estimate(spec(compile="default"), gpu, records, bench).source == "prior"


def test_the_cpu_prior_scales_with_the_cores_asked_for():
    one = estimate.estimate(spec(), Resources(gpus_per_node=0, cpus_per_task=1), {}, {})
    four = estimate.estimate(spec(), Resources(gpus_per_node=0, cpus_per_task=4), {}, {})
    assert one.seconds - estimate.START_S == pytest.approx(4 * (four.seconds - estimate.START_S))


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


def test_time_auto_becomes_a_limit_and_a_budget(tmp_path):
    g = parse_grid(GRID + "resources: [{match: {model: resnet20}, time: auto, time_margin: 2}]\n")
    planned = estimate.plan_times(g.specs, g.resources, tmp_path / "results", max_time={"gpu": 3600})
    auto = [p for p in planned if p.spec.model == "resnet20"]
    assert all(p.auto and p.resources.time != "auto" for p in auto)
    for p in auto:
        wanted, capped = estimate.time_limit(p.estimate.seconds, 2, 3600)
        assert p.resources.seconds == wanted and p.capped == capped
        assert p.budget.time_limit_s == wanted and p.budget.estimated_s == pytest.approx(p.estimate.seconds, abs=0.1)
        assert p.budget.estimate_source.startswith("prior: 200 epochs")
    fixed = [p for p in planned if p.spec.model != "resnet20"]
    assert all(not p.auto and p.resources.time == "04:00:00" and p.budget.time_limit_s == 4 * 3600 for p in fixed)


def test_groups_describe_runs_resources_and_hours(tmp_path):
    g = parse_grid(GRID + 'resources: [{match: {model: resnet1202}, time: "2-00:00:00", gpus_per_node: 2}]\n')
    planned = estimate.plan_times(g.specs, g.resources, tmp_path)
    assert [len(members) for members in plan.groups(planned).values()] == [4, 2]
    lines = plan.describe(planned, max_array_size=3)
    assert lines[0].startswith("group 1: 4 runs, 1 GPU, 4 CPUs, 16 GB, time 04:00:00, partition gpu; 2 arrays;")
    assert "reserved 16.0 GPU-h" in lines[0] and "estimates: 4 from prior" in lines[0]
    assert lines[1].startswith("group 2: 2 runs, 2 GPU") and "reserved 192.0 GPU-h" in lines[1]
    assert lines[-1].startswith("total: 6 runs in 2 groups, 3 arrays;") and "reserved GPU-h 208.0" in lines[-1]


def test_a_capped_group_is_warned_about(tmp_path):
    g = parse_grid(GRID + "resources: [{match: {model: resnet1202}, time: auto}]\n")
    planned = estimate.plan_times(g.specs, g.resources, tmp_path, max_time={"gpu": 3600})
    lines = plan.describe(planned, max_array_size=1000)
    assert any("warning" in line and "MaxTime" in line and "01:00:00" in line for line in lines)


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


def test_planned_keeps_the_spec_unchanged(tmp_path):
    g = parse_grid(GRID + "resources: [{match: {model: resnet20}, time: auto}]\n")
    planned = estimate.plan_times(g.specs, g.resources, tmp_path)
    assert [p.spec for p in planned] == list(g.specs)
    assert all(dataclasses.replace(p.resources, time="auto") == g.resources[p.spec.run_id] for p in planned if p.auto)
