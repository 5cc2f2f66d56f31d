"""A run's ``compile`` option: torch.compile (inductor, a real C++ toolchain on CPU) for training and test steps,
resume, and the safe fallback to eager training where the toolchain is broken."""

import copy
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.store import records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.train import data
from cifarbench.train.fit import fit
from cifarbench.train.models import get_resnet, init_weights
from cifarbench.train.module import compile_for_training

pytestmark = pytest.mark.slow  # each compilation takes tens of seconds on a small CPU


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """Splits of whole batches (2048 = 32 x 64 training images, one test batch): two graphs to compile."""
    root = tmp_path_factory.mktemp("data")
    data.write_synthetic("synthetic10", root, train_size=2048, test_size=256)
    return root


def _spec(root, results, **kw):
    fields = dict(
        model="resnet20",
        dataset="synthetic10",
        recipe=get_recipe("step-200"),
        batch_size=64,
        seed=0,
        epochs=2,
        data_root=str(root),
        results=str(results),
        deterministic=True,
    )
    return RunSpec(**{**fields, **kw})


@pytest.mark.extended  # the compiled run below is the suite's end-to-end path of compile
def test_the_compiled_model_computes_the_eager_models_training_and_test_steps():
    torch.manual_seed(0)
    compiled = get_resnet("resnet20", 10).to(memory_format=torch.channels_last)
    compiled.apply(init_weights)
    eager, exact = copy.deepcopy(compiled), copy.deepcopy(compiled).double()
    assert (
        compile_for_training(
            compiled,
            "default",
            example=torch.empty(64, 3, 32, 32).contiguous(memory_format=torch.channels_last),
            precision="32-true",
            device=torch.device("cpu"),
        )
        is None
    )
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no "_orig_mod." prefix
    x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    losses = []
    for model, inputs in ((compiled, x), (eager, x), (exact, x.double())):
        losses.append(F.cross_entropy(model(inputs), y))
        losses[-1].backward()
    assert losses[0].item() == pytest.approx(losses[2].item(), rel=1e-5)

    def error(model):  # of the gradient, relative to the float64 one
        grads = [torch.cat([p.grad.double().flatten() for p in m.parameters()]) for m in (model, exact)]
        return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()

    # Both float32 gradients are ~1e-3 off the float64 one (measured, seeds 0-2: eager 0.07-0.13%, compiled
    # 0.05-0.11%): fused kernels sum in another order, not in a worse way.
    assert error(eager) < 5e-3 and error(compiled) < 4 * error(eager)
    for (name, a), b in zip(compiled.named_buffers(), eager.buffers()):  # batch-norm statistics
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    with torch.inference_mode():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-3, atol=1e-3)


class _Crash(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            raise RuntimeError("node lost")


def test_a_compiled_run_learns_and_resumes_exactly(small_root, tmp_path):
    spec = _spec(small_root, tmp_path / "straight", compile="default")
    straight = records.read_record(fit(spec))
    assert straight["status"] == "completed" and straight["compile"] == "default"
    assert straight["compile_fallback"] is None and straight["run_id"] == spec.run_id
    # Measured on this data after 2 epochs, seeds 0-2: compiled 0.977-0.996, eager 0.988-1.000; chance is 0.10.
    assert straight["final_test_acc"] > 0.9

    resumed_spec = _spec(small_root, tmp_path / "resumed", compile="default")
    with pytest.raises(RuntimeError, match="node lost"):
        fit(resumed_spec, callbacks=[_Crash()])
    resumed = records.read_record(fit(resumed_spec))
    assert resumed["status"] == "completed" and resumed["attempts"] == 2
    for key in ("final_test_acc", "final_test_loss", "test_acc", "train_loss", "lr_curve"):
        assert resumed[key] == straight[key], key


@pytest.mark.extended
def test_a_broken_compiler_toolchain_trains_eagerly_and_says_why(small_root, tmp_path):
    # A fresh process with an empty kernel cache, so that inductor must build its C++ kernels, and a C++
    # compiler that does not exist: what a node without a toolchain does.
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    results = tmp_path / "results"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifarbench",
            "run",
            "--model",
            "resnet20",
            "--dataset",
            "synthetic10",
            "--opt",
            "step-200",
            "--batch-size",
            "64",
            "--epochs",
            "1",
            "--deterministic",
            "--compile",
            "--data-root",
            str(small_root),
            "--results",
            str(results),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # named as `cifarbench run` names it: with the fingerprint of its synthetic data
    spec = _spec(
        small_root, results, epochs=1, compile="default", data_fingerprint=fingerprint("synthetic10", small_root)
    )
    assert f"[{spec.run_id}] torch.compile failed, training eagerly: " in out.stdout
    record = records.read_record(Layout(results).record(spec.run_id))
    assert record["status"] == "completed" and record["compile"] == "default"
    assert "no-such-c++" in record["compile_fallback"] and "\n" not in record["compile_fallback"]
    eager = records.read_record(fit(_spec(small_root, tmp_path / "eager", epochs=1)))
    assert record["test_acc"] == eager["test_acc"] and record["train_loss"] == eager["train_loss"]
