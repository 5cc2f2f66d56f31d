"""One run on several processes (Lightning DDP, one device each): which share of a global batch each rank trains
on, the loss that makes DDP's averaged gradient the global batch's, BatchNorm over the global batch, and the
strategy.

Every rank draws the single-device run's batches (``data.DeviceLoader``) and keeps its slice of each, so a run
trains on the same images in the same order on any number of devices. DDP averages the ranks' gradients; each
rank's loss is therefore its images' summed loss x world size / global batch, whose average is the global mean
also where the last batch of an epoch does not divide evenly."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import cast

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.nn.functional import all_reduce

from cifarbench.train import ranks


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of a batch of ``n``: shares differ by one image at most where ``n`` does
    not divide by ``world_size``."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def rank_loss(summed: torch.Tensor, *, global_n: int, world_size: int) -> torch.Tensor:
    """The loss a rank backpropagates from its images' ``summed`` losses (one sum per member): x world size / the
    global batch's images, so that DDP's mean of the ranks' gradients is the gradient of the global batch's mean
    loss, whatever each rank's share."""
    return summed * (world_size / global_n)


def rank_device(device: torch.device) -> torch.device:
    """The device of this process: on GPUs, the one of its node's that Lightning gives its local rank."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def distributed() -> bool:
    """Whether this process trains with others (a process group of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's when processes train together, on any device
    and backend (torch's SyncBatchNorm needs CUDA): the sum and count, then the squared deviations from the global
    mean are all-reduced (two passes, as close to one device's BatchNorm in float32 as one pass is not), and the
    running statistics updated as BatchNorm does. Alone, or in eval, it is BatchNorm2d; its parameters and
    buffers are BatchNorm2d's, so checkpoints and reference weights load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        c = x.shape[1]
        shape = (1, c, 1, 1)
        xf = x.float()  # statistics in float32, as BatchNorm keeps them under autocast
        count = torch.full((1,), xf.numel() // c, dtype=xf.dtype, device=x.device)
        totals = all_reduce(torch.cat([xf.sum((0, 2, 3)), count]))
        n = totals[c]
        mean = totals[:c] / n
        deviation = xf - mean.view(shape)
        squares = all_reduce(deviation.square().sum((0, 2, 3)))
        var = squares / n
        out = deviation * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:  # then BatchNorm has these buffers
            tracked, running_mean, running_var = (
                cast(torch.Tensor, b) for b in (self.num_batches_tracked, self.running_mean, self.running_var)
            )
            with torch.no_grad():
                tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / tracked.item()
                running_mean.lerp_(mean.detach(), momentum)
                running_var.lerp_((squares / (n - 1)).detach(), momentum)  # unbiased, as BatchNorm's
        return out.to(x.dtype).contiguous(memory_format=_format(x))


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def global_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with each BatchNorm2d replaced by a GlobalBatchNorm holding the same parameters and buffers."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = GlobalBatchNorm(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            global_batchnorm(child)
    return model


def strategy(device: torch.device) -> DDPStrategy:
    """DDP over NCCL on GPUs, gloo on CPUs; a collective that waits longer than ``ranks.collective_timeout_s``
    (a rank died or hangs) fails the run instead of hanging it."""
    return DDPStrategy(
        process_group_backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=ranks.collective_timeout_s()),
    )
