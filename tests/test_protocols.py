"""Published protocols: warm-up, schedules in iterations, the validation split, and which data a run trained on."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import warnings

import lightning as L
import pytest

from cifarbench.cli import main
from cifarbench.config.grid import parse_grid
from cifarbench.config.spec import RECIPES, Recipe, RunSpec
from cifarbench.errors import GridError
from cifarbench.report.collect import collect
from cifarbench.store import datasets, records
from cifarbench.store.datasets import DataError, fingerprint
from cifarbench.train import data
from cifarbench.train.fit import fit
from cifarbench.train.module import ResNetModule

# --- the learning rate of every step ------------------------------------------------------------------------------


def lr_trace(spec: RunSpec, steps_per_epoch: int) -> list[float]:
    """The learning rate of each optimizer step, from the module's own optimiser and scheduler, stepped as
    Lightning steps them: after every optimizer step ("step" interval) or after every epoch ("epoch")."""
    steps = spec.steps(steps_per_epoch)
    module = ResNetModule(spec, steps=steps)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    per_step = config["lr_scheduler"]["interval"] == "step"
    lrs = []
    with warnings.catch_warnings():  # no optimizer.step() here: only the schedule is asked for
        warnings.simplefilter("ignore")
        for step in range(steps.total):
            lrs.append(opt.param_groups[0]["lr"])
            if per_step or (step + 1) % steps_per_epoch == 0:
                sched.step()
    return lrs


def run(model: str, recipe: Recipe | str, **kw) -> RunSpec:
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    return RunSpec(model=model, dataset="cifar10", recipe=recipe, batch_size=128, seed=0, **kw)


# (model, recipe, steps per epoch, steps in all, {step: its learning rate}), written out by hand from the papers:
# 45,000 images at batch size 128 are 352 steps, 50,000 are 391.
EXPECTED = [
    ("resnet110", "he2016", 352, 64_000,
     {0: 0.01, 399: 0.01, 400: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001, 63_999: 0.001}),
    ("resnet20", "he2016", 352, 64_000, {0: 0.1, 399: 0.1, 31_999: 0.1, 32_000: 0.01, 48_000: 0.001}),
    ("resnet110", "akamaster", 391, 78_200,
     {0: 0.01, 390: 0.01, 391: 0.1, 39_099: 0.1, 39_100: 0.01, 58_649: 0.01, 58_650: 0.001, 78_199: 0.001}),
    ("resnet56", "akamaster", 391, 78_200, {0: 0.1, 390: 0.1, 39_100: 0.01, 58_650: 0.001}),
    ("resnet20", "step-160", 391, 62_560, {0: 0.1, 31_279: 0.1, 31_280: 0.01, 46_920: 0.001, 62_559: 0.001}),
    ("resnet20", "step-200", 391, 78_200, {0: 0.1, 23_460: 0.02, 46_920: 0.004, 62_560: 0.0008}),
    # cosine by epoch: (1 + cos(pi * epoch / 200)) / 2 of 0.1, the same for every step of an epoch
    ("resnet20", "cos-200", 391, 78_200, {0: 0.1, 390: 0.1, 19_550: 0.08535533905932738, 39_100: 0.05}),
]  # fmt: skip


@pytest.mark.parametrize("model, recipe, per_epoch, total, expected", EXPECTED, ids=lambda v: str(v)[:12])
def test_learning_rate_of_each_step_of_the_built_in_recipes(model, recipe, per_epoch, total, expected):
    lrs = lr_trace(run(model, recipe), per_epoch)
    assert len(lrs) == total
    assert {step: lrs[step] for step in expected} == pytest.approx(expected, rel=1e-12)


def test_a_recipe_in_iterations_with_a_linear_warm_up_and_a_cosine():
    recipe = Recipe(
        name="cos-it",
        iterations=1000,
        weight_decay=5e-4,
        schedule="cos",
        warmup_iterations=100,
        warmup_lr=0.02,
        warmup_mode="linear",
    )
    lrs = lr_trace(run("resnet20", recipe), 64)  # 15.6 epochs: the last stops part-way
    assert len(lrs) == 1000
    cosine = {100: 0.1 * (1 + math.cos(math.pi * 0.1)) / 2, 500: 0.05, 999: 0.1 * (1 + math.cos(math.pi * 0.999)) / 2}
    assert {s: lrs[s] for s in (0, 50, 99, *cosine)} == pytest.approx({0: 0.02, 50: 0.06, 99: 0.0992, **cosine})


def test_a_shortened_recipe_in_iterations_is_compressed_into_its_epochs():
    steps = run("resnet110", "he2016", epochs=2).steps(10)  # 20 steps: 64k iterations scaled by 20/64000
    assert (steps.total, steps.epochs, steps.milestones, steps.warmup_steps) == (20, 2, (10, 15), 1)
    assert (
        run("resnet110", "he2016").schedule.epochs == 182 and run("resnet110", "he2016", epochs=2).schedule.epochs == 2
    )


# --- recipes in grids and run ids -------------------------------------------------------------------------------


BASE = "models: [resnet110]\ndatasets: [synthetic10]\nbatch_sizes: [128]\n"


def test_inline_recipes_with_warm_up_and_iterations():
    grid = parse_grid(
        BASE + "opts: [{name: he-short, iterations: 600, weight_decay: 1e-4, schedule: step, milestones: [300, 450],"
        " warmup_iterations: 40, warmup_lr: 0.01, warmup_min_depth: 110, val_split: 500}]\n"
    )
    (spec,) = grid.specs
    assert spec.recipe.iterations == 600 and spec.recipe.warmup_iterations == 40 and spec.held_out == 500
    assert spec.steps(50).lr(39) == 0.01 and spec.steps(50).lr(40) == 0.1
    for text, why in [
        ("{name: a, epochs: 2, iterations: 9, weight_decay: 0, schedule: cos}", "as epochs or as iterations"),
        ("{name: a, iterations: 90, weight_decay: 0, schedule: step, milestones: [90]}", "milestones\\[0\\]"),
        ("{name: a, epochs: 9, weight_decay: 0, schedule: cos, warmup_epochs: 1}", "a warm-up needs warmup_lr"),
        ("{name: a, epochs: 9, weight_decay: 0, schedule: cos, warmup_mode: linaer}", "did you mean 'linear'"),
    ]:
        with pytest.raises(GridError, match=why):
            parse_grid(BASE + f"opts: [{text}]\n")


def test_unset_new_fields_leave_run_ids_alone_and_set_ones_change_them():
    plain = run("resnet20", "step-160")
    assert "val_split" not in plain.identity() and set(plain.identity()["recipe"]) == {
        "name", "epochs", "lr", "momentum", "weight_decay", "schedule", "milestones", "gamma"
    }  # fmt: skip
    assert run("resnet20", "step-160", val_split=5000).run_id != plain.run_id
    assert run("resnet20", "step-160", data_fingerprint="0123456789abcdef").run_id != plain.run_id
    # the recipe's own split, said again, is the same run
    assert run("resnet20", "he2016", val_split=5000).run_id == run("resnet20", "he2016").run_id
    grid = parse_grid(BASE + "opts: [he2016, step-160]\nval_split: 1000\n")
    assert [s.held_out for s in grid.specs] == [1000, 1000]


@pytest.fixture
def two_sizes(tmp_path):
    """synthetic10 in three folders: 200 training images, 300, and a copy of the first."""
    for name, size in (("a", 200), ("b", 300)):
        data.write_synthetic("synthetic10", tmp_path / name, train_size=size, test_size=50)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    return tmp_path


def test_the_data_a_run_reads_is_part_of_its_id(two_sizes):
    ids = {
        name: parse_grid(BASE + f"opts: [step-160]\nroot: {two_sizes / name}\n", fingerprint=fingerprint).specs[0]
        for name in ("a", "b", "copy")
    }
    assert ids["a"].run_id != ids["b"].run_id  # another size: other data
    assert ids["a"].run_id == ids["copy"].run_id  # the same files elsewhere: the same run
    assert ids["a"].data_fingerprint == fingerprint("synthetic10", two_sizes / "a") is not None
    # the md5s are cached beside the data, and the fingerprint once per process
    assert (datasets.dataset_folder("synthetic10", two_sizes / "b") / datasets.CACHE_NAME).is_file()
    # no data yet: the id is the one without it, and submit's preflight says what is missing
    assert fingerprint("synthetic10", two_sizes / "none") is None


def test_checksum_verified_cifar_keeps_its_id_and_an_unverified_copy_gets_its_own(two_sizes, monkeypatch):
    root = two_sizes / "real"
    shutil.copytree(datasets.dataset_folder("synthetic10", two_sizes / "a"), root / "cifar-10-batches-py")
    copy = fingerprint("cifar10", root)
    assert copy is not None  # not CIFAR-10's published md5s: an unverified copy
    # the same files, had they been published as CIFAR-10: no fingerprint, the id CIFAR-10 always had
    folder = root / "cifar-10-batches-py"
    published = datasets.CifarLayout(
        base_folder="cifar-10-batches-py",
        train_list=tuple((n, datasets.md5(folder / n)) for n, _ in datasets.CIFAR10.train_list),
        test_list=(("test_batch", datasets.md5(folder / "test_batch")),),
        meta=("batches.meta", datasets.md5(folder / "batches.meta")),
    )
    monkeypatch.setitem(datasets.FILES, "cifar10", dataclasses.replace(datasets.FILES["cifar10"], layout=published))
    assert fingerprint("cifar10", root) is None
    spec = parse_grid(
        BASE.replace("synthetic10", "cifar10") + f"opts: [step-160]\nroot: {root}\n", fingerprint=fingerprint
    )
    assert spec.specs[0].run_id == run("resnet110", "step-160").run_id


def test_synthetic_data_of_another_size_is_not_overwritten_without_force(two_sizes, capsys):
    root = two_sizes / "a"
    args = ["data", "synthetic", "--root", str(root), "--dataset", "synthetic10", "--test-size", "50"]
    assert main([*args, "--train-size", "400"]) == 2
    err = capsys.readouterr().err
    assert "already holds synthetic10 with 200 training and 50 test images; pass --force" in err
    assert data.synthetic_sizes("synthetic10", root) == (200, 50)
    assert main([*args, "--train-size", "200"]) == 0  # the same size: the same data again
    assert main([*args, "--train-size", "400", "--force"]) == 0
    assert data.synthetic_sizes("synthetic10", root) == (400, 50)
    # what plans count a run's images with: counted once, then kept beside the files while they stay the same
    assert datasets.image_counts("synthetic10", root) == (400, 50)
    assert (datasets.dataset_folder("synthetic10", root) / datasets.SIZES_NAME).is_file()
    assert datasets.image_counts("synthetic100", root) == datasets.STANDARD_IMAGES == (50_000, 10_000)  # missing
    assert datasets.image_counts("cifar10", root) == datasets.STANDARD_IMAGES


def test_the_missing_data_hint_recreates_only_what_the_grid_reads(tmp_path):
    message = datasets.missing_message("synthetic10", tmp_path)
    assert (
        f"cifarbench data synthetic --root {tmp_path} --dataset synthetic10 --train-size 50000 --test-size 10000"
        in (message)
    )


# --- the validation split ---------------------------------------------------------------------------------------


def test_the_validation_split_is_disjoint_fixed_and_the_same_in_every_process(synthetic_root):
    held = datasets.val_indices(1000, 100)
    assert len(set(held)) == 100 and held == sorted(held) and held[0] >= 0 and held[-1] < 1000
    code = "from cifarbench.store.datasets import val_indices; print(val_indices(1000, 100))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == held
    assert datasets.val_indices(50_000, 5_000)[:3] == [10, 46, 50]  # pinned: a grid's split never moves
    images, labels = data.load_arrays("synthetic10", synthetic_root, train=True)
    kept = sorted(set(range(1000)) - set(held))
    for seed in (0, 1):
        loaders = data.make_run_loaders(
            dataset="synthetic10", root=synthetic_root, loader="device", batch_size=64, seed=seed, val_split=100
        )
        assert loaders.sizes == {"train_images": 900, "val_images": 100, "test_images": 500}
        assert loaders.val.images.equal(images[held]) and loaders.val.labels.equal(labels[held])
        unpadded = loaders.train.images[:, :, data.PAD : -data.PAD, data.PAD : -data.PAD]
        assert unpadded.equal(images[kept]) and loaders.train.labels.equal(labels[kept])
    with pytest.raises(DataError, match="the training set has 1000 images"):
        datasets.val_indices(1000, 1000)


# --- end to end: a warm-up run, resumed inside its warm-up, with a validation split --------------------------------


class _Crash(L.Callback):
    """Stop a run after its first epoch, as a lost node would."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            raise RuntimeError("node lost")


WARM = Recipe(
    name="warm",
    iterations=12,
    weight_decay=5e-4,
    schedule="step",
    milestones=(10,),
    warmup_iterations=8,  # epochs of 5 steps: the crash after the first is inside the warm-up
    warmup_lr=0.01,
    warmup_mode="linear",
)


@pytest.mark.slow
def test_a_warm_up_run_with_a_validation_split_resumes_exactly_and_collect_reads_it(tmp_path, write_records):
    root = tmp_path / "data"
    data.write_synthetic("synthetic10", root, train_size=200, test_size=50)
    spec = RunSpec(
        model="resnet20",
        dataset="synthetic10",
        recipe=WARM,
        batch_size=32,
        seed=0,
        val_split=40,
        deterministic=True,
        precision="32-true",
        data_root=str(root),
        data_fingerprint=fingerprint("synthetic10", root),
    )
    straight = records.read_record(fit(dataclasses.replace(spec, results=str(tmp_path / "a"))))
    resumed_spec = dataclasses.replace(spec, results=str(tmp_path / "b"))
    with pytest.raises(RuntimeError, match="node lost"):
        fit(resumed_spec, callbacks=[_Crash()])
    resumed = records.read_record(fit(resumed_spec))
    assert resumed["attempts"] == 2 and straight["attempts"] == 1
    for key in ("test_acc", "val_acc", "train_loss", "lr_curve", "best_val_epoch", "test_acc_at_best_val"):
        assert resumed[key] == straight[key], key
    r = straight
    # 160 images at 32 a step: 5 steps an epoch; 12 steps are 3 epochs, the last of 2 steps
    assert (r["train_images"], r["val_images"], r["test_images"], r["val_split"]) == (160, 40, 50, 40)
    assert (r["iterations"], r["epochs"], r["epochs_done"], r["milestone_unit"]) == (12, 3, 3, "iterations")
    assert r["lr_curve"] == pytest.approx([0.01, 0.01 + 0.09 * 5 / 8, 0.01])  # the first step of each epoch
    assert r["warmup_iterations"] == 8 and r["warmup_lr"] == 0.01 and r["warmup_mode"] == "linear"
    assert len(r["val_acc"]) == 3 and r["best_val_acc"] == max(r["val_acc"])
    assert r["test_acc_at_best_val"] == r["test_acc"][r["best_val_epoch"] - 1]
    assert r["data_fingerprint"] == spec.data_fingerprint and r["data_verified"] is None
    assert r["data_root"] == str(root.resolve())

    # a record without a validation split beside it: collect reads both, each column saying what it is
    write_records([{"model": "resnet32", "dataset": "synthetic10", "final_test_acc": 0.5}], results=tmp_path / "a")
    report = collect(tmp_path / "a", rows=["model"], cols=["dataset"], value="test_acc_at_best_val", plots=False)
    assert "2 runs: 2 completed" in report.markdown
    assert "Cells: test accuracy at the epoch of best validation accuracy" in report.markdown
    body = [
        [c.strip() for c in line.strip("|").split("|")] for line in report.markdown.splitlines() if "| resnet" in line
    ]
    assert sorted(body) == [["resnet20", f"{r['test_acc_at_best_val']:.4f}"], ["resnet32", "–"]]


def test_a_run_refuses_data_that_changed_since_it_was_submitted(synthetic_root, tmp_path):
    spec = run("resnet20", "step-160", epochs=1, data_fingerprint="0" * 16)
    spec = dataclasses.replace(spec, dataset="synthetic10", data_root=str(synthetic_root), results=str(tmp_path))
    with pytest.raises(DataError, match="not the data this run was submitted with"):
        fit(spec)


def test_collect_compares_he2016_runs_with_the_paper_on_its_own_protocol(write_records):
    he = {"recipe": "he2016", "batch_size": 128, "recipe_epochs": 182, "val_split": 5000}
    results = write_records(
        [
            {**he, "model": "resnet20", "final_test_acc": 0.9150, "test_acc_at_best_val": 0.9160},
            {**he, "model": "resnet110", "final_test_acc": 0.9300, "test_acc_at_best_val": 0.9290},
        ]
    )
    markdown = collect(results, source="he2016", plots=False).markdown
    assert "## he2016 bs=128" in markdown  # 182 epochs are the recipe's own: not a shortened run
    table = markdown.split("## he2016 bs=128\n", 1)[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if "|" in line]
    assert rows[0] == [
        "model", "dataset", "final test acc", "test acc at best val epoch", "published",
        "Δ final test acc − published", "published inside our interval",
    ]  # fmt: skip
    assert ["resnet20", "cifar10", "0.9150", "0.9160", "0.9125 [1]", "+0.0025", "– (1 seed)"] in rows
    assert ["resnet110", "cifar10", "0.9300", "0.9290", "0.9357 [2]", "-0.0057", "– (1 seed)"] in rows
    assert "(the same protocol: recipe, batch size and epochs as published)" in markdown
    assert "a different protocol" not in markdown and "selected on the test set" not in markdown
