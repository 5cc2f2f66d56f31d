"""Training steps: the seed notebook's setup against cifarbench's fast path, each speed lever flipped alone,
torch.compile, and Lightning's ``fit`` itself (whose row carries the projected minutes of a 200-epoch run)."""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F

from cifarbench.bench import rows, timing
from cifarbench.bench.pipeline import baseline_workers
from cifarbench.bench.timing import Rate
from cifarbench.config.spec import DATASETS, RunSpec, get_recipe
from cifarbench.store import records
from cifarbench.train import data
from cifarbench.train import fit as fitting
from cifarbench.train.fit import FastPath
from cifarbench.train.models import get_resnet, init_weights
from cifarbench.train.module import AUTOCAST


def levers(fast: FastPath, device: torch.device) -> list[tuple[str, FastPath]]:
    """(label, settings) for the fast path with one lever flipped, for the levers that exist on ``device``."""
    cuda = device.type == "cuda"
    other = (
        "32-true"
        if fast.precision != "32-true"
        else ("bf16-mixed" if not cuda or torch.cuda.is_bf16_supported() else "16-mixed")
    )
    flips = [
        (f"precision {other}", replace(fast, precision=other)),
        (f"channels_last {_on_off(not fast.channels_last)}", replace(fast, channels_last=not fast.channels_last)),
        (f"fused SGD {_on_off(not fast.fused_sgd)}", replace(fast, fused_sgd=not fast.fused_sgd)),
    ]
    if cuda:
        flips.append(
            (
                f"cudnn.benchmark {_on_off(not fast.cudnn_benchmark)}",
                replace(fast, cudnn_benchmark=not fast.cudnn_benchmark),
            )
        )
        if fast.precision == "bf16-mixed":
            flips.append(("precision 16-mixed (gradient scaler)", replace(fast, precision="16-mixed")))
    return flips


def compile_modes(device: torch.device) -> list[tuple[str, str]]:
    """(label, torch.compile mode): "reduce-overhead" also captures CUDA graphs."""
    return [("torch.compile", "default")] + (
        [("torch.compile, CUDA graphs", "reduce-overhead")] if device.type == "cuda" else []
    )


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def training_step(model, optimiser, precision: str, device: torch.device):
    """One training step as a function of the batch; no host-device syncs unless 16-mixed needs its scaler."""
    dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimiser.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()

    return step


def model_and_optimiser(name: str, num_classes: int, device: torch.device, *, channels_last: bool, fused: bool):
    """A model initialised as a run's is (seed 0) and the SGD of the step-200 recipe."""
    torch.manual_seed(0)
    model = get_resnet(name, num_classes)
    model.apply(init_weights)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    recipe = get_recipe("step-200")
    optimiser = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        fused=fused or None,
    )
    return model, optimiser


def eval_rate(
    name: str,
    num_classes: int,
    loader,
    fast: FastPath,
    device: torch.device,
    repeats: int,
    compile_mode: str | None = None,
) -> Rate:
    """Test-set throughput of the fast path (no grad, batches of the test loader)."""
    model, _ = model_and_optimiser(name, num_classes, device, channels_last=fast.channels_last, fused=False)
    model.eval()
    if compile_mode:
        model.compile(mode=compile_mode, dynamic=False)  # as a run's model is compiled (train.fit)
    dtype = AUTOCAST[fast.precision]

    def one_pass() -> int:
        images = 0
        for x, y in loader:
            model(x)
            images += len(y)
        return images

    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return timing.passes_per_s(one_pass, device=device, repeats=repeats)


def projected_minutes(
    train_images_per_s: float,
    eval_images_per_s: float,
    *,
    epochs: int = 200,
    train_size: int = 50_000,
    test_size: int = 10_000,
) -> float:
    """Minutes of a whole CIFAR run: every epoch trains on the training split and evaluates the test split."""
    return epochs * (train_size / train_images_per_s + test_size / eval_images_per_s) / 60


class _Clock(L.Callback):
    """Device-synchronised clock reads after the training batches that close each timed window."""

    def __init__(self, device: torch.device, marks: list[int]):
        self.device, self.marks = device, set(marks)
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 in self.marks:
            timing.sync(self.device)
            self.times.append(time.perf_counter())


def _fit_rows(
    *,
    model: str,
    num_classes: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
    compile_mode: str | None = None,
) -> list[dict]:
    """``train.fit.fit`` for one epoch on a synthetic set just long enough: its steady images/s and the whole-epoch
    figure its record keeps (which includes the warm-up)."""
    dataset = f"synthetic{num_classes}"
    with tempfile.TemporaryDirectory(prefix="cifarbench-bench-") as tmp:
        data.write_synthetic(dataset, tmp, train_size=(warmup + steps * repeats) * batch_size, test_size=batch_size)
        spec = RunSpec(
            model=model,
            dataset=dataset,
            recipe=get_recipe("step-200"),
            batch_size=batch_size,
            seed=0,
            epochs=1,
            precision=precision,
            compile=compile_mode,
            data_root=tmp,
            results=tmp,
        )
        clock = _Clock(device, [warmup + k * steps for k in range(repeats + 1)])
        with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch progress line
            # fit always leaves a record, and this cifarbench wrote it
            record = cast(dict, records.read_record(fitting.fit(spec, device=device, callbacks=[clock])))
    rate = Rate.of(steps * batch_size / (b - a) for a, b in zip(clock.times, clock.times[1:]))
    common = {
        "loader": "device",
        "workers": 0,
        "precision": record["precision_used"],
        "dataset": dataset,
        "baseline": False,
    }
    if compile_mode:
        fallback = record["compile_fallback"]
        return [
            {
                **common,
                "variant": f"lightning fit, torch.compile {compile_mode}",
                **rate.columns(),
                "note": f"trained eagerly: {fallback}" if fallback else None,
            }
        ]
    return [
        {**common, "variant": "lightning fit", **rate.columns()},
        {
            **common,
            "variant": "lightning fit, whole epoch (record)",
            "images_per_s": record["images_per_s"],
            "note": "the record's images_per_s: one epoch, warm-up included",
        },
    ]


def bench_train(
    *,
    model: str,
    dataset: str,
    root: str | Path,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 3,
    compile: bool = False,
    with_levers: bool = False,
) -> Iterator[dict]:
    """Rows as they are measured, of full training steps: the seed notebook's setup (PIL DataLoader on all cores,
    eager, 16-mixed on GPU / 32-true on CPU) against the fast path (device loader and ``FastPath.for_device``: on
    GPU bf16, channels_last, cudnn.benchmark, fused SGD), and through Lightning's ``fit``. ``with_levers`` adds a
    row per lever flipped, ``compile`` rows under torch.compile (and CUDA graphs on GPU). The ``lightning fit``
    row carries the test-set images/s and the projected minutes of a 200-epoch CIFAR run."""
    k = DATASETS[dataset].num_classes
    fast = FastPath.for_device(device, precision)
    window: dict[str, Any] = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    common: dict[str, Any] = dict(device=device, what="train", model=model, dataset=dataset, batch_size=batch_size)
    common |= dict(steps=steps, warmup=warmup, repeats=repeats)
    benchmark_was = torch.backends.cudnn.benchmark
    if device.type == "cuda":  # as a run sets it
        torch.set_float32_matmul_precision("high")
    try:
        workers = baseline_workers()[0]
        base_precision = "16-mixed" if device.type == "cuda" else "32-true"
        loader, _ = data.make_loaders(
            dataset=dataset,
            root=root,
            loader="torchvision",
            batch_size=batch_size,
            seed=0,
            device=device,
            num_workers=workers,
        )
        torch.backends.cudnn.benchmark = False  # torch's default, which the notebook's Trainer keeps
        net, opt = model_and_optimiser(model, k, device, channels_last=False, fused=False)
        base_step = training_step(net, opt, base_precision, device)

        def consume(x, y, step=base_step):
            return step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))

        rate = timing.images_per_s(timing.batches(loader), consume, **window)
        base = rate.median
        yield rows.finish(
            {
                "variant": "baseline: PIL DataLoader, eager",
                "baseline": True,
                "loader": "torchvision",
                "workers": workers,
                "precision": base_precision,
                **rate.columns(),
            },
            base=base,
            **common,
        )
        del loader, net, opt, base_step, consume
        gc.collect()

        loaders = {}  # memory format -> device loaders
        variants: list[tuple[str, FastPath, str | None]] = [("fast path", fast, None)]
        variants += [(f"fast path, {label}", v, None) for label, v in levers(fast, device)] if with_levers else []
        variants += [(f"fast path + {label}", fast, mode) for label, mode in compile_modes(device)] if compile else []
        fast_rate = None
        for label, v, mode in variants:
            if v.memory_format not in loaders:
                loaders[v.memory_format] = data.make_loaders(
                    dataset=dataset,
                    root=root,
                    loader="device",
                    batch_size=batch_size,
                    seed=0,
                    device=device,
                    memory_format=v.memory_format,
                )
            row: dict[str, Any] = {
                "variant": label,
                "baseline": False,
                "loader": "device",
                "workers": 0,
                "precision": v.precision,
            }
            torch.backends.cudnn.benchmark = v.cudnn_benchmark
            net, opt = model_and_optimiser(model, k, device, channels_last=v.channels_last, fused=v.fused_sgd)
            try:
                compiled = torch.compile(net, mode=mode) if mode else net
                step = training_step(compiled, opt, v.precision, device)
                row |= timing.images_per_s(timing.batches(loaders[v.memory_format][0]), step, **window).columns()
            except Exception as exc:  # torch.compile needs a working compiler toolchain; eager still stands
                if not mode:
                    raise
                row.update(images_per_s=None, note=f"torch.compile failed: {type(exc).__name__}: {exc}".splitlines()[0])
            if fast_rate is None:
                fast_rate = row["images_per_s"]  # the variants' first row: the fast path
            else:
                row["ratio_to_fast_path"] = row["images_per_s"] and row["images_per_s"] / fast_rate
            yield rows.finish(row, base=base, **common)
            del net, opt
            if mode:
                torch.compiler.reset()  # the next variant compiles afresh
        torch.backends.cudnn.benchmark = fast.cudnn_benchmark
        test_loader = loaders[fast.memory_format][1]
        test_rate = eval_rate(model, k, test_loader, fast, device, repeats).median
        loaders.clear()
        gc.collect()

        fit_args: dict[str, Any] = dict(
            model=model,
            num_classes=k,
            batch_size=batch_size,
            precision=precision,
            device=device,
            steps=steps,
            warmup=warmup,
            repeats=repeats,
        )
        fit = _fit_rows(**fit_args)
        fit[0].update(
            eval_images_per_s=test_rate, minutes_200_epochs=projected_minutes(fit[0]["images_per_s"], test_rate)
        )
        for row in fit:
            yield rows.finish(row, base=base, **common)
        for _, mode in compile_modes(device) if compile else ():  # the job's own compile option, end to end
            (row,) = _fit_rows(**fit_args, compile_mode=mode)
            if row["note"] is None:
                compiled_eval = eval_rate(model, k, test_loader, fast, device, repeats, compile_mode=mode).median
                row.update(
                    ratio_to_fast_path=row["images_per_s"] / fit[0]["images_per_s"],
                    eval_images_per_s=compiled_eval,
                    minutes_200_epochs=projected_minutes(row["images_per_s"], compiled_eval),
                )
            yield rows.finish(row, base=base, **common)
            torch.compiler.reset()
    finally:
        torch.backends.cudnn.benchmark = benchmark_was
