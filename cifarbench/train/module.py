"""The LightningModule of a run, or of a fused group of runs that differ only in their seed: cross-entropy on a
CIFAR ResNet, the recipe's optimiser and schedule, a per-epoch history summed on the device, torch.compile, and
the checkpoint that resume needs.

A module trains K members. K = 1 is a run, its model as it is; K > 1 a fused group, whose models are stacked and
run under vmap (``fuse.Stacked``). Logits are ``[K, B, classes]`` for every K, so that losses, sums, histories,
loggers, log lines, the schedule and the checkpoint are the same code for a run and for a group.

A recipe without warm-up counted in epochs runs on MultiStepLR or CosineAnnealingLR stepped once per epoch, as it
always has; one with a warm-up (for this model) or counted in iterations runs on ``PlannedLR``, stepped after
every optimizer step, which sets the learning rate that ``RunSpec.steps`` gives for the next step.

A run on several processes (DDP, ``RunSpec.world_size``) is a run whose every rank trains on its share of each
batch (``train.ddp``): its loss is scaled so that DDP's averaged gradient is the global batch's, its training sums
are added up over the ranks before they become the history, and with ``sync_bn`` its BatchNorm layers normalise
with the global batch's statistics."""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import lightning as L
import torch
import torch.nn.functional as F

from cifarbench.config.spec import RunSpec, Steps
from cifarbench.errors import UsageError
from cifarbench.store import atomic
from cifarbench.store.progress import write_progress
from cifarbench.train import data, ddp
from cifarbench.train.fuse import Stacked, StackedBatches, group_id
from cifarbench.train.models import count_parameters, seeded_model

AUTOCAST = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}  # Lightning's precisions

HISTORY = (
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
LOGGED = ("train_loss", "test_loss", "test_acc", "test_top5", "lr", "epoch_seconds", "images_per_s")
# The columns of an epoch's sums, one row per live member, summed on the device and read once per epoch: the
# training loss and images, then loss, images, top-1 and top-5 hits of the test set and of the validation split.
TRAIN_LOSS, TRAIN_N, TEST, VAL = 0, 1, 2, 6
LOSS, N, TOP1, TOP5 = 0, 1, 2, 3  # offsets from TEST or VAL


class Diverged(RuntimeError):
    """The training loss of an epoch is NaN or infinite: the run stops there and leaves a failed record (a packed
    run or a fused member alone; the others of its task go on)."""


class CheckpointMismatch(UsageError):
    """A checkpoint in a run's folder that belongs to another run."""


def compile_for_training(
    model: torch.nn.Module, mode: str, *, example: torch.Tensor, precision: str, device: torch.device
) -> str | None:
    """Compile ``model`` in place with ``torch.compile`` (``nn.Module.compile``: its state_dict keys stay those of
    the eager model, so checkpoints of compiled and eager attempts are interchangeable). First a training step
    is compiled and run on a copy, on zeros shaped, laid out and typed as ``example`` (a real training batch), so
    that a node without a working compiler toolchain (no C++ compiler, no Triton) trains eagerly instead of
    failing. Returns None, or the reason the model stays eager.

    The copy's compiled code is reused for ``model`` itself, so neither the probe nor the first real step costs a
    second compilation. Shapes are static: a batch of another size (the last of an epoch, the test set's) gets
    its own compiled graph rather than moving every batch to slower shape-generic kernels."""
    probe = copy.deepcopy(model)
    probe.compile(mode=mode, dynamic=False)
    x = torch.zeros_like(example, device=device)
    dtype = AUTOCAST[precision]
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = probe(x)
        out.float().sum().backward()
    except Exception as exc:  # a broken toolchain fails in many types: BackendCompilerFailed, InductorError, OSError...
        torch.compiler.reset()
        # the first line, and the cause where the first only introduces it ("backend='inductor' raised:")
        lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines() if line.strip()]
        reason = lines[0]
        for line in lines[1:]:
            if not reason.endswith(":"):
                break
            reason += " " + line
        return reason[:500]
    model.compile(mode=mode, dynamic=False)
    return None


def _share(hits: float, n: float) -> float:
    """hits / n in float32, as torchmetrics' accuracy divides."""
    return (torch.tensor(hits, dtype=torch.float32) / max(n, 1)).item()


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
    """Cross-entropy classification of K members (``specs``: one run, or runs that differ only in their seed)
    with a per-epoch history kept on the device until the epoch ends.

    ``steps``: the schedule step by step (``RunSpec.steps`` for the training loader's length); training stops after
    its last step, mid-epoch where the recipe counts iterations. With ``validation``, the second validation loader
    is the held-out part of the training set, the first the test set. A member whose training loss is not finite
    after an epoch stops (``errors``); where others are left they go on without it, and ``dropped`` names it until
    its record is written."""

    def __init__(
        self,
        specs: RunSpec | Sequence[RunSpec],
        *,
        steps: Steps,
        fused_sgd: bool = False,
        validation: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        super().__init__()
        self.specs = [specs] if isinstance(specs, RunSpec) else list(specs)
        self.spec = self.specs[0]  # what the members share: everything but the seed
        self.steps = steps
        self.validation = validation
        self.fused_sgd = fused_sgd
        models = [seeded_model(s.model, s.num_classes, s.seed) for s in self.specs]
        if self.spec.world_size > 1 and self.spec.sync_bn:
            assert len(models) == 1, "fused groups train on one device"
            models = [ddp.global_batchnorm(models[0])]
        self.params_per_member = count_parameters(models[0])
        self.fused = len(models) > 1
        # a stacked member's conv weights are 5-d, which channels_last (4-d) does not describe
        self.model = Stacked(models) if self.fused else models[0].to(memory_format=memory_format)
        self.name = group_id([s.run_id for s in self.specs]) if self.fused else self.spec.run_id
        self.top5 = self.spec.num_classes >= 100
        self.live = list(range(len(self.specs)))  # the members still training, in stacking order
        self.histories: list[dict[str, list[float]]] = [{k: [] for k in HISTORY} for _ in self.specs]
        self.errors: list[str | None] = [None] * len(self.specs)
        self.dropped: list[int] = []
        self.attempts = 1
        self.compile_fallback: str | None = None
        self._sums: torch.Tensor | None = None  # set by _zero_sums before the first step of an epoch
        self._epoch_start = 0.0
        self.train_seconds = 0.0
        self.test_seconds = 0.0
        self.attempt_started = time.time()  # fit sets when this attempt's process began its task
        self._wall_before = 0.0  # wall-clock seconds of earlier attempts, up to their last checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.compile:
            # CUDA graphs (reduce-overhead) reuse their output memory from one call to the next: say where a new
            # step starts, so that a test step after a training step never reads an overwritten output
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.model(x)
        return logits if self.fused else logits.unsqueeze(0)

    @staticmethod
    def losses(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Each member's cross-entropy: ``logits`` ``[K, B, classes]``, ``y`` ``[K, B]`` (each member its own
        batch) or ``[B]`` (one for all)."""
        loss = functools.partial(F.cross_entropy, reduction=reduction)
        return torch.vmap(loss, in_dims=(0, 0 if y.dim() == 2 else None))(logits, y)

    def live_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of the live members: a fused group's loader draws every member's batch."""
        x, y = batch
        if len(self.live) == len(self.specs):
            return x, y
        index = torch.tensor(self.live, device=x.device)
        return x.index_select(0, index), y.index_select(0, index)

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

    # --- torch.compile, once the checkpoint has set who is live ---

    def on_train_start(self):
        if not self.spec.compile or self.compile_fallback is not None:
            return
        loader = self.trainer.train_dataloader
        if isinstance(loader, (data.DeviceLoader, StackedBatches)):  # drawing a batch leaves their state alone
            example, _ = self.live_batch(next(iter(loader)))
        else:  # a DataLoader's batches are contiguous; drawing one would move the global generator
            example = torch.zeros(self.spec.batch_size, 3, 32, 32, device=self.device)
        started = time.perf_counter()
        self.compile_fallback = compile_for_training(
            self.model, self.spec.compile, example=example, precision=self.trainer.precision, device=self.device
        )
        print(
            f"[{self.name}] "
            + (
                f"torch.compile failed, training eagerly: {self.compile_fallback}"
                if self.compile_fallback
                else f"compiled (mode {self.spec.compile}) in {time.perf_counter() - started:.1f}s"
            ),
            flush=True,
        )

    # --- steps: losses and counts are summed on the device; the host reads them once per epoch ---

    def _zero_sums(self):
        self._sums = torch.zeros(len(self.live), VAL + TOP5 + 1, device=self.device, dtype=torch.float64)

    def on_train_epoch_start(self):
        self._zero_sums()
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self._epoch_start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        x, y = self.live_batch(batch)
        sums = cast(torch.Tensor, self._sums)  # zeroed by on_train_epoch_start
        if self.trainer.world_size > 1:  # this rank's share of the global batch
            losses = self.losses(self(x), y, "sum")
            sums[:, TRAIN_LOSS] += losses.detach()
            global_n = cast(data.DeviceLoader, self.trainer.train_dataloader).global_batch(batch_idx)
            losses = ddp.rank_loss(losses, global_n=global_n, world_size=self.trainer.world_size)
        else:
            losses = self.losses(self(x), y)
            sums[:, TRAIN_LOSS] += losses.detach() * y.size(-1)
        sums[:, TRAIN_N] += y.size(-1)
        return losses.sum()  # each member's parameters get the gradient of its own loss only

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
        x, y = batch  # one batch for every member: the test set, or the validation split (dataloader 1)
        logits = self(x)
        sums = cast(torch.Tensor, self._sums)  # zeroed by on_validation_epoch_start at the latest
        at = VAL if dataloader_idx == 1 else TEST
        sums[:, at + LOSS] += self.losses(logits, y, "sum")
        sums[:, at + N] += len(y)
        sums[:, at + TOP1] += (logits.argmax(-1) == y).sum(-1)
        if self.top5:
            sums[:, at + TOP5] += (logits.topk(5, -1).indices == y.view(1, -1, 1)).any(-1).sum(-1)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        sums = cast(torch.Tensor, self._sums)
        if self.trainer.world_size > 1:  # the ranks trained on shares of each batch, and each tested on all of it
            sums[:, :TEST] = self.trainer.strategy.reduce(sums[:, :TEST].contiguous(), reduce_op="sum")
        rows = sums.tolist()  # the epoch's one host-device sync
        self._sums = None
        now = time.perf_counter()
        train_seconds = max(self._train_end - self._epoch_start, 1e-9)
        self.train_seconds += train_seconds
        self.test_seconds += now - self._train_end
        for m, sums in zip(self.live, rows):
            h = self.histories[m]
            h["train_loss"].append(sums[TRAIN_LOSS] / max(sums[TRAIN_N], 1))
            h["test_loss"].append(sums[TEST + LOSS] / max(sums[TEST + N], 1))
            h["test_acc"].append(_share(sums[TEST + TOP1], sums[TEST + N]))
            h["test_top5"].append(_share(sums[TEST + TOP5], sums[TEST + N]) if self.top5 else float("nan"))
            h["lr"].append(self._epoch_lr)
            h["epoch_seconds"].append(now - self._epoch_start)
            h["images_per_s"].append(sums[TRAIN_N] / train_seconds)
            if self.validation:
                h["val_loss"].append(sums[VAL + LOSS] / max(sums[VAL + N], 1))
                h["val_acc"].append(_share(sums[VAL + TOP1], sums[VAL + N]))
            self._report(m)
            if not math.isfinite(h["train_loss"][-1]):  # before the epoch's checkpoint: a retry starts before it
                self.errors[m] = f"Diverged: training loss {h['train_loss'][-1]} in epoch {len(h['test_acc'])}"
        diverged = [m for m in self.live if self.errors[m]]
        if diverged and len(diverged) == len(self.live):
            raise Diverged(cast(str, self.errors[diverged[0]]).removeprefix("Diverged: "))
        if diverged:
            self._drop(diverged)

    def _report(self, m: int) -> None:
        """Member ``m``'s epoch to its logger (a grid's ``logger:``; one per member, in member order) and log."""
        h, spec = self.histories[m], self.specs[m]
        if self.trainer.loggers:
            logger = self.trainer.loggers[m]
            logger.log_metrics({k: h[k][-1] for k in LOGGED if h[k][-1] == h[k][-1]}, step=len(h["test_acc"]))
            logger.save()  # NaN (top-5 below 100 classes) is left out above
        if not self.trainer.progress_bar_callback and self.trainer.is_global_zero:
            print(
                f"[{spec.run_id}] epoch {len(h['test_acc'])}/{self.steps.epochs} train_loss {h['train_loss'][-1]:.4f} "
                f"test_loss {h['test_loss'][-1]:.4f} test_acc {h['test_acc'][-1]:.4f} "
                + (f"val_acc {h['val_acc'][-1]:.4f} " if self.validation else "")
                + f"lr {h['lr'][-1]:.4g} {h['epoch_seconds'][-1]:.1f}s {h['images_per_s'][-1]:.0f} img/s"
                + (f" (fused x{len(self.live)})" if self.fused else ""),
                flush=True,
            )

    def _drop(self, gone: list[int]) -> None:
        keep = [i for i, m in enumerate(self.live) if m not in gone]
        cast(Stacked, self.model).keep(keep, self.trainer.optimizers[0])
        self.live = [self.live[i] for i in keep]
        self.dropped += gone
        for m in gone:
            print(f"[{self.specs[m].run_id}] {self.errors[m]}; stopped, the group goes on", flush=True)

    # --- checkpoints ---

    def on_save_checkpoint(self, checkpoint):
        checkpoint["cifarbench"] = {
            "run_ids": [s.run_id for s in self.specs],
            "live": self.live,
            "histories": self.histories,
            "errors": self.errors,
            "attempts": self.attempts,
            "train_seconds": self.train_seconds,
            "test_seconds": self.test_seconds,
            "wall_seconds": self.wall_seconds(),
        }

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("cifarbench", {})
        # a run's checkpoint of an earlier version names one run and holds one history
        ids = saved.get("run_ids", [saved.get("run_id")])
        if ids != [s.run_id for s in self.specs]:
            saved_as, mine = (ids[0], self.spec.run_id) if len(ids) == len(self.specs) == 1 else (ids, self.name)
            raise CheckpointMismatch(
                f"checkpoint belongs to {'run' if len(ids) == 1 else 'the fused group'} {saved_as!r}, not {mine!r}; "
                "move it away or use another results folder"
            )
        for h, was in zip(self.histories, saved.get("histories", [saved.get("history")])):
            h.update(was)  # a checkpoint of an earlier version lacks the validation curves
        self.errors = saved.get("errors", self.errors)
        live = saved.get("live", self.live)
        if live != self.live:  # before the state dict is loaded: it holds the live members only
            cast(Stacked, self.model).keep([self.live.index(m) for m in live])
            self.live = list(live)
        self.attempts = saved["attempts"] + 1
        self.train_seconds = saved["train_seconds"]
        self.test_seconds = saved.get("test_seconds", 0.0)  # checkpoints of earlier versions lack it
        self._wall_before = saved.get("wall_seconds", 0.0)

    def wall_seconds(self) -> float:
        """Wall-clock seconds of every attempt so far: earlier ones up to their last checkpoint, this one whole."""
        return self._wall_before + time.time() - self.attempt_started


class AtomicLastCheckpoint(L.Callback):
    """After every epoch: first the failed records of members dropped in it (``on_dropped``), so that a kill
    before the checkpoint that drops them leaves them failed, never dropped unrecorded; then ``last.ckpt``, saved
    atomically (``cifarbench.store.atomic``), so a kill mid-write or a second job of the same run never leaves a
    torn checkpoint; then the live members' progress files. On several processes rank 0 alone writes them."""

    def __init__(self, path: Path, on_dropped: Callable[[list[int]], None] | None = None):
        self.path = path
        self.on_dropped = on_dropped

    def on_train_epoch_end(self, trainer, pl_module):
        if pl_module.dropped and self.on_dropped:
            self.on_dropped(pl_module.dropped)
        pl_module.dropped = []
        if not trainer.is_global_zero:  # every rank takes part (saving ends in a barrier); rank 0 alone writes
            trainer.save_checkpoint(self.path, weights_only=False)
            return
        with atomic.replacing(self.path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # the full state: optimiser, scheduler, loops
        for m in pl_module.live:
            spec, h = pl_module.specs[m], pl_module.histories[m]
            write_progress(
                spec.results,
                spec.run_id,
                epochs_done=len(h["test_acc"]),
                epochs=pl_module.steps.epochs,
                epoch_seconds=h["epoch_seconds"],
                test_acc=h["test_acc"][-1] if h["test_acc"] else None,
            )
