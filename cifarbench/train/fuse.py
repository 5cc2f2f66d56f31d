"""Seed fusion: runs that differ only in their seed, trained as one vectorised model.

The members' parameters and buffers are stacked along a new first dimension (``torch.func.stack_module_state``)
and one forward and backward pass trains them all (``torch.func.functional_call`` under ``torch.vmap``), so a
step launches about as many kernels as one run's step does. BatchNorm's running statistics are stacked buffers
too: vmap hands each member its own slice, which BatchNorm updates in place.

Member k stays the run it would be alone: its initial weights are those ``fit`` builds under its seed, its
batches those the device loader gives its seed (one permutation and one crop/flip stream per member), and its
SGD momentum, schedule and BatchNorm statistics are its own slices of the stacked state (SGD is elementwise, so
one optimiser over the stacked tensors is K optimisers). A member whose training loss turns NaN or infinite is
recorded as failed and dropped from the stacked state at the end of that epoch (the epoch's one host sync reads
the losses); the others go on. One checkpoint holds the whole group.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

from cifarbench.config.resources import Budget
from cifarbench.config.spec import RunSpec, unfusable
from cifarbench.errors import UsageError
from cifarbench.store import atomic, records
from cifarbench.store.layout import Layout
from cifarbench.store.progress import clear_progress, write_progress
from cifarbench.store.records import spec_fields
from cifarbench.system import task_ended, task_started
from cifarbench.train import data
from cifarbench.train.fit import (
    AUTOCAST,
    FastPath,
    _environment,
    _outcome,
    _quiet_lightning,
    _write_failed,
    allocation_fields,
    check_data,
    default_device,
    error_text,
    peak_memory,
    reset_peak_memory,
    schedule_fields,
)
from cifarbench.train.models import count_parameters, get_resnet, init_weights
from cifarbench.train.module import CheckpointMismatch

HISTORY = ("train_loss", "test_loss", "test_acc", "test_top5", "lr", "epoch_seconds", "images_per_s")


def group_id(run_ids: Sequence[str]) -> str:
    """The name of a fused group's checkpoint folder: a hash of its members' run ids, in order."""
    return "fused-" + hashlib.sha256("\n".join(run_ids).encode()).hexdigest()[:12]


def check_fusable(specs: Sequence[RunSpec]) -> None:
    """Members must be one run but for the seed, each seed once, on the device loader (whose batches depend on
    the seed alone; the torchvision loader shuffles with the process's global generator)."""
    base = {k: v for k, v in specs[0].to_dict().items() if k != "seed"}
    for spec in specs[1:]:
        if {k: v for k, v in spec.to_dict().items() if k != "seed"} != base:
            raise ValueError(f"runs {specs[0].run_id} and {spec.run_id} differ in more than their seed")
    if len({s.seed for s in specs}) != len(specs):
        raise ValueError("a fused group holds each seed once")
    if why := unfusable(specs[0]):
        raise ValueError(why)


def initial_model(spec: RunSpec) -> nn.Module:
    """The model ``fit`` starts from: built and initialised right after seeding torch with the run's seed."""
    torch.manual_seed(spec.seed)
    model = get_resnet(spec.model, spec.num_classes)
    model.apply(init_weights)
    return model


class _GlobalMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


@dataclass
class Member:
    """One run of a group: what ``fit._outcome`` reads of a run (``history``, ``top5``, ``attempts`` and the
    seconds), and how it ended."""

    spec: RunSpec
    top5: bool | None
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in HISTORY})
    attempts: int = 1
    _train_seconds: float = 0.0
    _test_seconds: float = 0.0
    error: str | None = None  # why it stopped early (diverged)
    validation: bool = False  # fused runs hold no validation split out (config.spec.unfusable)

    @property
    def run_id(self) -> str:
        return self.spec.run_id


class FusedGroup:
    """The stacked state of a group's live members, their optimiser and schedule, and one epoch of training."""

    def __init__(
        self,
        specs: Sequence[RunSpec],
        *,
        device: torch.device,
        fast: FastPath,
        train: data.DeviceLoader,
        test: data.DeviceLoader,
    ):
        check_fusable(specs)
        self.specs, self.device, self.fast = list(specs), device, fast
        self.recipe = specs[0].schedule
        self.train_loader, self.test_loader = train, test
        self.members = [Member(spec=s, top5=True if s.num_classes >= 100 else None) for s in specs]
        self.live = list(range(len(specs)))  # indices of the members still training, in stacking order
        self.epoch = 0  # epochs done
        self.attempts = 1
        self.attempt_started = time.time()  # fit_group sets when this attempt's process began its task
        self.wall_before = 0.0  # wall-clock seconds of earlier attempts, up to their last checkpoint
        self.compile_fallback: str | None = None
        models = [initial_model(s) for s in specs]
        self.params_per_member = count_parameters(models[0])
        # the graph the stacked tensors are run through; its own tensors never hold data
        self.skeleton = copy.deepcopy(models[0]).to("meta")
        # adaptive_avg_pool2d has no batching rule for vmap (it falls back to a loop over the members); to 1x1 it
        # is the mean, which has one
        self.skeleton.avgpool = _GlobalMean()
        params, buffers = stack_module_state(models)
        self._set_state(
            {k: v.detach().to(device) for k, v in params.items()}, {k: v.to(device) for k, v in buffers.items()}
        )
        self._train_losses: Callable = torch.vmap(self._loss)

    # --- the stacked state ---

    def _set_state(self, params: dict, buffers: dict, optimiser: dict | None = None, schedule: dict | None = None):
        self.params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        self.buffers = {k: v.clone() for k, v in buffers.items()}
        r = self.recipe
        self.optimiser = torch.optim.SGD(
            list(self.params.values()),
            lr=r.lr,
            momentum=r.momentum,
            weight_decay=r.weight_decay,
            fused=self.fast.fused_sgd or None,
        )
        self.schedule: torch.optim.lr_scheduler.LRScheduler
        if r.schedule == "step":
            self.schedule = torch.optim.lr_scheduler.MultiStepLR(self.optimiser, list(r.milestones), gamma=r.gamma)
        else:
            self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimiser, T_max=r.epochs)
        if optimiser is not None:
            self.optimiser.load_state_dict(optimiser)
        if schedule is not None:
            self.schedule.load_state_dict(schedule)

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """The state dict live member ``k`` (an index into ``specs``) would have as a model of its own."""
        i = self.live.index(k)
        return {name: t[i] for name, t in {**self.params, **self.buffers}.items()}

    def _drop(self, gone: list[int]) -> None:
        """Restack without the members ``gone``: the others keep their parameters, statistics and momentum."""
        keep = [i for i, k in enumerate(self.live) if k not in gone]
        index = torch.tensor(keep, device=self.device)
        optimiser = self.optimiser.state_dict()
        for state in optimiser["state"].values():
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"] = state["momentum_buffer"].index_select(0, index)
        self._set_state(
            {k: v.detach().index_select(0, index) for k, v in self.params.items()},
            {k: v.index_select(0, index) for k, v in self.buffers.items()},
            optimiser,
            self.schedule.state_dict(),
        )
        self.live = [self.live[i] for i in keep]

    # --- steps ---

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(self.skeleton, (params, buffers), (x,)), y)

    def _logits(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, (params, buffers), (x,))

    def _autocast(self):
        dtype = AUTOCAST[self.fast.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_batches(self, epoch: int):
        """Epoch ``epoch``'s (0-based) batches of the live members, stacked: ``[K, B, 3, 32, 32]`` images and
        ``[K, B]`` labels; member k's slice is the batch its unfused run gets (the same loader, with its seed)."""
        loaders = []
        for k in self.live:
            loader = copy.copy(self.train_loader)  # shares the images on the device; only the seed differs
            loader.seed = self.specs[k].seed
            loader.set_epoch(epoch)
            loaders.append(loader)
        for batches in zip(*loaders):
            yield torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One SGD step of every live member on its slice of ``x``, ``y``; returns the members' losses."""
        self.skeleton.train()
        with self._autocast():
            losses = self._train_losses(self.params, self.buffers, x, y)
        losses.sum().backward()  # each member's parameters get the gradient of its own loss only
        self.optimiser.step()
        self.optimiser.zero_grad(set_to_none=True)
        return losses.detach()

    @torch.no_grad()
    def evaluate(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The test pass: adds each member's summed loss and image count to ``sums[:, 2:]``; returns its top-1
        and top-5 correct counts."""
        self.skeleton.eval()
        k = len(self.live)
        correct = torch.zeros(2, k, dtype=torch.long, device=self.device)
        for x, y in self.test_loader:
            with self._autocast():
                logits = torch.vmap(self._logits, in_dims=(0, 0, None))(self.params, self.buffers, x)
            losses = torch.vmap(F.cross_entropy, in_dims=(0, None))(logits, y, reduction="sum")
            sums[:, 2] += losses
            sums[:, 3] += len(y)
            correct[0] += (logits.argmax(-1) == y).sum(-1)
            if logits.size(-1) >= 5:
                correct[1] += (logits.topk(5, -1).indices == y.view(1, -1, 1)).any(-1).sum(-1)
        return correct[0], correct[1]

    def compile(self, mode: str) -> str | None:
        """Compile the vectorised training loss with ``torch.compile``; first a step is compiled and run on copies
        of the state, so that where the compiler fails the group trains eagerly. Returns None or why it stays
        eager."""
        compiled = torch.compile(torch.vmap(self._loss), mode=mode, dynamic=False)
        params = {k: v.detach().clone().requires_grad_() for k, v in self.params.items()}
        buffers = {k: v.clone() for k, v in self.buffers.items()}
        shape = (len(self.live), self.specs[0].batch_size, 3, 32, 32)
        x = torch.zeros(shape, device=self.device).contiguous()
        y = torch.zeros(shape[:2], dtype=torch.long, device=self.device)
        try:
            self.skeleton.train()
            with self._autocast():
                losses = compiled(params, buffers, x, y)
            losses.sum().backward()
        except Exception as exc:  # a broken toolchain fails in many types, as in fit.compile_for_training
            torch.compiler.reset()
            return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        self._train_losses = compiled
        return None

    def train_epoch(self) -> list[int]:
        """One epoch of every live member: training pass, test pass, the schedule's step and each member's
        history. Returns the members (indices into ``specs``) whose training loss was not finite; they are
        dropped from the stacked state."""
        k = len(self.live)
        sums = torch.zeros(k, 4, dtype=torch.float64, device=self.device)  # train loss, n, test loss, n
        lr = self.optimiser.param_groups[0]["lr"]
        start = time.perf_counter()
        for x, y in self.train_batches(self.epoch):
            losses = self.step(x, y)
            sums[:, 0] += losses * y.size(1)
            sums[:, 1] += y.size(1)
        train_end = time.perf_counter()
        top1, top5 = self.evaluate(sums)
        self.schedule.step()
        self.epoch += 1
        rows = sums.tolist()  # the epoch's one host-device sync
        n_test = torch.tensor(float(rows[0][3]))
        top1_acc = (top1.float().cpu() / n_test).tolist()  # float32 division, as torchmetrics computes it
        top5_acc = (top5.float().cpu() / n_test).tolist()
        now = time.perf_counter()
        train_seconds = max(train_end - start, 1e-9)
        diverged = []
        for i, m in enumerate(self.live):
            member = self.members[m]
            train_loss, n_train, test_loss, n = rows[i]
            member._train_seconds += train_seconds
            member._test_seconds += now - train_end
            if not torch.isfinite(torch.tensor(train_loss)):
                member.error = f"Diverged: training loss {train_loss / max(n_train, 1)} in epoch {self.epoch}"
                diverged.append(m)
                continue
            h = member.history
            h["train_loss"].append(train_loss / max(n_train, 1))
            h["test_loss"].append(test_loss / max(n, 1))
            h["test_acc"].append(top1_acc[i])
            h["test_top5"].append(top5_acc[i] if member.top5 else float("nan"))
            h["lr"].append(lr)
            h["epoch_seconds"].append(now - start)
            h["images_per_s"].append(n_train / train_seconds)
        if diverged and len(diverged) < len(self.live):
            self._drop(diverged)
        elif diverged:
            self.live = []
        return diverged

    # --- checkpoints ---

    def state_dict(self) -> dict:
        return {
            "members": [s.run_id for s in self.specs],
            "live": self.live,
            "epoch": self.epoch,
            "attempts": self.attempts,
            "wall_seconds": self.wall_seconds(),
            "params": {k: v.detach() for k, v in self.params.items()},
            "buffers": self.buffers,
            "optimiser": self.optimiser.state_dict(),
            "schedule": self.schedule.state_dict(),
            "history": [
                {"history": m.history, "train_seconds": m._train_seconds, "test_seconds": m._test_seconds}
                for m in self.members
            ],
        }

    def load_state_dict(self, saved: dict) -> None:
        ids = [s.run_id for s in self.specs]
        if saved.get("members") != ids:
            raise CheckpointMismatch(
                f"checkpoint belongs to the fused group {saved.get('members')!r}, not {ids!r}; "
                "move it away or use another results folder"
            )
        self.live, self.epoch, self.attempts = list(saved["live"]), saved["epoch"], saved["attempts"] + 1
        self.wall_before = saved.get("wall_seconds", 0.0)
        self._set_state(saved["params"], saved["buffers"], saved["optimiser"], saved["schedule"])
        for member, h in zip(self.members, saved["history"]):
            member.history = h["history"]
            member._train_seconds, member._test_seconds = h["train_seconds"], h["test_seconds"]
            member.attempts = self.attempts

    def wall_seconds(self) -> float:
        """Wall-clock seconds of every attempt so far: earlier ones up to their last checkpoint, this one whole."""
        return self.wall_before + time.time() - self.attempt_started


def fit_group(
    specs: Sequence[RunSpec],
    *,
    device: torch.device | None = None,
    budgets: Sequence[Budget | None] | None = None,
    prepare: Callable[[FusedGroup], None] | None = None,
    on_epoch_end: Callable[[FusedGroup], None] | None = None,
) -> list[Path]:
    """Train the runs ``specs`` (one run but for the seed) as one fused group, resuming from the group's
    checkpoint if there is one, and write each member's record. Members that already completed are left out.

    Each member leaves a record as ``fit`` does, with ``fuse_size``, ``fused_with`` and the group's wall-clock time
    and peak memory; a member that diverges leaves a failed one and the others go on. If the group raises, every
    member still training leaves a failed record and the exception propagates. ``prepare`` sees the group before
    its first epoch and ``on_epoch_end`` after each (after the checkpoint is written). Returns the records' paths."""
    device = device or default_device()
    _quiet_lightning()
    started, began = datetime.now(timezone.utc), task_started()
    specs = list(specs)
    budgets = list(budgets) if budgets is not None else [None] * len(specs)
    # Members that completed (elsewhere, or in an earlier job of this group) are left out; the others make the
    # group, whose checkpoint is named after them: a requeued group finds it again.
    todo = [i for i, s in enumerate(specs) if not _completed(s)]
    specs, budgets = [specs[i] for i in todo], [budgets[i] for i in todo]
    if not specs:
        return []
    ids = [s.run_id for s in specs]
    ckpt = Layout(specs[0].results).group_checkpoint(group_id(ids))
    rows = {
        s.run_id: {
            **spec_fields(s),
            "started_at": started,
            **_environment(device),
            **(b or Budget()).to_dict(),
            **allocation_fields(),
            "fuse_size": len(specs),
            "fused_with": [other for other in ids if other != s.run_id],
        }
        for s, b in zip(specs, budgets)
    }
    group: FusedGroup | None = None
    paths: list[Path] = []
    try:
        reset_peak_memory(device)
        spec = specs[0]
        checked = check_data(spec)
        fast = FastPath.for_device(device, spec.precision)
        if fast.precision == "16-mixed":
            raise UsageError("16-mixed scales the loss once per step for every member: train these runs unfused")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = fast.cudnn_benchmark and not spec.deterministic
            torch.set_float32_matmul_precision("high")
        if spec.deterministic:  # what Lightning's Trainer(deterministic=True) sets
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(spec.deterministic)
        loaders = data.make_run_loaders(
            dataset=spec.dataset,
            root=spec.data_root,
            loader="device",
            batch_size=spec.batch_size,
            seed=spec.seed,
            device=device,
            memory_format=fast.memory_format,
        )
        group = FusedGroup(specs, device=device, fast=fast, train=loaders.train, test=loaders.test)
        group.attempt_started = began
        planned = schedule_fields(spec, spec.steps(len(loaders.train)))  # the seed does not change the schedule
        for row in rows.values():
            row.update(
                {**checked, **loaders.sizes, **planned},
                precision_used=fast.precision,
                params=group.params_per_member,
            )
        if ckpt.is_file():
            group.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        if spec.compile:
            began = time.perf_counter()
            group.compile_fallback = group.compile(spec.compile)
            for row in rows.values():
                row["compile_fallback"] = group.compile_fallback
            print(
                f"[{group_id(ids)}] "
                + (
                    f"torch.compile failed, training eagerly: {group.compile_fallback}"
                    if group.compile_fallback
                    else f"compiled (mode {spec.compile}) in {time.perf_counter() - began:.1f}s"
                ),
                flush=True,
            )
        if prepare:
            prepare(group)
        epochs = spec.schedule.epochs
        print(f"[{group_id(ids)}] fused group of {len(specs)}: {', '.join(ids)}", flush=True)
        while group.live and group.epoch < epochs:
            diverged = group.train_epoch()
            # the failed record first: a kill between the two then leaves a member failed, never dropped unrecorded
            for k in diverged:
                member = group.members[k]
                shared = {"wall_seconds": group.wall_seconds(), **peak_memory(device)}
                paths.append(_finish(member, rows[member.run_id], "failed", shared))
                print(f"[{member.run_id}] {member.error}; stopped, the group goes on", flush=True)
            with atomic.replacing(ckpt) as tmp:
                torch.save(group.state_dict(), tmp)
            for k in group.live:
                member = group.members[k]
                h = member.history
                write_progress(
                    member.spec.results,
                    member.run_id,
                    epochs_done=group.epoch,
                    epochs=epochs,
                    epoch_seconds=h["epoch_seconds"],
                    test_acc=h["test_acc"][-1],
                )
                print(
                    f"[{member.run_id}] epoch {group.epoch}/{epochs} train_loss {h['train_loss'][-1]:.4f} "
                    f"test_loss {h['test_loss'][-1]:.4f} test_acc {h['test_acc'][-1]:.4f} lr {h['lr'][-1]:.4g} "
                    f"{h['epoch_seconds'][-1]:.1f}s {h['images_per_s'][-1]:.0f} img/s (fused x{len(group.live)})",
                    flush=True,
                )
            if on_epoch_end:
                on_epoch_end(group)
        shared = {"wall_seconds": group.wall_seconds(), **peak_memory(device)}  # the group's, one for every member
        for k in group.live:
            paths.append(_finish(group.members[k], rows[specs[k].run_id], "completed", shared))
        task_ended()
        return paths
    except BaseException as exc:  # as in fit: an interrupted member still leaves a record
        task_ended()
        live = group.live if group else range(len(specs))
        wall = group.wall_seconds() if group else time.time() - began
        peaks = peak_memory(device)
        for k in live:
            row = rows[specs[k].run_id]
            row.update(
                _outcome(group.members[k]) if group else {"epochs_done": 0},
                **peaks,
                wall_seconds=wall,
                status="failed",
                ended_at=datetime.now(timezone.utc),
                error=error_text(exc),
                traceback="".join(traceback.format_exc().splitlines(keepends=True)[-30:]),
            )
            _write_failed(row, specs[k])
        raise


def _completed(spec: RunSpec) -> bool:
    record = records.read_record(Layout(spec.results).record(spec.run_id))
    return bool(record and record["status"] == "completed")


def _finish(member: Member, row: dict, status: str, shared: dict) -> Path:
    """Write a member's record; ``shared``: the group's columns that every member holds (wall-clock time, peak
    memory)."""
    row.update(
        _outcome(member),
        **shared,
        status=status,
        ended_at=datetime.now(timezone.utc),
        error=member.error,
    )
    path = records.write_record(row, member.spec.results)
    clear_progress(member.spec.results, member.run_id)
    return path
