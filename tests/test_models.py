import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarbench.cli import main
from cifarbench.config.spec import ARCHS
from cifarbench.errors import UnknownNameError
from cifarbench.train.models import MODELS, ShortcutA, count_parameters, get_resnet, init_weights, measure

# ../shared/reference/model-facts.md: counts of the published implementations.
PARAMS = {
    "resnet20": (269_722, 275_572),
    "resnet32": (464_154, 470_004),
    "resnet44": (658_586, 664_436),
    "resnet56": (853_018, 858_868),
    "resnet110": (1_727_962, 1_733_812),
    "resnet1202": (19_421_274, 19_427_124),
    "resnet18": (11_173_962, 11_220_132),
    "resnet34": (21_282_122, 21_328_292),
    "resnet50": (23_520_842, 23_705_252),
    "resnet101": (42_512_970, 42_697_380),
    "resnet152": (58_156_618, 58_341_028),
}
LIGHT = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34", "resnet50"]


def test_registry_holds_exactly_the_eleven_models():
    assert set(MODELS) == set(PARAMS)
    assert {n for n, m in MODELS.items() if m.family == "cifar"} == {f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)}


def test_the_registry_holds_the_published_parameter_counts():
    assert {name: (a.params_10, a.params_100) for name, a in ARCHS.items()} == PARAMS


# resnet1202, resnet101 and resnet152 take seconds each to build and measure
@pytest.mark.parametrize("name", [n if n in LIGHT else pytest.param(n, marks=pytest.mark.slow) for n in PARAMS])
def test_the_built_models_measure_what_the_registry_says(name):
    assert measure(name) == dataclasses.asdict(ARCHS[name])


@pytest.mark.parametrize("name", LIGHT)
@pytest.mark.parametrize("n", [1, 3])
def test_logits_shape(name, n):
    model = get_resnet(name, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(n, 3, 32, 32)).shape == (n, 100)


def test_resnet1202_forward_on_one_image():
    model = get_resnet("resnet1202", 10).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_option_a_shortcut_subsamples_and_zero_pads_both_sides():
    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_cifar_shortcuts_are_option_a_without_parameters(name):
    model = get_resnet(name, 10)
    shortcuts = [
        b.downsample for stage in (model.layer1, model.layer2, model.layer3) for b in stage if b.downsample is not None
    ]
    assert [type(s) for s in shortcuts] == [ShortcutA, ShortcutA]
    assert all(count_parameters(s) == 0 for s in shortcuts)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_imagenet_designs_are_patched_for_32x32():
    model = get_resnet("resnet50", 100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 100 and model.fc.in_features == 2048


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(UnknownNameError, match=r"did you mean 'resnet20'.*valid: .*resnet1202"):
        get_resnet("resnt20", 10)


def _seeded(name, seed=0):
    model = get_resnet(name, 10)
    torch.manual_seed(seed)
    model.apply(init_weights)
    return model


def test_seeded_init_is_deterministic():
    a, b = _seeded("resnet20"), _seeded("resnet20")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = _seeded("resnet20", seed=1)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_init_has_kaiming_normal_statistics():
    model = _seeded("resnet56")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.numel() >= 2000:
            fan_in = module.weight[0].numel()
            assert module.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
            assert abs(module.weight.mean().item()) < 0.1 * math.sqrt(2 / fan_in) * 3
        if getattr(module, "bias", None) is not None and isinstance(module, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(module.bias) == 0


def test_conv_and_linear_modules_are_registered_in_forward_order():
    model = get_resnet("resnet20", 10).eval()
    called = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, i, o: called.append(mod))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert called == [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


class _RefBlock(nn.Module):
    """A CIFAR basic block written independently of torchvision, as in the reference implementation."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class _RefResNet(nn.Module):
    def __init__(self, depth, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_RefBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize("depth", [20, 56])
def test_same_seed_gives_the_reference_models_weights_and_logits(depth):
    ref = _RefResNet(depth, 10)
    torch.manual_seed(0)
    ref.apply(init_weights)
    ours = _seeded(f"resnet{depth}")
    ref_w = [m.weight for m in ref.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    our_w = [m.weight for m in ours.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(ref_w) == len(our_w) and all(torch.equal(a, b) for a, b in zip(ref_w, our_w))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ref.eval()(x), ours.eval()(x), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_channels_last_and_autocast(name):
    model = get_resnet(name, 10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = get_resnet(name, 10).eval()
        ref.load_state_dict(model.state_dict())
        assert torch.allclose(model(x), ref(x.contiguous()), atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()


def test_models_command_table_and_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [dataclasses.asdict(a) for a in ARCHS.values()]
    assert rows[0] == {
        "name": "resnet20",
        "family": "cifar",
        "depth": 20,
        "params_10": 269_722,
        "params_100": 275_572,
        "macs": 40_551_040,
    }
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12
    assert lines[6].split() == ["resnet1202", "cifar", "1202", "19,421,274", "19,427,124", "2829.2M"]


def test_models_command_never_imports_torch():
    # a table of eleven rows: building resnet1202 and resnet152 to count them took 30-120 s on a busy machine
    probe = "import sys; from cifarbench.cli import main; main(['models']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines()[-1] == "False", out.stderr
