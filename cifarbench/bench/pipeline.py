"""The input pipeline: images/s of augmented, normalised training batches ready on the device, cifarbench's device
loader against torchvision's per-image PIL pipeline in a DataLoader."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cifarbench.bench import rows, timing
from cifarbench.system import usable_cores
from cifarbench.train import data
from cifarbench.train.fit import FastPath


def prepare_data(dataset: str, root: str | Path, *, train_size: int = 50_000, test_size: int = 10_000) -> bool:
    """Write a missing synthetic dataset (a real one is never downloaded); returns whether it was written."""
    try:
        data.check_dataset(dataset, root, verify=False)
        return False
    except data.DataError:
        if not data.LAYOUTS[dataset].synthetic:
            raise
    data.write_synthetic(dataset, root, train_size=train_size, test_size=test_size)
    return True


def baseline_workers() -> list[int]:
    """A worker per usable core, and 2 workers (a common default) where that differs."""
    cores = usable_cores()
    return [cores] + ([2] if cores != 2 else [])


def bench_pipeline(
    *,
    dataset: str,
    root: str | Path,
    batch_size: int,
    device: torch.device,
    steps: int = 200,
    warmup: int = 20,
    repeats: int = 5,
) -> Iterator[dict]:
    """Rows as they are measured: the DataLoader on all cores (the baseline) and on 2 workers, each batch moved to
    the device, then the device loader."""
    window: dict[str, Any] = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    common: dict[str, Any] = dict(device=device, what="pipeline", dataset=dataset, batch_size=batch_size)
    common |= dict(steps=steps, warmup=warmup, repeats=repeats)
    base = None
    for workers in baseline_workers():
        loader, _ = data.make_loaders(
            dataset=dataset,
            root=root,
            loader="torchvision",
            batch_size=batch_size,
            seed=0,
            device=device,
            num_workers=workers,
        )
        rate = timing.images_per_s(
            timing.batches(loader),
            lambda x, y: (x.to(device, non_blocking=True), y.to(device, non_blocking=True)),
            **window,
        )
        del loader  # stops its persistent workers before the next measurement
        gc.collect()
        first, base = base is None, base or rate.median
        yield rows.finish(
            {
                "variant": f"torchvision DataLoader, {workers} workers",
                "loader": "torchvision",
                "workers": workers,
                "baseline": first,
                **rate.columns(),
            },
            base=base,
            **common,
        )
    loader, _ = data.make_loaders(
        dataset=dataset,
        root=root,
        loader="device",
        batch_size=batch_size,
        seed=0,
        device=device,
        memory_format=FastPath.for_device(device).memory_format,
    )
    rate = timing.images_per_s(timing.batches(loader), lambda x, y: None, **window)
    row = {"variant": "device loader", "loader": "device", "workers": 0, "baseline": False, **rate.columns()}
    yield rows.finish(row, base=base, **common)
