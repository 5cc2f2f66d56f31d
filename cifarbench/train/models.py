"""ResNet factory for 32x32 inputs.

Two families, both built by patching torchvision's ``ResNet``:

* CIFAR-native resnet20/32/44/56/110/1202 (He et al. 2016, section 4.2): depth 6n+2, three stages of
  16/32/64 channels, parameter-free "option A" shortcuts.
* torchvision's resnet18/34/50/101/152 with a 3x3 stride-1 stem, no max-pool and a new head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

from cifarbench.config.spec import ARCHS, Arch
from cifarbench.errors import check_name


class ShortcutA(nn.Module):
    """Option A shortcut: keep every second pixel, zero-pad the channels equally on both sides."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = self.out_channels - x.size(1)
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, missing // 2, missing - missing // 2))

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}"


def _cifar_native(depth: int, *, num_classes: int) -> tv.ResNet:
    n = (depth - 2) // 6
    # A one-block skeleton; every stage is rebuilt below. Assigning to existing attributes keeps the module
    # registration order (stem, stages, head), which is what makes seeded init match the reference models.
    net = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(16)
    net.maxpool = nn.Identity()
    net.inplanes = 16
    net.layer1 = net._make_layer(tv.BasicBlock, 16, n)
    net.layer2 = net._make_layer(tv.BasicBlock, 32, n, stride=2)
    net.layer2[0].downsample = ShortcutA(32)
    net.layer3 = net._make_layer(tv.BasicBlock, 64, n, stride=2)
    net.layer3[0].downsample = ShortcutA(64)
    net.layer4 = nn.Identity()
    net.fc = nn.Linear(64, num_classes)
    return net


def _imagenet_patched(builder: Callable[..., tv.ResNet], *, num_classes: int) -> tv.ResNet:
    net = builder()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


@dataclass(frozen=True)
class ModelInfo:
    arch: Arch  # the name, family and depth, known without torch
    build: Callable[..., nn.Module]

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def depth(self) -> int:
        return self.arch.depth


def _builder(arch: Arch) -> Callable[..., nn.Module]:
    if arch.family == "cifar":
        return lambda num_classes: _cifar_native(arch.depth, num_classes=num_classes)
    return lambda num_classes: _imagenet_patched(getattr(tv, arch.name), num_classes=num_classes)


# ordered as ARCHS: the CIFAR family first, each family by depth
MODELS: dict[str, ModelInfo] = {name: ModelInfo(arch, _builder(arch)) for name, arch in ARCHS.items()}


def get_resnet(name: str, num_classes: int) -> nn.Module:
    """Build an uninitialised CIFAR ResNet; call ``model.apply(init_weights)`` for the standard init."""
    return MODELS[check_name(name, MODELS, "model")].build(num_classes)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal weights for every Conv2d and Linear, zero biases (use with ``model.apply``)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def seeded_model(name: str, num_classes: int, seed: int) -> nn.Module:
    """The model a run starts from: built and initialised right after seeding torch with the run's seed."""
    torch.manual_seed(seed)
    model = get_resnet(name, num_classes)
    model.apply(init_weights)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds of one forward pass on one image, counted by torch's flop counter (2 flops per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() // 2


def measure(name: str) -> dict:
    """What the built model ``name`` measures: the fields of its ``Arch`` in ``config.spec.ARCHS``, which holds them
    so that `cifarbench models` and time estimates need no torch (tests check that the two agree)."""
    info = MODELS[check_name(name, MODELS, "model")]
    model10 = info.build(10)
    return {
        "name": info.name,
        "family": info.family,
        "depth": info.depth,
        "params_10": count_parameters(model10),
        "params_100": count_parameters(info.build(100)),
        "macs": forward_macs(model10),
    }
