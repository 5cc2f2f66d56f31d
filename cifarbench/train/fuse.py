"""Seed fusion: what is specific to training runs that differ only in their seed as one vectorised model.

The members' parameters and buffers are stacked along a new first dimension (``Stacked``) and one forward and
backward pass trains them all (``torch.func.functional_call`` under ``torch.vmap``), so a step launches about as
many kernels as one run's step does. Everything else is the training of one run: ``ResNetModule`` with K members,
fitted by Lightning (``fit.fit_group``). SGD is elementwise, so one optimiser over the stacked parameters is K
optimisers; BatchNorm's running statistics are stacked buffers too, of which vmap hands each member its own slice.

Member k stays the run it would be alone: its initial weights are those its seed builds, its batches those the
device loader gives its seed (``StackedBatches``: one permutation and one crop/flip stream per member), and its
momentum, schedule and BatchNorm statistics are its own slices of the stacked state. A member that diverges is
dropped from the stacked state (``Stacked.keep``); the others go on.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from cifarbench.config.spec import RunSpec, unfusable
from cifarbench.train import data


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


def fusion_fields(run_ids: Sequence[str], run_id: str) -> dict:
    """A member's record columns that say which group it trained in."""
    return {"fuse_size": len(run_ids), "fused_with": [other for other in run_ids if other != run_id]}


class _GlobalMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class Float32BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that normalises half-precision input (bf16, fp16) in float32 and returns its dtype. Under vmap,
    BatchNorm's batching rule normalises without the affine weight and applies it afterwards; without a weight,
    CUDA's kernel has no mixed-precision path (half-precision input, float32 statistics) and refuses the float32
    running statistics in the backward pass. A member's BatchNorm in float32 is what it computes alone under
    autocast, within rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.bfloat16, torch.float16):
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


class Stacked(nn.Module):
    """K models of one architecture as one: ``net`` is the first model holding every member's tensors stacked
    (``[K, ...]`` under the model's own names), and ``forward`` runs each member on its slice of the input.

    Images ``[K, B, 3, 32, 32]`` (each member its own batch) or ``[B, 3, 32, 32]`` (one batch for all: the test
    set) give logits ``[K, B, classes]``."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        params, buffers = stack_module_state(list(models))
        self.net = copy.deepcopy(models[0])
        # adaptive_avg_pool2d has no batching rule for vmap (it falls back to a loop over the members); to 1x1 it
        # is the mean, which has one
        self.net.avgpool = _GlobalMean()
        for module in self.net.modules():
            if type(module) is nn.BatchNorm2d:
                module.__class__ = Float32BatchNorm  # the same state; only forward differs
        for name, t in params.items():
            owner, _, leaf = name.rpartition(".")
            setattr(self.net.get_submodule(owner), leaf, nn.Parameter(t.detach()))
        for name, t in buffers.items():
            owner, _, leaf = name.rpartition(".")
            self.net.get_submodule(owner).register_buffer(leaf, t)

    def _member(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, state, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        return torch.vmap(self._member, in_dims=(0, 0 if x.dim() == 5 else None))(state, x)

    def __len__(self) -> int:
        return len(next(self.net.parameters()))

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """The state dict the ``i``-th stacked member would have as a model of its own."""
        return {name: t[i] for name, t in self.net.state_dict().items()}

    @torch.no_grad()
    def keep(self, positions: Sequence[int], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restack with the members at ``positions`` only: they keep their parameters, statistics and (in
        ``optimizer``) momentum. The parameters stay the same objects, so the optimiser and Lightning keep
        theirs."""
        some = next(self.net.parameters())
        index = torch.tensor(list(positions), device=some.device)
        for p in self.net.parameters():
            p.data = p.data.index_select(0, index)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"] = state["momentum_buffer"].index_select(0, index)
        for module in self.net.modules():
            for name, b in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, b.index_select(0, index))


class StackedBatches:
    """A fused group's training batches: ``[K, B, 3, 32, 32]`` images and ``[K, B]`` labels, where member k's
    slice is the batch its unfused run gets (the same device loader, with its seed). Every member's stream is
    drawn, also after a member is dropped, so that the others' batches never depend on who is left; the module
    takes its live members' slices. Lightning calls ``sampler.set_epoch`` before each epoch, as for a
    DeviceLoader."""

    def __init__(self, loader: data.DeviceLoader, seeds: Sequence[int]):
        self.loader, self.seeds, self.epoch = loader, list(seeds), 0
        self.sampler = self
        self.batch_sampler = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        loaders = []
        for seed in self.seeds:
            loader = copy.copy(self.loader)  # shares the images on the device; only the seed differs
            loader.seed = seed
            loader.set_epoch(self.epoch)
            loaders.append(loader)
        for batches in zip(*loaders):
            yield torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])
