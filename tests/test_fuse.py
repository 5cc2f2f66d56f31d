"""Seed fusion: a fused group trains through the Lightning fit of a single run, each member stays the run it
would be alone (initial weights, batches, steps, record columns), a diverging member fails alone, an interrupted
group resumes to the same numbers, and torch.compile falls back to eager rather than failing the group."""

import contextlib
import dataclasses
import io
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cifarbench.cli import main
from cifarbench.cluster.estimate import Evidence
from cifarbench.cluster.plan import fused_groups, make_tasks
from cifarbench.config.grid import load_grid, parse_grid
from cifarbench.config.spec import Recipe, RunSpec, get_recipe
from cifarbench.errors import GridError
from cifarbench.store import atomic, records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.store.progress import read_progress
from cifarbench.system import allocation_cpus, allocation_gpus
from cifarbench.train import data
from cifarbench.train.fit import fit, fit_group
from cifarbench.train.fuse import Float32BatchNorm, Stacked, StackedBatches, group_id
from cifarbench.train.models import seeded_model
from cifarbench.train.module import ResNetModule

CPU = torch.device("cpu")
# A recipe whose steps are small: on this data the stock lr 0.1 is chaotic in float32 (the same run on 1 and 2
# threads ends percents apart), so that a comparison of fused and unfused runs would measure the chaos
GENTLE = dataclasses.replace(get_recipe("step-200"), name="gentle", lr=0.002)
# ...and one counted in iterations with a warm-up: on 96 training images (32 of 128 held out) at 64 a step, 6 steps
# are 3 epochs, the first 3 steps warming up
GENTLE_WARM = Recipe(
    name="gentle-warm",
    iterations=6,
    lr=0.002,
    weight_decay=5e-4,
    schedule="step",
    milestones=(5,),
    warmup_iterations=3,
    warmup_lr=0.0005,
    warmup_mode="linear",
)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """synthetic10 with 128 training and 64 test images: 2 steps of 64 per epoch."""
    root = tmp_path_factory.mktemp("small")
    data.write_synthetic("synthetic10", root, train_size=128, test_size=64)
    return root


def _specs(root, results, seeds=(0, 1, 2), **kw):
    fields = dict(
        model="resnet20",
        dataset="synthetic10",
        recipe=get_recipe("step-200"),
        batch_size=64,
        epochs=2,
        deterministic=True,
        data_root=str(root),
        results=str(results),
    )
    return [RunSpec(**{**fields, **kw, "seed": s}) for s in seeds]


def _loader(spec):
    train, _ = data.make_loaders(
        dataset=spec.dataset,
        root=spec.data_root,
        loader="device",
        batch_size=spec.batch_size,
        seed=spec.seed,
        memory_format=torch.channels_last,
    )
    return train


def _batches(specs, epoch):
    batches = StackedBatches(_loader(specs[0]), [s.seed for s in specs])
    batches.set_epoch(epoch)
    return list(batches)


def _quiet(fn, *args, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def test_members_start_from_the_unfused_runs_weights(small_root, tmp_path):
    specs = _specs(small_root, tmp_path, seeds=(0, 7))
    group = ResNetModule(specs, steps=specs[0].steps(1))
    for k, spec in enumerate(specs):
        L.seed_everything(spec.seed, verbose=False)  # as fit does, right before it builds the module
        alone = ResNetModule(spec, steps=spec.steps(1)).model.state_dict()  # the schedule: no part of the weights
        fused = group.model.member_state(k)
        assert alone.keys() == fused.keys()
        assert all(torch.equal(alone[name], fused[name]) for name in alone)
    assert not torch.equal(group.model.member_state(0)["fc.weight"], group.model.member_state(1)["fc.weight"])


def test_fused_batchnorm_normalises_half_precision_input_in_float32():
    # under vmap, CUDA's BatchNorm refuses bf16 input beside float32 statistics (GPU check, H200, torch 2.11):
    # the stacked model's BatchNorms take any input dtype, normalise in float32, and return the input's dtype
    stacked = Stacked([seeded_model("resnet20", 10, s) for s in (0, 1)])
    norms = [m for m in stacked.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(type(m) is Float32BatchNorm for m in norms)
    bn = Float32BatchNorm(16)  # a member's: the stacked ones hold K members' parameters
    x = torch.randn(8, 16, 4, 4).to(torch.bfloat16)
    out = bn(x)
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    expected = F.batch_norm(x.float(), None, None, bn.weight, bn.bias, training=True).to(torch.bfloat16)
    torch.testing.assert_close(out, expected)
    double = torch.randn(8, 16, 4, 4, dtype=torch.float64)  # other dtypes as BatchNorm2d takes them
    assert Float32BatchNorm(16).double()(double).dtype == torch.float64


@pytest.mark.slow  # a real Trainer and two epochs
def test_members_get_the_batches_lightning_feeds_their_unfused_runs(small_root, tmp_path):
    specs = _specs(small_root, tmp_path, seeds=(3, 4))
    seen: dict[int, list] = {}

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(pl_module.spec.seed, []).append([t.clone() for t in batch])

    for spec in specs:  # the Trainer of fit, cut to 2 epochs of 2 batches without a test pass
        train = _loader(spec)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            limit_train_batches=2,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Capture()],
        )
        _quiet(trainer.fit, ResNetModule(spec, steps=spec.steps(len(train))), train_dataloaders=train)
    for epoch in range(2):
        fused = _batches(specs, epoch)[:2]
        assert len(fused) == 2 and fused[0][0].shape == (2, 64, 3, 32, 32)
        for k, spec in enumerate(specs):
            for (x, y), (x_alone, y_alone) in zip(fused, seen[spec.seed][2 * epoch : 2 * epoch + 2]):
                assert torch.equal(x[k], x_alone) and torch.equal(y[k], y_alone)


def _separate_steps(specs, batches, dtype):
    """What the unfused runs do: one model and one SGD each, a step per batch (Lightning's automatic
    optimisation in 32-true is this loop)."""
    states = []
    for k, spec in enumerate(specs):
        model = seeded_model(spec.model, spec.num_classes, spec.seed).to(dtype).to(memory_format=torch.channels_last)
        recipe = spec.schedule
        opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
        for x, y in batches:
            F.cross_entropy(model(x[k].to(dtype)), y[k]).backward()
            opt.step()
            opt.zero_grad()
        states.append(model.state_dict())
    return states


def _fused_steps(specs, batches, dtype):
    """The fused group's training steps: the module's forward pass and losses, and its own optimiser."""
    module = ResNetModule(specs, steps=specs[0].steps(len(batches))).to(dtype)
    opt = module.configure_optimizers()["optimizer"]
    for x, y in batches:
        module.losses(module(x.to(dtype)), y).sum().backward()
        opt.step()
        opt.zero_grad()
    return [module.model.member_state(k) for k in range(len(specs))]


def _error(fused: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference tensor."""
    return ((fused.double() - reference.double()).abs().max() / reference.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.slow
def test_fused_steps_equal_separate_steps(small_root, tmp_path):
    """In float64, two fused steps of 2 members match 2 separate runs' steps to 4e-13 (measured) of each tensor's
    largest value: only summation order differs, amplified by BatchNorm at initialisation, where some channels'
    batch variance is tiny. In float32 that amplification is of float32's rounding: 2 steps of an unfused run
    already differ from the float64 ones by up to 5% on near-zero BatchNorm biases (measured), so there the fused
    steps are held to being no further from float64 than the unfused steps are."""
    specs = _specs(small_root, tmp_path, seeds=(0, 1), batch_size=32)
    torch.use_deterministic_algorithms(True)  # put back by conftest's fixture
    batches = _batches(specs, 0)[:2]
    exact = _separate_steps(specs, batches, torch.float64)
    rounded = _separate_steps(specs, batches, torch.float32)
    fused = _fused_steps(specs, batches, torch.float32)
    for k in range(2):
        for name, t in exact[k].items():
            if t.is_floating_point():
                assert _error(fused[k][name], t) <= max(2 * _error(rounded[k][name], t), 1e-5), (k, name)
            else:  # num_batches_tracked
                assert torch.equal(fused[k][name], t) and torch.equal(rounded[k][name], t)
    fused64 = _fused_steps(specs, batches, torch.float64)
    for k in range(2):
        for name, t in exact[k].items():
            assert _error(fused64[k][name], t) <= 1e-10, (k, name)


# Columns that differ between a fused member's record and its unfused run's, and why: timing, host and memory
# are the group's process's; the fusion columns say it was fused.
OWN_TO_THE_PROCESS = {
    "started_at",
    "ended_at",
    "epoch_seconds",
    "train_seconds",
    "test_seconds",
    "images_per_s",
    "wall_seconds",
    "peak_host_mb",
    "fuse_size",
    "fused_with",
}


def test_fused_and_unfused_records_agree_column_by_column(small_root, tmp_path):
    """3 seeds x 3 epochs, float32, deterministic, one thread, a gentle recipe counted in iterations with a
    warm-up, a validation split and a logger: every column of a fused member's record is its unfused run's,
    numbers within 1e-3 relative (measured: up to 1.3e-4, the test loss of epoch 3, where BatchNorm statistics
    of two steps an epoch amplify float32 rounding), and each member logs its own curves."""
    torch.set_num_threads(1)  # put back by conftest's fixture
    specs = _specs(small_root, tmp_path / "fused", recipe=GENTLE_WARM, epochs=None, val_split=32, logger="csv")
    fused = [records.read_record(p) for p in _quiet(fit_group, specs, device=CPU)]
    for spec, member in zip(specs, fused):
        alone = records.read_record(_quiet(fit, dataclasses.replace(spec, results=str(tmp_path / "alone")), device=CPU))
        assert member.keys() == alone.keys()
        assert member["fuse_size"] == 3 and alone["fuse_size"] is None
        assert (member["epochs_done"], member["iterations"], member["warmup_iterations"]) == (3, 6, 3)
        assert member["val_images"] == 32 and len(member["val_acc"]) == 3
        for key in member.keys() - OWN_TO_THE_PROCESS - {"results"}:
            a, b = member[key], alone[key]
            if isinstance(a, float) or (isinstance(a, list) and a and isinstance(a[0], float)):
                assert a == pytest.approx(b, rel=1e-3, abs=1e-6), key
            else:
                assert a == b, key
        logged = Layout(spec.results).loggers(spec.run_id) / "csv" / "metrics.csv"
        rows = logged.read_text().splitlines()
        assert len(rows) == 4 and f"{member['test_acc'][-1]}" in rows[-1], rows
    assert fused[0]["test_loss"] != fused[1]["test_loss"]


class _CrashAfter(L.Callback):
    """A node lost after ``epochs`` epochs (their checkpoints written)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            raise RuntimeError("node lost")


class _BlowUp(L.Callback):
    """Member 1's logits are NaN from the first step."""

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model.net.fc.weight[1].fill_(float("inf"))


@pytest.mark.slow
def test_group_records_resume_bit_identically_and_a_diverging_member_fails_alone(small_root, tmp_path, monkeypatch):
    whole = _specs(small_root, tmp_path / "whole", seeds=(0, 1))
    paths = _quiet(fit_group, whole, device=CPU)
    rows = [records.read_record(p) for p in paths]
    for spec, r in zip(whole, rows):
        others = [s.run_id for s in whole if s is not spec]
        assert r["run_id"] == spec.run_id and r["status"] == "completed" and r["seed"] == spec.seed
        assert r["fuse_size"] == 2 and r["fused_with"] == others and r["epochs_done"] == 2
        assert len(r["test_acc"]) == 2 and r["lr_curve"] == pytest.approx([0.1, 0.1 * 0.2**2])
        assert r["params"] == 269_722 and r["attempts"] == 1 and r["precision_used"] == "32-true"
        assert read_progress(spec.results, spec.run_id) is None
        assert (r["alloc_gpus"], r["alloc_cpus"]) == (allocation_gpus(), allocation_cpus())
        assert r["wall_seconds"] >= r["train_seconds"] + r["test_seconds"]
    assert rows[0]["wall_seconds"] == rows[1]["wall_seconds"]  # the group's time, shared
    assert rows[0]["peak_host_mb"] == rows[1]["peak_host_mb"] > 50 and rows[0]["peak_device_mb"] is None
    assert rows[0]["final_train_loss"] != rows[1]["final_train_loss"]

    # interrupted after epoch 1, then resumed: the same numbers to the last bit
    resumed = _specs(small_root, tmp_path / "resumed", seeds=(0, 1))
    with pytest.raises(RuntimeError, match="node lost"):
        _quiet(fit_group, resumed, device=CPU, callbacks=[_CrashAfter(1)])
    stopped = [records.read_record(Layout(s.results).record(s.run_id)) for s in resumed]
    assert stopped[0]["peak_host_mb"] == stopped[1]["peak_host_mb"] > 50  # failed, still the group's peak
    for spec, r in zip(resumed, stopped):
        assert r["status"] == "failed" and r["epochs_done"] == 1 and r["error"] == "RuntimeError: node lost"
        progress = read_progress(spec.results, spec.run_id)
        assert progress is not None and (progress["epochs_done"], progress["epochs"]) == (1, 2)
        assert len(progress["epoch_seconds"]) == 1 and progress["test_acc"] is not None  # what status's ETA reads
    again = [records.read_record(p) for p in _quiet(fit_group, resumed, device=CPU)]
    for r, alone in zip(again, rows):
        assert r["status"] == "completed" and r["attempts"] == 2
        # both attempts count: the first up to its checkpoint after epoch 1
        assert r["wall_seconds"] >= r["train_seconds"] + r["test_seconds"]
        for key in ("train_loss", "test_loss", "test_acc", "lr_curve"):
            assert r[key] == alone[key], key
    states = [
        torch.load(Layout(s[0].results).group_checkpoint(group_id([x.run_id for x in s])), weights_only=True)
        for s in (whole, resumed)
    ]
    assert all(torch.equal(states[0]["state_dict"][k], t) for k, t in states[1]["state_dict"].items())

    # member 1 diverges in epoch 1: it fails, with that epoch counted as its unfused run counts it, and member 0
    # trains on
    diverging = _specs(small_root, tmp_path / "diverging", seeds=(0, 1))
    # killed between the diverged member's record and the checkpoint that drops it: the member is failed already
    ckpt = Layout(tmp_path / "diverging").group_checkpoint(group_id([s.run_id for s in diverging]))
    replacing = atomic.replacing

    def killed_at_the_checkpoint(path):
        if Path(path) == ckpt:
            raise RuntimeError("killed")
        return replacing(path)

    with monkeypatch.context() as m:
        m.setattr(atomic, "replacing", killed_at_the_checkpoint)
        with pytest.raises(RuntimeError, match="killed"):
            _quiet(fit_group, diverging, device=CPU, callbacks=[_BlowUp()])
    killed = records.read_record(Layout(diverging[1].results).record(diverging[1].run_id))
    assert killed["status"] == "failed" and killed["error"] == "Diverged: training loss nan in epoch 1"
    paths = _quiet(fit_group, diverging, device=CPU, callbacks=[_BlowUp()])
    bad = records.read_record(Layout(diverging[1].results).record(diverging[1].run_id))
    assert bad["status"] == "failed" and bad["epochs_done"] == 1 and bad["final_train_loss"] != bad["final_train_loss"]
    assert bad["error"] == "Diverged: training loss nan in epoch 1"
    assert bad["fuse_size"] == 2 and len(paths) == 2 and bad["peak_host_mb"] > 50
    r = records.read_record(Layout(diverging[0].results).record(diverging[0].run_id))
    assert r["status"] == "completed" and r["epochs_done"] == 2
    # epoch 1 ran in the same group of 2: bit-identical; epoch 2 alone, in kernels that sum in another order
    assert r["test_acc"][0] == rows[0]["test_acc"][0] and r["train_loss"][0] == rows[0]["train_loss"][0]
    assert r["train_loss"][1] == pytest.approx(rows[0]["train_loss"][1], rel=1e-3)


class _Backend:
    """Stands in for inductor (``compile_fx``, which torch.compile calls once per graph it captures): records the
    images each graph was captured for and runs the graph eagerly, or fails as a broken toolchain does."""

    def __init__(self, fail: bool):
        self.fail, self.images = fail, []

    def __call__(self, gm, example_inputs, **kw):
        if self.fail:
            raise OSError("no C++ compiler here")
        self.images += [(tuple(t.shape), t.stride()) for t in example_inputs if t.shape[-3:] == (3, 32, 32)]
        return gm.forward


def test_a_fused_group_compiles_the_graph_it_trains_and_falls_back_to_eager(small_root, tmp_path, monkeypatch):
    """The probe captures the stacked batches' layout itself, so the first real step runs the probe's graph;
    where the compiler fails the group trains eagerly and every member's record says why."""
    import torch._inductor.compile_fx as inductor

    specs = _specs(small_root, tmp_path / "ok", seeds=(0, 1), epochs=1, compile="default")
    real = _batches(specs, 0)[0][0]
    backend = _Backend(fail=False)
    monkeypatch.setattr(inductor, "compile_fx", backend)
    torch.compiler.reset()
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rows = [records.read_record(p) for p in fit_group(specs, device=CPU)]
        assert [r["compile_fallback"] for r in rows] == [None, None] and "compiled (mode default)" in out.getvalue()
        training = [shape for shape, _ in backend.images if len(shape) == 5]  # the test set's batches are 4-d
        assert backend.images[0] == (tuple(real.shape), real.stride()) and len(training) == 1, backend.images

        monkeypatch.setattr(inductor, "compile_fx", _Backend(fail=True))
        torch.compiler.reset()
        broken = _specs(small_root, tmp_path / "broken", seeds=(0, 1), epochs=1, compile="default")
        with contextlib.redirect_stdout(out):
            rows = [records.read_record(p) for p in fit_group(broken, device=CPU)]
    finally:
        torch.compiler.reset()
    assert [r["status"] for r in rows] == ["completed", "completed"]
    reasons = [r["compile_fallback"] or "" for r in rows]
    assert all("OSError: no C++ compiler here" in reason for reason in reasons), reasons
    assert f"[{group_id([s.run_id for s in broken])}] torch.compile failed, training eagerly" in out.getvalue()


GRID = """
models: [resnet20]
datasets: [synthetic10]
opts: [cos-200]
epochs: 1
batch_sizes: [64]
seeds: [0, 1, 2]
precision: 32-true
deterministic: true
"""


def test_grid_fuse_keys_are_checked_and_never_change_run_ids():
    plain = parse_grid(GRID)
    fused = parse_grid(GRID + "fuse: seeds\nfuse_max: 2\n")
    assert [s.run_id for s in fused.specs] == [s.run_id for s in plain.specs] and plain.fuse == {}
    assert fused.fuse == {s.run_id: 2 for s in fused.specs}
    assert set(parse_grid(GRID + "fuse: seeds\n").fuse.values()) == {8}
    # an include entry inherits the grid's fusion, or sets its own
    off = parse_grid(GRID + "fuse: seeds\ninclude:\n  - {seed: 5, fuse: false}\n")
    assert len(off.specs) == 4 and off.specs[3].run_id not in off.fuse
    # what a run alone trains, a fused group trains: iterations, warm-up, a validation split, a logger
    for text in (
        GRID + "val_split: 100\n",
        GRID.replace("cos-200", "he2016"),
        GRID.replace("cos-200", "akamaster").replace("resnet20", "resnet110"),
        GRID + "logger: csv\n",
    ):
        assert len(parse_grid(text + "fuse: seeds\n").fuse) == 3, text
    on = parse_grid(GRID + "include:\n  - {seed: 5, fuse: seeds, fuse_max: 3}\n  - {seed: 6}\n")
    assert on.fuse == {on.specs[3].run_id: 3}
    for text, message in (
        ("fuse: seed\n", "fuse: unknown fuse mode 'seed' (did you mean 'seeds'?); valid: seeds"),
        ("fuse_max: 4\n", "fuse_max: applies to fused runs only; add fuse: seeds or remove it"),
        ("fuse: seeds\nfuse_max: 0\n", "fuse_max: must be"),
        ("fuse: seeds\nloader: torchvision\n", "fuse: seeds needs loader: device"),
        ("fuse_size: 4\n", "unknown key 'fuse_size' (did you mean 'fuse'?)"),
    ):
        with pytest.raises(GridError, match=re.escape(message)):
            parse_grid(GRID + text, source="g.yaml")


def test_tasks_put_runs_that_differ_in_their_seed_together_up_to_fuse_max():
    grid = parse_grid(GRID.replace("[0, 1, 2]", "[0, 1, 2, 3, 4]").replace("[64]", "[64, 128]"))
    specs = list(grid.specs)  # batch size outermost: 64 x seeds 0-4, then 128 x seeds 0-4
    fuse = {s.run_id: 2 for s in specs if s.seed != 4}
    assert fused_groups(specs, fuse) == [specs[0:2], specs[2:4], [specs[4]], specs[5:7], specs[7:9], [specs[9]]]
    assert [len(t) for t in fused_groups(specs, {})] == [1] * 10


def test_fused_groups_are_tasks_of_their_own_and_the_runs_left_alone_are_packed():
    # seeds 0-4 fuse two at a time: groups {0, 1} and {2, 3}; seed 4 is alone, and packs with batch 128's seed 4
    grid = parse_grid(GRID.replace("[0, 1, 2]", "[0, 1, 2, 3, 4]") + "fuse: seeds\nfuse_max: 2\npack: 2\n")
    specs = list(grid.specs)
    tasks = make_tasks(specs, grid.resources, grid.fuse, Evidence.none())
    assert [([s.seed for s in t.specs], t.fused) for t in tasks] == [([0, 1], True), ([2, 3], True), ([4], False)]
    alone = parse_grid(GRID.replace("[0, 1, 2]", "[0]").replace("[64]", "[64, 128]") + "fuse: seeds\npack: 2\n")
    tasks = make_tasks(list(alone.specs), alone.resources, alone.fuse, Evidence.none())
    assert [([s.batch_size for s in t.specs], t.fused) for t in tasks] == [([64, 128], False)]


def test_a_fused_grid_through_local_submit_and_status(small_root, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.replace("[0, 1, 2]", "[0, 1]") + f"fuse: seeds\nroot: {small_root}\nresults: {tmp_path}/r\n")
    assert main(["submit", str(grid), "--executor", "local", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "fused: 2 runs in 1 group of up to 2 (one array task each)" in out and "completed: 2" in out
    specs = load_grid(grid, fingerprint=fingerprint).specs  # as submit names the runs
    rows = [records.read_record(Layout(tmp_path / "r").record(s.run_id)) for s in specs]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["fused_with"] for r in rows] == [[specs[1].run_id], [specs[0].run_id]]
    assert [r["fuse_size"] for r in rows] == [2, 2] and rows[0]["test_acc"] != rows[1]["test_acc"]
    # one process trained the group: each member holds its peak
    assert rows[0]["peak_host_mb"] == rows[1]["peak_host_mb"] > 50
    assert [r["peak_device_mb"] for r in rows] == [None, None]
    assert main(["status", str(tmp_path / "r"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == {"completed": 2} and len({run["job_id"] for run in report["runs"]}) == 1


@pytest.mark.slow
@pytest.mark.extended
def test_fused_members_train_like_their_unfused_runs(synthetic_root, tmp_path):
    """The setup whose run-to-run noise test_parity measured (resnet20, synthetic10 1000/500, cos-200 over 5
    epochs, batch 64, CPU): unfused device-loader runs of seeds 0-19 end at 0.942-1.000 (median 0.997), and
    medians of 6 runs differ by more than 0.035 in 1% of random splits. Fused members must stay inside that:
    the medians of 6 within test_parity's tolerance, every member within the range of the 20 unfused runs, and
    each epoch's median training loss within the spread of the unfused runs' losses of that epoch."""
    fields = dict(model="resnet20", dataset="synthetic10", recipe=get_recipe("cos-200"), batch_size=64, epochs=5)
    fields |= dict(deterministic=True, data_root=str(synthetic_root), results=str(tmp_path))
    specs = [RunSpec(**fields, seed=s) for s in range(6)]
    fused = [records.read_record(p) for p in _quiet(fit_group, specs, device=CPU)]
    for spec in specs:
        _quiet(fit, dataclasses.replace(spec, results=str(tmp_path / "alone")), device=CPU)
    alone = [records.read_record(Layout(tmp_path / "alone").record(s.run_id)) for s in specs]
    fused_acc = [r["final_test_acc"] for r in fused]
    alone_acc = [r["final_test_acc"] for r in alone]
    assert abs(statistics.median(fused_acc) - statistics.median(alone_acc)) <= 0.05, (fused_acc, alone_acc)
    assert min(fused_acc) >= 0.94, fused_acc
    for epoch in range(5):
        losses = [r["train_loss"][epoch] for r in alone]
        assert min(losses) <= statistics.median(r["train_loss"][epoch] for r in fused) <= max(losses), epoch


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.extended
def test_a_fused_grid_on_slurm_is_one_array_task_per_group(small_root, tmp_path, capsys):
    if not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed")
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        GRID
        + f"fuse: seeds\nfuse_max: 2\nroot: {small_root}\nresults: {tmp_path}/r\n"
        + 'slurm: {gpus_per_node: 1, cpus_per_task: 1, time: "00:20:00", setup: ["export OMP_NUM_THREADS=1"]}\n'
    )
    try:
        assert main(["submit", str(grid), "--executor", "slurm", "--wait"]) == 0
    finally:
        manifests = list((tmp_path / "r" / "submissions").glob("*.json"))
        jobs = {e["array_job_id"] for m in manifests for e in json.loads(m.read_text())["runs"]}
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)
    assert "completed: 3" in capsys.readouterr().out
    [manifest] = [json.loads(m.read_text()) for m in manifests]
    by_run = {e["run_id"]: e for e in manifest["runs"]}
    specs = load_grid(grid, fingerprint=fingerprint).specs  # as submit names the runs
    assert by_run[specs[0].run_id]["job_id"] == by_run[specs[1].run_id]["job_id"] != by_run[specs[2].run_id]["job_id"]
    rows = [records.read_record(Layout(tmp_path / "r").record(s.run_id)) for s in specs]
    assert [r["fuse_size"] for r in rows] == [2, 2, None] and rows[0]["fused_with"] == [specs[1].run_id]
    assert rows[0]["slurm_array_task_id"] == rows[1]["slurm_array_task_id"] != rows[2]["slurm_array_task_id"]
