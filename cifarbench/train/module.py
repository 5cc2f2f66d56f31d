"""The LightningModule of a run: cross-entropy on a CIFAR ResNet, the recipe's optimiser and schedule, a
per-epoch history summed on the device, and the checkpoint that resume needs.

A recipe without warm-up counted in epochs runs on MultiStepLR or CosineAnnealingLR stepped once per epoch, as it
always has; one with a warm-up (for this model) or counted in iterations runs on ``PlannedLR``, stepped after
every optimizer step, which sets the learning rate that ``RunSpec.steps`` gives for the next step."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import cast

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from cifarbench.config.spec import RunSpec, Steps
from cifarbench.errors import UsageError
from cifarbench.store import atomic
from cifarbench.store.progress import write_progress
from cifarbench.train.models import get_resnet, init_weights


class Diverged(RuntimeError):
    """The training loss of an epoch is NaN or infinite: the run stops there and leaves a failed record (a packed
    run alone; the others of its task go on)."""


class CheckpointMismatch(UsageError):
    """A checkpoint in a run's folder that belongs to another run."""


class PlannedLR(torch.optim.lr_scheduler.LRScheduler):
    """The learning rate of each optimizer step as ``steps.lr`` says: a warm-up, milestones counted in steps,
    a cosine. Its state is the step count alone: the plan comes from the spec, and stays out of checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: Steps):
        self.steps = steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:  # type: ignore[override]  # torch 2.11's stub returns a list, later a tuple
        return [self.steps.lr(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "steps")}


class ResNetModule(L.LightningModule):
    """Cross-entropy classification with a per-epoch history kept on the device until the epoch ends.

    ``steps``: the schedule step by step (``RunSpec.steps`` for the training loader's length); training stops after
    its last step, mid-epoch where the recipe counts iterations. With ``validation``, the second validation loader
    is the held-out part of the training set, the first the test set."""

    def __init__(self, spec: RunSpec, *, steps: Steps, fused_sgd: bool = False, validation: bool = False):
        super().__init__()
        self.spec = spec
        self.steps = steps
        self.validation = validation
        self.fused_sgd = fused_sgd
        self.model = get_resnet(spec.model, spec.num_classes)
        self.model.apply(init_weights)
        k = spec.num_classes
        # validate_args checks every batch's labels on the host: a device sync per test batch, for labels that
        # the loaders already guarantee
        self.top1 = MulticlassAccuracy(num_classes=k, top_k=1, average="micro", validate_args=False)
        self.top5 = (
            MulticlassAccuracy(num_classes=k, top_k=5, average="micro", validate_args=False) if k >= 100 else None
        )
        self.val_top1 = MulticlassAccuracy(num_classes=k, top_k=1, average="micro", validate_args=False)
        self.history: dict[str, list[float]] = {
            k: []
            for k in (
                "train_loss",
                "test_loss",
                "test_acc",
                "test_top5",
                "lr",
                "epoch_seconds",
                "images_per_s",
                "val_loss",
                "val_acc",
            )
        }
        self.attempts = 1
        self._sums: torch.Tensor | None = None  # set by _zero_sums before the first step of an epoch
        self._epoch_start = 0.0
        self._train_seconds = 0.0
        self._test_seconds = 0.0
        self.attempt_started = time.time()  # fit sets when this attempt's process began its task
        self._wall_before = 0.0  # wall-clock seconds of earlier attempts, up to their last checkpoint

    def forward(self, x):
        if self.spec.compile:
            # CUDA graphs (reduce-overhead) reuse their output memory from one call to the next: say where a new
            # step starts, so that a test step after a training step never reads an overwritten output
            torch.compiler.cudagraph_mark_step_begin()
        return self.model(x)

    def configure_optimizers(self):
        recipe = self.spec.schedule
        sched: torch.optim.lr_scheduler.LRScheduler
        opt = torch.optim.SGD(
            self.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            fused=self.fused_sgd or None,
        )
        if self.steps.warmup_steps or recipe.iterations is not None:
            return {"optimizer": opt, "lr_scheduler": {"scheduler": PlannedLR(opt, self.steps), "interval": "step"}}
        if recipe.schedule == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(recipe.milestones), gamma=recipe.gamma)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # Losses and counts are summed on the device; the host reads them once per epoch.
    def _zero_sums(self):
        # train loss, n, test loss, n, validation loss, n
        self._sums = torch.zeros(6, device=self.device, dtype=torch.float64)

    def on_train_epoch_start(self):
        self._zero_sums()
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self._epoch_start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        sums = cast(torch.Tensor, self._sums)  # zeroed by on_train_epoch_start
        sums[0] += loss.detach() * len(y)
        sums[1] += len(y)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # the last step of a schedule counted in iterations can fall inside an epoch: stop there, which Lightning
        # lets the test pass of that epoch follow
        if self.trainer.global_step >= self.steps.total:
            self.trainer.should_stop = True

    def on_validation_epoch_start(self):
        if self._sums is None:
            self._zero_sums()
        self._train_end = time.perf_counter()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        sums = cast(torch.Tensor, self._sums)  # zeroed by on_validation_epoch_start at the latest
        at = 4 if dataloader_idx == 1 else 2  # 1: the validation split
        sums[at] += F.cross_entropy(logits, y, reduction="sum")
        sums[at + 1] += len(y)
        if dataloader_idx == 1:
            self.val_top1.update(logits, y)
            return
        self.top1.update(logits, y)
        if self.top5 is not None:
            self.top5.update(logits, y)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        sums = cast(torch.Tensor, self._sums)  # zeroed by on_validation_epoch_start at the latest
        train_loss, n_train, test_loss, n_test, val_loss, n_val = sums.tolist()  # the epoch's one host-device sync
        h = self.history
        now = time.perf_counter()
        train_seconds = max(self._train_end - self._epoch_start, 1e-9)
        h["train_loss"].append(train_loss / max(n_train, 1))
        h["test_loss"].append(test_loss / max(n_test, 1))
        h["test_acc"].append(float(self.top1.compute()))
        h["test_top5"].append(float(self.top5.compute()) if self.top5 is not None else float("nan"))
        h["lr"].append(self._epoch_lr)
        h["epoch_seconds"].append(now - self._epoch_start)
        h["images_per_s"].append(n_train / train_seconds)
        if self.validation:
            h["val_loss"].append(val_loss / max(n_val, 1))
            h["val_acc"].append(float(self.val_top1.compute()))
            self.val_top1.reset()
        self._train_seconds += train_seconds
        self._test_seconds += now - self._train_end
        self.top1.reset()
        if self.top5 is not None:
            self.top5.reset()
        self._sums = None
        for logger in self.trainer.loggers:  # a grid's `logger:`; none by default
            logger.log_metrics(
                {
                    k: h[k][-1]
                    for k in ("train_loss", "test_loss", "test_acc", "test_top5", "lr", "epoch_seconds", "images_per_s")
                    if h[k][-1] == h[k][-1]  # not NaN: top-5 below 100 classes
                },
                step=len(h["test_acc"]),
            )
            logger.save()
        if not self.trainer.progress_bar_callback:
            epoch = len(h["test_acc"])
            print(
                f"[{self.spec.run_id}] epoch {epoch}/{self.steps.epochs} train_loss {h['train_loss'][-1]:.4f} "
                f"test_loss {h['test_loss'][-1]:.4f} test_acc {h['test_acc'][-1]:.4f} "
                + (f"val_acc {h['val_acc'][-1]:.4f} " if self.validation else "")
                + f"lr {h['lr'][-1]:.4g} "
                f"{h['epoch_seconds'][-1]:.1f}s {h['images_per_s'][-1]:.0f} img/s",
                flush=True,
            )
        if not math.isfinite(h["train_loss"][-1]):  # before the epoch's checkpoint: a retry starts before it
            raise Diverged(f"training loss {h['train_loss'][-1]} in epoch {len(h['test_acc'])}")

    def on_save_checkpoint(self, checkpoint):
        checkpoint["cifarbench"] = {
            "run_id": self.spec.run_id,
            "history": self.history,
            "attempts": self.attempts,
            "train_seconds": self._train_seconds,
            "test_seconds": self._test_seconds,
            "wall_seconds": self.wall_seconds(),
        }

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("cifarbench", {})
        if saved.get("run_id") != self.spec.run_id:
            raise CheckpointMismatch(
                f"checkpoint belongs to run {saved.get('run_id')!r}, not {self.spec.run_id!r}; "
                "move it away or use another results folder"
            )
        self.history.update(saved["history"])  # a checkpoint of an earlier version lacks the validation curves
        self.attempts = saved["attempts"] + 1
        self._train_seconds = saved["train_seconds"]
        self._test_seconds = saved.get("test_seconds", 0.0)  # checkpoints of earlier versions lack it
        self._wall_before = saved.get("wall_seconds", 0.0)

    def wall_seconds(self) -> float:
        """Wall-clock seconds of every attempt so far: earlier ones up to their last checkpoint, this one whole."""
        return self._wall_before + time.time() - self.attempt_started


class AtomicLastCheckpoint(L.Callback):
    """Save ``last.ckpt`` after every epoch atomically (``cifarbench.store.atomic``), so a kill mid-write or a
    second job of the same run never leaves a torn checkpoint; then the run's progress file."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        with atomic.replacing(self.path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # the full state: optimiser, scheduler, loops
        spec = pl_module.spec
        h = pl_module.history
        write_progress(
            spec.results,
            spec.run_id,
            epochs_done=len(h["test_acc"]),
            epochs=pl_module.steps.epochs,
            epoch_seconds=h["epoch_seconds"],
            test_acc=h["test_acc"][-1] if h["test_acc"] else None,
        )
