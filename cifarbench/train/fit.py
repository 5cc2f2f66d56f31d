"""The training of a run, or of a fused group of runs that differ only in their seed: the fast path's settings,
and ``fit`` and ``fit_group``, one Lightning fit of ``ResNetModule`` that always leaves every member's record."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, cast

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException

import cifarbench
from cifarbench.config.resources import Budget, Packing
from cifarbench.config.spec import DATASETS, RunSpec, Steps
from cifarbench.errors import UsageError
from cifarbench.store import datasets, records
from cifarbench.store.layout import Layout
from cifarbench.store.progress import clear_progress, read_progress
from cifarbench.store.records import spec_fields
from cifarbench.system import (
    allocation_cpus,
    allocation_gpus,
    git_commit,
    peak_rss_mb,
    reset_peak_rss,
    task_ended,
    task_started,
)
from cifarbench.train import data, ddp, ranks
from cifarbench.train.fuse import StackedBatches, check_fusable, fusion_fields, group_id
from cifarbench.train.loggers import make_logger
from cifarbench.train.module import AtomicLastCheckpoint, ResNetModule


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type == "cuda":
            return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        return "32-true"
    if requested == "16-mixed" and device.type != "cuda":
        raise UsageError("precision 16-mixed needs a GPU; use 32-true or bf16-mixed on CPU")
    return requested


@dataclass(frozen=True, kw_only=True)
class FastPath:
    """The speed settings of training steps that leave the result alone (precision aside). ``for_device`` is what
    ``fit`` uses; ``cifarbench bench --levers`` measures each field flipped."""

    precision: str
    channels_last: bool
    cudnn_benchmark: bool
    fused_sgd: bool

    @classmethod
    def for_device(cls, device: torch.device, precision: str = "auto") -> FastPath:
        # channels_last measured 1.22-1.34x on CPU as well (resnet20/56, bench --levers); fused SGD on CPU
        # 1.01-1.05x, within noise
        cuda = device.type == "cuda"
        return cls(
            precision=resolve_precision(precision, device), channels_last=True, cudnn_benchmark=cuda, fused_sgd=cuda
        )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def _environment(device: torch.device) -> dict:
    import torchvision

    cuda = device.type == "cuda"
    return {
        "hostname": socket.gethostname(),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "device_count": torch.cuda.device_count() if cuda else 1,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "lightning_version": L.__version__,
        "cifarbench_version": cifarbench.__version__,
        "cuda_version": torch.version.cuda,
        "git_commit": git_commit(),
        "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "python": sys.executable,
        # apptainer sets the first inside an image, singularity the second
        "container": os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"),
    }


def allocation_fields(packing: Packing | None = None, spec: RunSpec | None = None) -> dict:
    """The record's allocation columns: the GPUs and CPUs of the array task the run trains in; for a run on
    several processes (``spec.world_size`` > 1), those of all its tasks on all its nodes, of which this process
    sees its own task's CPUs and its own node's GPUs."""
    packing = packing or Packing()
    nodes, tasks = (spec.nodes, spec.world_size) if spec is not None else (1, 1)
    return {
        "alloc_gpus": allocation_gpus() * nodes if packing.alloc_gpus is None else packing.alloc_gpus,
        "alloc_cpus": allocation_cpus() * tasks if packing.alloc_cpus is None else packing.alloc_cpus,
    }


def schedule_fields(spec: RunSpec, steps: Steps) -> dict:
    """The schedule as the run trains it on its data: epochs and iterations, milestones in the recipe's unit, the
    warm-up in steps (0 where this model does not warm up)."""
    own = dataclasses.replace(spec, epochs=None).steps(steps.steps_per_epoch)
    milestones = spec.schedule.milestones if spec.recipe.iterations is None else steps.milestones
    warm = steps.warmup_steps > 0
    return {
        "recipe_epochs": own.epochs,
        "epochs": steps.epochs,
        "iterations": steps.total,
        "milestones": list(milestones),
        "warmup_iterations": steps.warmup_steps,
        "warmup_lr": steps.warmup_lr if warm else None,
        "warmup_mode": steps.warmup_mode if warm else None,
    }


def check_data(spec: RunSpec) -> dict:
    """The record's data columns of ``spec``'s data, after checking it is there and is the data the run was
    submitted with (its fingerprint); raises DataError otherwise."""
    checked = data.check_dataset(spec.dataset, spec.data_root, verify=spec.verify)
    found = datasets.fingerprint(spec.dataset, spec.data_root)
    if spec.data_fingerprint is not None and found != spec.data_fingerprint:
        raise datasets.DataError(
            f"the data in {Path(spec.data_root).resolve()} is not the data this run was submitted with "
            f"(fingerprint {found}, not {spec.data_fingerprint}): restore it, or submit the grid again"
        )
    # "verified": matched the published checksums, which synthetic data does not have
    return {"data_verified": None if DATASETS[spec.dataset].synthetic else checked, "data_fingerprint": found}


def member_outcome(module: ResNetModule, m: int) -> dict:
    """The record's outcome columns of member ``m`` of a module (a run's module has one member)."""
    h = module.histories[m]
    base = {"attempts": module.attempts, "compile_fallback": module.compile_fallback}
    if not h["test_acc"]:
        return {"epochs_done": 0, **base}
    best = max(range(len(h["test_acc"])), key=h["test_acc"].__getitem__)
    top5 = module.top5
    validated = {}
    if module.validation and h["val_acc"]:
        by_val = max(range(len(h["val_acc"])), key=h["val_acc"].__getitem__)  # the first of equals
        validated = {
            "val_loss": h["val_loss"],
            "val_acc": h["val_acc"],
            "best_val_acc": h["val_acc"][by_val],
            "best_val_epoch": by_val + 1,
            "test_acc_at_best_val": h["test_acc"][by_val],
        }
    return {
        **validated,
        **base,
        "epochs_done": len(h["test_acc"]),
        "final_test_acc": h["test_acc"][-1],
        "best_test_acc": h["test_acc"][best],
        "best_epoch": best + 1,
        "final_test_top5": h["test_top5"][-1] if top5 else None,
        "best_test_top5": max(h["test_top5"]) if top5 else None,
        "final_train_loss": h["train_loss"][-1],
        "final_test_loss": h["test_loss"][-1],
        "train_loss": h["train_loss"],
        "test_loss": h["test_loss"],
        "test_acc": h["test_acc"],
        "test_top5": h["test_top5"] if top5 else None,
        "lr_curve": h["lr"],
        "epoch_seconds": h["epoch_seconds"],
        "train_seconds": module.train_seconds,
        "test_seconds": module.test_seconds,
        "images_per_s": sum(h["images_per_s"]) / len(h["images_per_s"]),
    }


def _quiet_lightning() -> None:
    """Keep job logs to our per-epoch lines: Lightning's start-up banners and tips say nothing about the run."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # submitit starts jobs with srun; outside SLURM (local execution, tests) the hint is wrong.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available")
    # Raised inside Lightning (a torch class it uses is deprecated): nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # GlobalBatchNorm's all-reduce with autograd: its suggested successor is a private torch module
    warnings.filterwarnings("ignore", message=r"torch.distributed.nn.functional.all_reduce is deprecated")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring what ``peak_memory`` reports: at the start of each training attempt, as local execution runs
    several tasks one after another in one process."""
    reset_peak_rss()
    if device.type == "cuda" and torch.cuda.is_initialized():  # before CUDA starts, nothing was allocated
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """The record's peak memory columns: this process's peaks since ``reset_peak_memory``, host and GPU."""
    cuda = device.type == "cuda"
    return {
        "peak_host_mb": peak_rss_mb(),
        "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    }


def fit(
    spec: RunSpec,
    *,
    device: torch.device | None = None,
    num_workers: int | None = None,
    plugins: list | None = None,
    callbacks: list | None = None,
    budget: Budget | None = None,
    packing: Packing | None = None,
) -> Path:
    """Train one run (resuming from its last checkpoint if there is one) and write its record.

    A run that raises leaves a ``failed`` record and re-raises. Returns the record's path. ``budget``: the time
    the run was given on SLURM, for the record; ``packing``: the runs it trained beside, for the record."""
    [path] = _fit(
        [spec],
        budgets=[budget],
        packing=packing,
        device=device,
        num_workers=num_workers,
        plugins=plugins,
        callbacks=callbacks,
    )
    return path


def fit_group(
    specs: Sequence[RunSpec],
    *,
    budgets: Sequence[Budget | None] | None = None,
    device: torch.device | None = None,
    plugins: list | None = None,
    callbacks: list | None = None,
) -> list[Path]:
    """Train ``specs`` (one run but for the seed) as one fused group, resuming from the group's checkpoint if
    there is one, and write each member's record, as ``fit`` does with ``fuse_size`` and ``fused_with`` and the
    group's wall-clock time and peak memory. A member that diverges leaves a failed record and the others go on;
    if the group raises, every member still training leaves a failed record and the exception propagates.
    Returns the records' paths."""
    specs = list(specs)
    check_fusable(specs)
    return _fit(
        specs,
        budgets=list(budgets) if budgets is not None else [None] * len(specs),
        packing=None,
        device=device,
        num_workers=0,
        plugins=plugins,
        callbacks=callbacks,
    )


def _fit(
    specs: list[RunSpec],
    *,
    budgets: Sequence[Budget | None],
    packing: Packing | None,
    device: torch.device | None,
    num_workers: int | None,
    plugins: list | None,
    callbacks: list | None,
) -> list[Path]:
    spec, ids, fused = specs[0], [s.run_id for s in specs], len(specs) > 1
    world = spec.world_size
    assert world == 1 or not fused, "fused groups train on one device"
    # DDP: every rank trains; rank 0 alone writes the checkpoint, progress, loggers and records
    rank = ranks.global_rank() if world > 1 else 0
    device = device or default_device()
    if world > 1:
        device = ddp.rank_device(device)
    _quiet_lightning()
    started = datetime.now(timezone.utc)
    began = task_started()
    layout = Layout(spec.results)
    ckpt = layout.group_checkpoint(group_id(ids)) if fused else layout.checkpoint(spec.run_id)
    packing = packing or Packing()
    environment = _environment(device)  # the group's process: one git call, not one per member
    rows = [
        {
            **spec_fields(s),
            "started_at": started,
            **environment,
            **(b or Budget()).to_dict(),
            **packing.to_dict(s.run_id, on_gpu=device.type == "cuda"),
            **allocation_fields(packing, s),
            **(fusion_fields(ids, s.run_id) if fused else {}),
        }
        for s, b in zip(specs, budgets)
    ]
    module: ResNetModule | None = None
    paths: list[Path] = []

    def finish(members: list[int], status: str) -> None:
        """The records of ``members``; each holds the group's wall-clock time and peak memory."""
        assert module is not None
        shared = {"wall_seconds": module.wall_seconds(), **peak_memory(device)}
        for m in members:
            if rank:  # rank 0 writes the record
                paths.append(Layout(specs[m].results).record(specs[m].run_id))
                continue
            rows[m].update(
                member_outcome(module, m),
                **shared,
                status=status,
                ended_at=datetime.now(timezone.utc),
                error=module.errors[m],
            )
            paths.append(records.write_record(rows[m], specs[m].results))
            clear_progress(specs[m].results, specs[m].run_id)

    try:
        reset_peak_memory(device)
        checked = check_data(spec)
        fast = FastPath.for_device(device, spec.precision)
        if fused and fast.precision == "16-mixed":
            raise UsageError("16-mixed scales the loss once per step for every member: train these runs unfused")
        L.seed_everything(spec.seed, workers=True, verbose=False)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = fast.cudnn_benchmark and not spec.deterministic
            torch.set_float32_matmul_precision("high")
        loaders = data.make_run_loaders(
            dataset=spec.dataset,
            root=spec.data_root,
            loader=spec.loader,
            batch_size=spec.batch_size,
            seed=spec.seed,
            device=device if spec.loader == "device" else "cpu",
            num_workers=num_workers,
            memory_format=fast.memory_format,
            val_split=spec.held_out,
            rank=rank,
            world_size=world,
        )
        steps = spec.steps(len(loaders.train))
        module = ResNetModule(
            specs,
            steps=steps,
            fused_sgd=fast.fused_sgd,
            validation=loaders.val is not None,
            memory_format=fast.memory_format,
        )
        module.attempt_started = began
        for row in rows:  # the seed changes neither the data nor the schedule
            row.update(checked, **loaders.sizes, **schedule_fields(spec, steps))
            row.update(precision_used=fast.precision, params=module.params_per_member)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=spec.gpus_per_run,
            num_nodes=spec.nodes,
            strategy=ddp.strategy(device) if world > 1 else "auto",
            # resolve_precision returns one of AUTOCAST's keys, all of which the Trainer accepts
            precision=cast(Literal["32-true", "16-mixed", "bf16-mixed"], fast.precision),
            max_epochs=steps.epochs,
            deterministic=spec.deterministic,
            logger=[cast(Logger, make_logger(s)) for s in specs] if spec.logger and not rank else False,  # per member
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=sys.stderr.isatty(),
            num_sanity_val_steps=0,
            callbacks=[AtomicLastCheckpoint(ckpt, on_dropped=lambda gone: finish(gone, "failed")), *(callbacks or [])],
            plugins=plugins,
            default_root_dir=str(ckpt.parent),
        )
        if fused and ckpt.is_file() and "state_dict" not in torch.load(ckpt, mmap=True, weights_only=True):
            ckpt.rename(ckpt.with_name(ckpt.name + ".earlier"))
            print(f"[{module.name}] {ckpt} was written by an earlier cifarbench: the group starts again", flush=True)
        trainer.fit(
            module,
            train_dataloaders=StackedBatches(loaders.train, [s.seed for s in specs]) if fused else loaders.train,
            val_dataloaders=[loaders.test, loaders.val] if loaders.val is not None else loaders.test,
            ckpt_path=str(ckpt) if ckpt.is_file() else None,
            weights_only=True,
        )
        for m in module.live:
            if (done := len(module.histories[m]["test_acc"])) < steps.epochs:
                raise RuntimeError(
                    f"training stopped after {done} of {steps.epochs} epochs"
                    + (" (interrupted)" if trainer.interrupted else "")
                )
        finish(module.live, "completed")
        task_ended()
        return paths
    except BaseException as exc:  # also SystemExit/KeyboardInterrupt: an interrupted run still leaves a record
        task_ended()
        if rank:
            raise
        shared = {"wall_seconds": module.wall_seconds() if module else time.time() - began, **peak_memory(device)}
        for m in module.live if module else range(len(specs)):
            rows[m].update(
                member_outcome(module, m) if module else {"epochs_done": 0},  # failed before the model existed
                **shared,
                status="failed",
                ended_at=datetime.now(timezone.utc),
                error=(module.errors[m] if module else None) or error_text(exc),
                traceback="".join(traceback.format_exc().splitlines(keepends=True)[-30:]),
            )
            _write_failed(rows[m], specs[m])
        raise


def error_text(exc: BaseException) -> str:
    """A failed record's error: the exception as ``Type: message``, its first line, at most 500 characters. A
    SIGTERM, which Lightning turns into a SIGTERMException without a message, says that the run was cancelled
    (``records.CANCELLED``): the run did not fail, its process was asked to end."""
    if isinstance(exc, SIGTERMException):
        return f"{records.CANCELLED}: the job received SIGTERM (scancel, a requeue, or the node shutting down)"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def record_death(spec: RunSpec, error: str, *, started: datetime, budget: Budget, packing: Packing) -> None:
    """A failed record for a run whose process died without writing one (killed by a signal, by the kernel for
    memory): what is known without it, and its epochs done from the progress file."""
    progress = read_progress(spec.results, spec.run_id) or {}
    row = {
        **spec_fields(spec),
        **_environment(torch.device("cpu")),
        **budget.to_dict(),
        **packing.to_dict(spec.run_id, on_gpu=False),
        **allocation_fields(packing, spec),
        "device_name": None,  # the process that knew it is gone
        "device_count": None,
        "started_at": started,
        "ended_at": datetime.now(timezone.utc),
        "status": "failed",
        "epochs_done": progress.get("epochs_done", 0),
        "error": error,
    }
    _write_failed(row, spec)


def _write_failed(row: dict, spec: RunSpec) -> None:
    """Record a failure, unless the run already completed (a duplicate job must not undo a finished run)."""
    existing = records.read_record(Layout(spec.results).record(spec.run_id))
    if existing and existing["status"] == "completed":
        return
    try:
        records.write_record(row, spec.results)
    except OSError as e:
        print(
            f"[{spec.run_id}] cannot write the failed record to {spec.results}: {e}; failure: {row['error']}",
            file=sys.stderr,
            flush=True,
        )
