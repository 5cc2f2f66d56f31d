from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.store.records import write_record
from cifarbench.train import data


@pytest.fixture(autouse=True)
def _torch_settings_restored():
    """Global torch settings that training sets (Lightning's Trainer(deterministic=True), a pinned thread count,
    cuDNN and matmul flags) are put back after each test, so that no test runs under another's."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.get_float32_matmul_precision(),
    )
    yield
    deterministic, warn_only, threads, benchmark, cudnn_deterministic, matmul = saved
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = cudnn_deterministic
    torch.set_float32_matmul_precision(matmul)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic10 + synthetic100 in the real CIFAR layout, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("data")
    data.write_synthetic("synthetic10", root, train_size=1000, test_size=500)
    data.write_synthetic("synthetic100", root, train_size=1000, test_size=500)
    return root


def record_row(**fields) -> dict:
    """A record as the training job writes it, with plausible values; ``fields`` override any of them.

    The spec fields (model, dataset, recipe, batch_size, seed, epochs, precision, loader, deterministic, compile)
    go through a real RunSpec, so the run id and the recipe's fields (lr, milestones, ...) are the real ones."""
    spec_keys = (
        "model",
        "dataset",
        "recipe",
        "batch_size",
        "seed",
        "epochs",
        "precision",
        "loader",
        "deterministic",
        "compile",
    )
    spec = {"model": "resnet20", "dataset": "cifar10", "recipe": "step-200", "batch_size": 64, "seed": 0}
    spec.update({k: fields.pop(k) for k in spec_keys if k in fields})
    run = RunSpec(**{**spec, "recipe": get_recipe(spec["recipe"])})
    sched = run.schedule
    final = fields.get("final_test_acc", 0.9)
    curve = fields.get("test_acc") or [
        final * (1 - 0.9 ** (e + 1)) / (1 - 0.9**sched.epochs) for e in range(sched.epochs)
    ]
    ended = datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(hours=run.seed)
    row = {
        "run_id": run.run_id,
        "status": "completed",
        "model": run.model,
        "dataset": run.dataset,
        "recipe": run.recipe.name,
        "recipe_epochs": run.recipe.epochs,
        "lr": sched.lr,
        "momentum": sched.momentum,
        "weight_decay": sched.weight_decay,
        "schedule": sched.schedule,
        "milestones": list(sched.milestones),
        "gamma": sched.gamma,
        "batch_size": run.batch_size,
        "seed": run.seed,
        "epochs": sched.epochs,
        "precision": run.precision,
        "precision_used": "32-true",
        "loader": run.loader,
        "deterministic": run.deterministic,
        "compile": run.compile,
        "compile_fallback": None,
        "data_root": "data",
        "data_verified": True,
        "num_classes": run.num_classes,
        "params": 272_474,
        "epochs_done": sched.epochs,
        "final_test_acc": final,
        "best_test_acc": max(curve),
        "best_epoch": curve.index(max(curve)) + 1,
        "test_acc": curve,
        "train_seconds": 1800.0,
        "images_per_s": 5000.0,
        "attempts": 1,
        "started_at": ended - timedelta(seconds=1800),
        "ended_at": ended,
        "hostname": "node01",
    }
    return {**row, **fields}


@pytest.fixture
def write_records(tmp_path):
    """``write_records([{"model": "resnet56", "final_test_acc": 0.93}, ...], results=None) -> results folder``:
    each dict goes through ``record_row`` and ``cifarbench.store.records.write_record`` (default folder:
    tmp_path / "results")."""

    def write(rows, results=None) -> Path:
        results = Path(results or tmp_path / "results")
        for fields in rows:
            write_record(record_row(**fields), results)
        return results

    return write


def pytest_addoption(parser):
    parser.addoption(
        "--extended",
        action="store_true",
        help="also run the tests marked `extended` (long end-to-end variants; CI keeps one path of each feature)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--extended"):
        return
    skip = pytest.mark.skip(reason="extended test: run with --extended")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)
