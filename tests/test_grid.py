"""Grid files -> run specs: the shipped grids, expansion, every validation error, time limits, pinned run ids."""

import dataclasses
from pathlib import Path

import pytest

from cifarbench.config.grid import load_grid, parse_grid
from cifarbench.config.resources import Resources, parse_time
from cifarbench.config.spec import RECIPES, RunSpec
from cifarbench.errors import GridError, UsageError

JOBS = Path(__file__).resolve().parents[1] / "jobs"
BASE = "models: [resnet20]\ndatasets: [cifar10]\nopts: [step-160]\nbatch_sizes: [128]\n"
MODELS7 = ["resnet18", "resnet20", "resnet32", "resnet34", "resnet44", "resnet50", "resnet56"]


def grid(text: str):
    return parse_grid(text, source="g.yaml")


def error(text: str) -> str:
    """The one-line message a grid fails with."""
    with pytest.raises(GridError) as info:
        grid(text)
    message = str(info.value)
    assert message.startswith("g.yaml: ") and "\n" not in message
    return message


def runs(g) -> list[tuple]:
    return [(s.model, s.dataset, s.recipe.name, s.batch_size, s.seed) for s in g.specs]


# --- the shipped grids -------------------------------------------------------------------------------------------


def test_models_step200_bs64_is_the_notebooks_first_table():
    g = load_grid(JOBS / "models-step200-bs64.yaml")
    assert runs(g) == [(m, d, "step-200", 64, 0) for d in ("cifar10", "cifar100") for m in MODELS7]
    assert {(s.precision, s.data_root, s.results, s.epochs) for s in g.specs} == {("auto", "data", "results", None)}


def test_models_step160_bs256():
    g = load_grid(JOBS / "models-step160-bs256.yaml")
    assert runs(g) == [(m, d, "step-160", 256, 0) for d in ("cifar10", "cifar100") for m in MODELS7]


def test_resnet56_recipes_loops_batch_sizes_outermost():
    g = load_grid(JOBS / "resnet56-cifar100-recipes.yaml")
    opts = ("step-160", "step-200", "cos-200")
    assert runs(g) == [("resnet56", "cifar100", o, b, 0) for b in (64, 128, 256) for o in opts]


def test_he2016():
    g = load_grid(JOBS / "he2016-cifar10.yaml")
    depths = (20, 32, 44, 56, 110, 1202)
    assert runs(g) == [(f"resnet{d}", "cifar10", "he2016", 128, 0) for d in depths]
    assert {s.held_out for s in g.specs} == {5000} and {s.schedule.epochs for s in g.specs} == {182}
    limits = {s.model: (g.resources[s.run_id].time, g.resources[s.run_id].mem_gb) for s in g.specs}
    short = {f"resnet{d}": ("04:00:00", 32) for d in (20, 32, 44, 56)}
    assert limits == {**short, "resnet110": ("08:00:00", 32), "resnet1202": ("2-00:00:00", 64)}


def test_akamaster():
    g = load_grid(JOBS / "akamaster-cifar10.yaml")
    depths = (20, 32, 44, 56, 110, 1202)
    assert runs(g) == [(f"resnet{d}", "cifar10", "akamaster", 128, 0) for d in depths]
    # the first epoch at lr 0.01 for resnet110 and resnet1202 only
    assert [s.steps(391).warmup_steps for s in g.specs] == [0, 0, 0, 0, 391, 391]


def test_the_notebook_grids_take_their_time_limits_from_estimates():
    for name in ("models-step200-bs64", "models-step160-bs256", "resnet56-cifar100-recipes"):
        g = load_grid(JOBS / f"{name}.yaml")
        assert {r.time for r in g.resources.values()} == {"auto"}, name


def test_smoke_is_small_and_cpu_friendly():
    g = load_grid(JOBS / "smoke.yaml")
    assert len(g.specs) == 4 and {s.dataset for s in g.specs} == {"synthetic10"}
    assert {(s.epochs, s.precision, s.data_root) for s in g.specs} == {(3, "32-true", "data")}
    assert {(r.gpus_per_node, r.timeout_min) for r in g.resources.values()} == {(1, 20)}


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_grid_starts_with_a_comment(path):
    assert path.read_text().startswith("# ")
    assert load_grid(path).results == "results"


# --- expansion ---------------------------------------------------------------------------------------------------


def test_axes_nest_in_the_order_written_and_seeds_default_to_zero():
    g = grid("datasets: [cifar10, cifar100]\nmodels: [resnet20, resnet32]\nopts: [step-160]\nbatch_sizes: [128]\n")
    assert [(s.dataset, s.model, s.seed) for s in g.specs] == [
        ("cifar10", "resnet20", 0),
        ("cifar10", "resnet32", 0),
        ("cifar100", "resnet20", 0),
        ("cifar100", "resnet32", 0),
    ]


def test_defaults():
    s = grid(BASE).specs[0]
    assert (s.epochs, s.precision, s.loader, s.deterministic, s.data_root, s.verify, s.results) == (
        None,
        "auto",
        "device",
        False,
        "data",
        True,
        "results",
    )
    assert set(grid(BASE).resources.values()) == {Resources()}


def test_duplicates_are_dropped_keeping_the_first():
    g = grid(BASE.replace("[resnet20]", "[resnet32, resnet20, resnet32]") + "include: [{model: resnet20}]\n")
    assert [s.model for s in g.specs] == ["resnet32", "resnet20"]


def test_exclude_removes_matching_runs():
    g = grid(
        BASE.replace("[resnet20]", "[resnet20, resnet56]").replace("[cifar10]", "[cifar10, cifar100]")
        + "exclude:\n  - {model: resnet56, dataset: cifar100}\n  - {model: resnet20, batch_size: 128, seed: 0}\n"
    )
    assert runs(g) == [("resnet56", "cifar10", "step-160", 128, 0)]


def test_exclude_by_recipe_name():
    g = grid(BASE.replace("[step-160]", "[step-160, cos-200]") + "exclude: [{opt: cos-200}]\n")
    assert [s.recipe.name for s in g.specs] == ["step-160"]


def test_include_adds_runs_with_the_grids_options_as_defaults():
    g = grid(
        BASE + "precision: 32-true\ninclude:\n  - {model: resnet110, batch_size: 64, seed: 3, epochs: 10}\n"
        "  - {model: resnet56, opt: {name: short, epochs: 4, weight_decay: 0, schedule: cos}}\n"
    )
    extra = g.specs[1:]
    assert runs(g)[1:] == [("resnet110", "cifar10", "step-160", 64, 3), ("resnet56", "cifar10", "short", 128, 0)]
    assert [(s.epochs, s.precision) for s in extra] == [(10, "32-true"), (None, "32-true")]


def test_compile_is_off_by_default_true_means_the_default_mode_and_include_may_override_it():
    assert grid(BASE).specs[0].compile is None and grid(BASE + "compile: false\n").specs[0].compile is None
    assert grid(BASE + "compile: true\n").specs[0].compile == "default"
    g = grid(BASE + "compile: reduce-overhead\ninclude: [{seed: 1, compile: false}, {seed: 2}]\n")
    assert [(s.seed, s.compile) for s in g.specs] == [(0, "reduce-overhead"), (1, None), (2, "reduce-overhead")]


def test_include_must_name_an_axis_with_several_values():
    assert "include[0]: missing seed; the grid has several seeds" in error(
        BASE + "seeds: [0, 1]\ninclude: [{model: resnet56}]\n"
    )


def test_exclude_errors():
    assert "exclude[0].model: 'resnet56' is not in this grid's models: ['resnet20']" in error(
        BASE + "exclude: [{model: resnet56}]\n"
    )
    assert "exclude[0]: an empty entry would exclude every run" in error(BASE + "exclude: [{}]\n")
    assert "exclude: removes every run of the grid" in error(BASE + "exclude: [{model: resnet20}]\n")
    assert "unknown key 'models' (did you mean 'model'?)" in error(BASE + "exclude: [{models: resnet20}]\n")
    assert "exclude[0].seed" in error(BASE + "exclude: [{seed: true}]\n")  # true == 1 in Python; not a seed
    assert "exclude: must be a list (in YAML: [a, b]" in error(BASE + "exclude: {model: resnet20}\n")
    assert len(grid(BASE + "exclude: []\ninclude:\n").specs) == 1


def test_include_errors():
    assert "include[0]: unknown key 'root'" in error(BASE + "include: [{root: elsewhere}]\n")
    assert "include[0].model: unknown model 'resnet19'" in error(BASE + "include: [{model: resnet19}]\n")
    assert "include[0].batch_size: must be an integer" in error(BASE + "include: [{batch_size: big}]\n")


# --- inline recipes and the epochs override ----------------------------------------------------------------------

INLINE = "opts:\n  - {name: my-step, epochs: 30, lr: 0.05, weight_decay: 5e-4, schedule: step, milestones: [10, 20]}\n"


def test_inline_recipe():
    r = grid(BASE.replace("opts: [step-160]\n", INLINE)).specs[0].recipe
    assert (r.name, r.epochs, r.lr, r.weight_decay, r.milestones, r.gamma) == ("my-step", 30, 0.05, 5e-4, (10, 20), 0.1)


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "lr: 0.05",
            "lr: 0.05, warmup: 5",
            "opts[0]: unknown key 'warmup' (did you mean 'warmup_lr'?); valid keys: name, epochs, iterations, lr,",
        ),
        ("lr: 0.05", "lr: 0.05, gama: 0.2", "(did you mean 'gamma'?)"),
        (
            "schedule: step, ",
            "",
            "opts[0]: inline recipe lacks schedule; it needs name, epochs or iterations, weight_decay, schedule",
        ),
        ("[10, 20]", "[10, 30]", "opts[0].milestones[1]: must be between 1 and 29 (a milestone at or after the end"),
        ("[10, 20]", "[20, 10]", "opts[0].milestones: must increase strictly"),
        ("schedule: step", "schedule: cos", "opts[0].milestones: only the step schedule has milestones"),
        ("schedule: step", "schedule: linear", "opts[0].schedule: unknown schedule 'linear'"),
        ("lr: 0.05", "lr: 0", "opts[0].lr: must be a number > 0"),
        ("lr: 0.05", "lr: .nan", "opts[0].lr: must be a number > 0"),
        ("epochs: 30", "epochs: 30.5", "opts[0].epochs: must be an integer"),
        ("my-step", "my step", "opts[0].name: must be letters, digits"),
        ("my-step", "step-160", "opts[0].name: recipe 'step-160' already means Recipe("),
    ],
)
def test_inline_recipe_errors(old, new, message):
    assert message in error(BASE.replace("opts: [step-160]\n", INLINE.replace(old, new)))


def test_inline_recipe_may_repeat_a_builtin_exactly():
    same = "opts: [{name: step-160, epochs: 160, weight_decay: 1.0e-4, schedule: step, milestones: [80, 120]}]\n"
    assert grid(BASE.replace("opts: [step-160]\n", same)).specs[0].recipe == RECIPES["step-160"]


def test_epochs_override_scales_the_schedule():
    s = grid(BASE + "epochs: 16\n").specs[0]
    assert s.epochs == 16 and s.schedule.milestones == (8, 12) == RECIPES["step-160"].shortened(16).milestones


def test_epochs_equal_to_the_recipes_is_no_override():
    assert grid(BASE + "epochs: 160\n").specs[0] == grid(BASE).specs[0]


# --- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE + "seeds: [0\n", "g.yaml: line 6, column 1: invalid YAML:"),
        (BASE + "models: [resnet56]\n", "g.yaml: line 5, column 1: duplicate key 'models'"),
        ("", "top level: the grid is empty"),
        ("- resnet20\n", "top level: must be a mapping"),
        ("!!python/object:os.system {}\n", "invalid YAML: could not determine a constructor"),
        (
            BASE + "model: [resnet56]\n",
            "top level: unknown key 'model' (did you mean 'models'?); valid keys: models, datasets,",
        ),
        (
            BASE + "slurm: {partion: gpu}\n",
            "slurm: unknown key 'partion' (did you mean 'partition'?); valid keys: partition,",
        ),
        (BASE.replace("models: [resnet20]\n", ""), "top level: missing models"),
        (
            BASE.replace("[resnet20]", "[resnet19]"),
            "models[0]: unknown model 'resnet19' (did you mean 'resnet18'?); valid:",
        ),
        (BASE.replace("[cifar10]", "[cifar-10]"), "datasets[0]: unknown dataset 'cifar-10' (did you mean 'cifar10'?)"),
        (BASE.replace("[step-160]", "[step160]"), "opts[0]: unknown recipe 'step160' (did you mean 'step-160'?)"),
        (BASE.replace("[resnet20]", "[]"), "models: must be a non-empty list"),
        (BASE.replace("[resnet20]", "resnet20"), "models: must be a non-empty list"),
        (BASE.replace("[128]", "[0]"), "batch_sizes[0]: must be between 1 and 50000"),
        (BASE.replace("[128]", "[-64]"), "batch_sizes[0]: must be between 1 and 50000"),
        (
            BASE.replace("[128]", "[50001]"),
            "batch_sizes[0]: must be between 1 and 50000 (the CIFAR training set has 50000 images), got 50001",
        ),
        (BASE.replace("[128]", "[64.5]"), "batch_sizes[0]: must be an integer, got 64.5"),
        (BASE.replace("[128]", "['64']"), "batch_sizes[0]: must be an integer, got '64'"),
        (BASE.replace("[128]", "[true]"), "batch_sizes[0]: must be an integer, got True"),
        (BASE + "seeds: [-1]\n", "seeds[0]: must be between 0 and 4294967295, got -1"),
        (BASE + "seeds: [4294967296]\n", "seeds[0]: must be between 0 and 4294967295"),
        (BASE + "seeds: [true]\n", "seeds[0]: must be an integer, got True"),
        (BASE + "epochs: 0\n", "epochs: must be between 1 and 10000"),
        (BASE + "epochs: yes\n", "epochs: must be an integer, got True"),
        (BASE + "precision: fp16\n", "precision: unknown precision 'fp16'"),
        (BASE + "loader: dali\n", "loader: unknown loader 'dali'"),
        (BASE + "deterministic: 1\n", "deterministic: must be true or false"),
        (
            BASE + "compile: reduce_overhead\n",
            "compile: unknown compile mode 'reduce_overhead' (did you mean 'reduce-overhead'?); valid: default,",
        ),
        (BASE + "compile: 1\n", "compile: must be true, false or a torch.compile mode (default, reduce-overhead,"),
        (BASE + "include: [{compile: fast}]\n", "include[0].compile: unknown compile mode 'fast'"),
        (BASE + "verify: 'no'\n", "verify: must be true or false"),
        (BASE + 'root: "data\\nrm -rf /"\n', "root: must be a folder path on one line"),
        (BASE + "results: ''\n", "results: must be a folder path on one line"),
    ],
)
def test_validation_errors(text, message):
    assert message in error(text)


def test_seed_zero_and_large_seeds_are_fine():
    assert [s.seed for s in grid(BASE + "seeds: [0, 4294967295]\n").specs] == [0, 2**32 - 1]


def test_missing_file():
    with pytest.raises(GridError, match="nope.yaml: cannot read the grid file"):
        load_grid("nope.yaml")


def test_grid_errors_are_usage_errors():
    assert issubclass(GridError, UsageError)


# --- slurm resources ---------------------------------------------------------------------------------------------


def test_resources():
    r = grid(
        BASE
        + """slurm:
  partition: gpu
  account: proj-42
  qos: high
  gpus_per_node: 1
  gpu_type: a100
  mem_gb: 40.5
  time: "2-12:00:00"
  constraint: "a100&ib"
  setup: ["module load cuda/12.1", "source ~/env/bin/activate && echo ok"]
  exclusive: true
  extra: {mail-type: "END,FAIL", mail-user: me@example.org, exclude: "node[1-3]"}
"""
    ).resources
    [r] = set(r.values())
    assert (r.partition, r.account, r.qos, r.gpus_per_node, r.gpu_type, r.mem_gb, r.constraint) == (
        "gpu",
        "proj-42",
        "high",
        1,
        "a100",
        40.5,
        "a100&ib",
    )
    assert r.timeout_min == 60 * 60 and r.setup[1].endswith("echo ok") and r.exclusive is True
    assert dict(r.extra) == {"mail-type": "END,FAIL", "mail-user": "me@example.org", "exclude": "node[1-3]"}


@pytest.mark.parametrize(
    "slurm, message",
    [
        ("{partition: 'gpu;reboot'}", "slurm.partition: 'gpu;reboot' contains ';', which is not allowed here"),
        ("{account: 'a b'}", "slurm.account: 'a b' contains ' '"),
        ("{qos: ''}", "slurm.qos: must be a non-empty string"),
        ('{constraint: "a100\\nrm -rf /"}', "slurm.constraint:"),
        ("{setup: 'module load cuda'}", "slurm.setup: must be a list of shell lines"),
        ('{setup: ["ok\\nrm -rf /"]}', "slurm.setup:"),
        ("{gpus_per_node: -1}", "slurm.gpus_per_node: must be an integer >= 0, got -1"),
        ("{cpus_per_task: 0}", "slurm.cpus_per_task: must be an integer >= 1"),
        ("{array_parallelism: '4'}", "slurm.array_parallelism: must be an integer >= 1, got '4'"),
        ("{max_requeues: true}", "slurm.max_requeues: must be an integer >= 0, got True"),
        ("{mem_gb: 0}", "slurm.mem_gb: must be a positive number of gigabytes"),
        ("{extra: [mail-type]}", "slurm.extra: must be a mapping of sbatch options to values"),
        (
            "{extra: {wrap: 'rm -rf /'}}",
            "slurm.extra: unknown sbatch option 'wrap'; valid: comment, exclude, hold,",
        ),
        ("{extra: {mail_type: END}}", "(did you mean 'mail-type'?)"),
        ("{extra: {gres: 'gpu:2'}}", "slurm.extra: 'gres' has its own field; set slurm.gpus_per_node instead"),
        ("{extra: {comment: 'a$(reboot)'}}", "slurm.extra.comment: 'a$(reboot)' contains '$()'"),
        ('{extra: {comment: "x\\n#SBATCH --wrap"}}', "slurm.extra.comment:"),
        ("{exclusive: 'yes'}", "slurm.exclusive: must be true or false, got 'yes'"),
        ("{extra: {exclusive: true}}", "slurm.extra: 'exclusive' has its own field; set slurm.exclusive instead"),
        ("{mem_gb: 16, extra: {mem-per-gpu: 16G}}", "slurm.extra: mem-per-gpu and mem_gb both set the job's memory"),
        ("[gpu]", "slurm: must be a mapping"),
    ],
)
def test_resource_errors(slurm, message):
    assert message in error(BASE + f"slurm: {slurm}\n")


# --- time limits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("20:00", 1200),
        ("0:30", 30),
        ("90:00", 5400),
        ("00:20:00", 1200),
        ("1:00:00", 3600),
        ("72:00:00", 259200),
        ("1-00:00:00", 86400),
        ("2-23:59:59", 2 * 86400 + 86399),
        ("0-00:00:01", 1),
    ],
)
def test_time_formats(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "60",
        "1:00:00:00",
        "1-00:00",
        "1-12",
        "-1:00:00",
        "1:2:3",
        "1:002:00",
        " 1:00:00",
        "1h",
        "a:bb",
        "\uff11:00",
        "1:60",
        "1:00:60",
        "1:60:00",
        "1-24:00:00",
        "00:00",
        "00:00:00",
        "0-00:00:00",
    ],
)
def test_bad_times(text):
    with pytest.raises(ValueError, match="^time: "):
        parse_time(text)


@pytest.mark.parametrize("value", ["1:00:00", "20:00", "1:30.5", "30", "1.5"])
def test_time_as_a_bare_yaml_number_is_explained(value):
    message = error(BASE + f"slurm: {{time: {value}}}\n")
    assert "slurm.time: got the bare number" in message and "quote it" in message


def test_time_errors_name_the_field():
    assert "slurm.time: '1:60:00' is out of range" in error(BASE + "slurm: {time: '1:60:00'}\n")


def test_timeout_min_rounds_up():
    assert [Resources(time=t).timeout_min for t in ("00:00:30", "01:00:01", "1-00:00:00")] == [1, 61, 1440]


# --- run ids -----------------------------------------------------------------------------------------------------


def spec(**changes) -> RunSpec:
    base = dict(model="resnet56", dataset="cifar100", recipe=RECIPES["cos-200"], batch_size=64, seed=0)
    return RunSpec(**{**base, **changes})


def test_pinned_run_ids():
    """Any change to the id scheme changes these: bump SPEC_VERSION on purpose, then update them."""
    assert spec().run_id == "resnet56-cifar100-v1-9dcceae086f2"
    assert spec(model="resnet20", dataset="cifar10", recipe=RECIPES["step-160"], batch_size=128).run_id == (
        "resnet20-cifar10-v1-c2dd197cfa28"
    )
    assert spec(model="resnet18", dataset="cifar10", recipe=RECIPES["step-200"]).run_id == (
        "resnet18-cifar10-v1-6923387b0e23"
    )
    smoke = spec(
        model="resnet20",
        dataset="synthetic10",
        recipe=RECIPES["step-160"],
        batch_size=64,
        seed=1,
        epochs=3,
        precision="32-true",
    )
    assert smoke.run_id == "resnet20-synthetic10-v1-fdc7796d3d9c"
    assert smoke.run_id in [s.run_id for s in load_grid(JOBS / "smoke.yaml").specs]
    assert spec().run_id in [s.run_id for s in load_grid(JOBS / "resnet56-cifar100-recipes.yaml").specs]
    # compile joined the spec later: eager runs (compile None) kept the ids above
    assert spec(compile="reduce-overhead").run_id == "resnet56-cifar100-v1-add19ae4e764"


def test_bookkeeping_does_not_change_the_run_id():
    assert spec(data_root="/scratch/data", verify=False, results="elsewhere").run_id == spec().run_id
    plain = grid(BASE).specs[0].run_id
    moved = grid(BASE + "root: /scratch\nresults: out\nverify: false\nslurm: {partition: big, time: '1:00'}\n")
    assert moved.specs[0].run_id == plain


@pytest.mark.parametrize(
    "changes",
    [
        {"seed": 1},
        {"epochs": 20},
        {"batch_size": 128},
        {"precision": "bf16-mixed"},
        {"deterministic": True},
        {"compile": "default"},
        {"recipe": dataclasses.replace(RECIPES["cos-200"], lr=0.05)},
        {"recipe": dataclasses.replace(RECIPES["cos-200"], weight_decay=1e-4)},
        {"recipe": dataclasses.replace(RECIPES["cos-200"], name="cos-200b")},
    ],
)
def test_what_changes_the_result_changes_the_run_id(changes):
    assert spec(**changes).run_id != spec().run_id
