"""Fused groups: K seeds stacked under vmap in one ``ResNetModule`` (the forward pass, losses and optimiser its
training step uses), against one unfused run, which is also what K runs one after another achieve together.
K runs packed onto the device at once (``bench.pack``) are the other alternative; the GPU check measures both
beside a fused group of the same model, data, precision and K."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cifarbench.bench import rows, timing
from cifarbench.bench.train import eval_rate, model_and_optimiser, projected_minutes, training_step
from cifarbench.config.spec import DATASETS, RunSpec, get_recipe
from cifarbench.train import data
from cifarbench.train.fit import FastPath
from cifarbench.train.module import AUTOCAST, ResNetModule


def _module_eval_rate(module: ResNetModule, loader, dtype: torch.dtype | None, repeats: int) -> timing.Rate:
    """Aggregate test-set images/s of a module's members (every member's images counted)."""
    module.eval()

    def one_pass() -> int:
        images = 0
        for x, y in loader:
            module(x)
            images += len(y) * len(module.live)
        return images

    with torch.inference_mode(), torch.autocast(module.device.type, dtype=dtype, enabled=dtype is not None):
        return timing.passes_per_s(one_pass, device=module.device, repeats=repeats)


def bench_fuse(
    *,
    model: str,
    dataset: str,
    root: str | Path,
    batch_size: int,
    device: torch.device,
    sizes: tuple[int, ...] = (1, 2, 4, 8, 16),
    precision: str = "auto",
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 3,
) -> Iterator[dict]:
    """Rows as they are measured: one unfused run's fast-path steps (the baseline), then the aggregate training
    images/s of a fused group of K for each K in ``sizes``. Each row carries the test-set images/s of all members
    and the projected minutes of the group's 200-epoch CIFAR run (all K members)."""
    from cifarbench.train.fuse import StackedBatches

    k = DATASETS[dataset].num_classes
    fast = FastPath.for_device(device, precision)
    window: dict[str, Any] = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    common: dict[str, Any] = dict(device=device, what="fuse", model=model, dataset=dataset, batch_size=batch_size)
    common |= dict(precision=fast.precision, loader="device", workers=0, steps=steps, warmup=warmup, repeats=repeats)
    benchmark_was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        train, test = data.make_loaders(
            dataset=dataset,
            root=root,
            loader="device",
            batch_size=batch_size,
            seed=0,
            device=device,
            memory_format=fast.memory_format,
        )
        net, opt = model_and_optimiser(model, k, device, channels_last=fast.channels_last, fused=fast.fused_sgd)
        one = timing.images_per_s(timing.batches(train), training_step(net, opt, fast.precision, device), **window)
        eval_one = eval_rate(model, k, test, fast, device, repeats).median
        base = one.median
        yield rows.finish(
            {
                "variant": "1 run, unfused (K runs in sequence: the same)",
                "baseline": True,
                **one.columns(),
                "eval_images_per_s": eval_one,
                "minutes_200_epochs": projected_minutes(one.median, eval_one),
            },
            base=base,
            **common,
        )
        del net, opt
        recipe = get_recipe("step-200")
        dtype = AUTOCAST[fast.precision]
        for size in sizes:
            specs = [
                RunSpec(model=model, dataset=dataset, recipe=recipe, batch_size=batch_size, seed=s, data_root=str(root))
                for s in range(size)
            ]
            row: dict[str, Any] = {"variant": f"fused group of {size}", "baseline": False}
            try:
                module = ResNetModule(
                    specs, steps=specs[0].steps(len(train)), fused_sgd=fast.fused_sgd, memory_format=fast.memory_format
                ).to(device)
                optimiser = module.configure_optimizers()["optimizer"]

                def consume(x, y, module=module, optimiser=optimiser):
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        losses = module.losses(module(x), y)
                    losses.sum().backward()
                    optimiser.step()
                    optimiser.zero_grad(set_to_none=True)

                batches = StackedBatches(train, [s.seed for s in specs]) if size > 1 else train
                rate = timing.images_per_s(timing.batches(batches), consume, **window)
                test_rate = _module_eval_rate(module, test, dtype, repeats).median
                row.update(
                    **rate.columns(),
                    eval_images_per_s=test_rate,
                    # the whole group: K runs' images each epoch, at the aggregate rates
                    minutes_200_epochs=projected_minutes(rate.median / size, test_rate / size),
                )
                del module, optimiser
            except torch.OutOfMemoryError:
                row.update(images_per_s=None, note="out of device memory")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            yield rows.finish(row, base=base, **common)
    finally:
        torch.backends.cudnn.benchmark = benchmark_was
