"""Throughput of the input pipeline and of training steps: cifarbench's fast path against the usual baseline.

Every measurement warms up, then times ``repeats`` windows of ``steps`` batches and keeps the median window's
images/s, synchronising the device before each clock read. ``ratio`` is images/s over the baseline row's of the
same kind. Rows are written to ``<results>/bench/<UTC time>-<host>.parquet`` with their own schema (``bench/1``),
which the collector does not read as run records.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import socket
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import pyarrow as pa
import torch
import torch.nn.functional as F

from cifarbench import data, records, train
from cifarbench.models import get_resnet, init_weights
from cifarbench.spec import DATASETS, RunSpec, get_recipe

BENCH_TAG = b"bench/1"
_str, _int = pa.string(), pa.int32()
SCHEMA = pa.schema(
    [("what", _str), ("variant", _str), ("baseline", pa.bool_()),  # what: pipeline | train
     ("images_per_s", pa.float64()),  # null: the variant could not run (see note)
     ("ratio", pa.float64()),  # images_per_s / the baseline's of the same `what`
     ("model", _str), ("dataset", _str), ("batch_size", _int), ("precision", _str), ("loader", _str),
     ("workers", _int), ("steps", _int), ("warmup", _int), ("repeats", _int), ("note", _str),
     ("device", _str), ("torch_version", _str), ("cuda_version", _str), ("hostname", _str), ("cpu_cores", _int),
     ("torch_threads", _int), ("load_avg", pa.float64()),  # 1-minute load average at the end, ours included
     ("created_at", pa.timestamp("us", tz="UTC"))],
    metadata={records.SCHEMA_KEY: BENCH_TAG},
)
AUTOCAST = {"32-true": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(loader):
    """Batches over successive epochs, with ``set_epoch`` called as Lightning does."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _images_per_s(batches, consume, *, device, steps, warmup, repeats) -> float:
    for _ in range(warmup):
        consume(*next(batches))
    rates = []
    for _ in range(repeats):
        _sync(device)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            x, y = next(batches)
            consume(x, y)
            images += len(y)
        _sync(device)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def _finish(rows: list[dict], *, device: torch.device, **common) -> list[dict]:
    """Add the ratio to the baseline row, and the columns every row shares."""
    base = next(r["images_per_s"] for r in rows if r["baseline"])
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch_version": torch.__version__, "cuda_version": torch.version.cuda, "hostname": socket.gethostname(),
           "cpu_cores": usable_cores(), "torch_threads": torch.get_num_threads(),
           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "created_at": datetime.now(timezone.utc)}
    return [{**common, **r, "ratio": None if r["images_per_s"] is None else r["images_per_s"] / base, **env}
            for r in rows]


def usable_cores() -> int:
    """The cores this process may run on: under SLURM often fewer than the node's ``os.cpu_count()``."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def baseline_workers() -> list[int]:
    """A worker per usable core, and 2 workers (a common default) where that differs."""
    cores = usable_cores()
    return [cores] + ([2] if cores != 2 else [])


def bench_pipeline(*, dataset: str, root: str | Path, batch_size: int, device: torch.device,
                   steps: int = 200, warmup: int = 20, repeats: int = 5) -> list[dict]:
    """Images/s of augmented, normalised training batches ready on ``device``: the device loader against
    torchvision's per-image PIL pipeline in a DataLoader (each batch moved to the device)."""
    timing = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    rows = []
    for workers in baseline_workers():
        loader, _ = data.make_loaders(dataset=dataset, root=root, loader="torchvision", batch_size=batch_size,
                                      seed=0, device=device, num_workers=workers)
        rate = _images_per_s(_batches(loader), lambda x, y: (x.to(device, non_blocking=True),
                                                             y.to(device, non_blocking=True)), **timing)
        rows.append({"variant": f"torchvision DataLoader, {workers} workers", "loader": "torchvision",
                     "workers": workers, "images_per_s": rate, "baseline": not rows})
        del loader  # stops its persistent workers before the next measurement
        gc.collect()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    loader, _ = data.make_loaders(dataset=dataset, root=root, loader="device", batch_size=batch_size, seed=0,
                                  device=device, memory_format=memory_format)
    rate = _images_per_s(_batches(loader), lambda x, y: None, **timing)
    rows.append({"variant": "device loader", "loader": "device", "workers": 0, "images_per_s": rate,
                 "baseline": False})
    return _finish(rows, device=device, what="pipeline", dataset=dataset, batch_size=batch_size,
                   steps=steps, warmup=warmup, repeats=repeats)


def _step(model, optimiser, precision: str, device: torch.device):
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


def _model_and_optimiser(name: str, num_classes: int, device: torch.device, *, fast: bool):
    torch.manual_seed(0)
    model = get_resnet(name, num_classes)
    model.apply(init_weights)
    model.to(device).train()
    if fast and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    recipe = get_recipe("step-200")
    optimiser = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, fused=(fast and device.type == "cuda") or None)
    return model, optimiser


class _Clock(L.Callback):
    """Device-synchronised clock reads after the training batches that close each timed window."""

    def __init__(self, device: torch.device, marks: list[int]):
        self.device, self.marks, self.times = device, set(marks), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 in self.marks:
            _sync(self.device)
            self.times.append(time.perf_counter())


def _fit_rows(*, model: str, num_classes: int, batch_size: int, precision: str, device: torch.device,
              steps: int, warmup: int, repeats: int) -> list[dict]:
    """``train.fit`` for one epoch on a synthetic set just long enough: its steady images/s and the whole-epoch
    figure its record keeps (which includes the warm-up)."""
    dataset = f"synthetic{num_classes}"
    with tempfile.TemporaryDirectory(prefix="cifarbench-bench-") as tmp:
        data.write_synthetic(dataset, tmp, train_size=(warmup + steps * repeats) * batch_size, test_size=batch_size)
        spec = RunSpec(model=model, dataset=dataset, recipe=get_recipe("step-200"), batch_size=batch_size, seed=0,
                       epochs=1, precision=precision, data_root=tmp, results=tmp)
        clock = _Clock(device, [warmup + k * steps for k in range(repeats + 1)])
        with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch progress line
            record = records.read_record(train.fit(spec, device=device, callbacks=[clock]))
    rate = statistics.median(steps * batch_size / (b - a) for a, b in zip(clock.times, clock.times[1:]))
    common = {"loader": "device", "workers": 0, "precision": record["precision_used"], "dataset": dataset,
              "baseline": False}
    return [{**common, "variant": "lightning fit", "images_per_s": rate},
            {**common, "variant": "lightning fit, whole epoch (record)", "images_per_s": record["images_per_s"],
             "note": "the record's images_per_s: one epoch, warm-up included"}]


def bench_train(*, model: str, dataset: str, root: str | Path, batch_size: int, device: torch.device,
                precision: str = "auto", steps: int = 20, warmup: int = 5, repeats: int = 3,
                compile: bool = False) -> list[dict]:
    """Images/s of full training steps: the seed notebook's setup (PIL DataLoader on all cores, eager, 16-mixed
    on GPU / 32-true on CPU) against the fast path (device loader, channels_last and fused SGD on GPU,
    ``precision`` resolved as for a run), optionally with torch.compile, and through Lightning's ``fit``."""
    if device.type == "cuda":  # as train.fit sets them
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    k = DATASETS[dataset]
    fast_precision = train.resolve_precision(precision, device)
    timing = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    rows = []

    workers = baseline_workers()[0]
    base_precision = "16-mixed" if device.type == "cuda" else "32-true"
    loader, _ = data.make_loaders(dataset=dataset, root=root, loader="torchvision", batch_size=batch_size, seed=0,
                                  device=device, num_workers=workers)
    net, opt = _model_and_optimiser(model, k, device, fast=False)
    step = _step(net, opt, base_precision, device)
    rate = _images_per_s(_batches(loader), lambda x, y: step(x.to(device, non_blocking=True),
                                                             y.to(device, non_blocking=True)), **timing)
    rows.append({"variant": "baseline: PIL DataLoader, eager", "baseline": True, "loader": "torchvision",
                 "workers": workers, "precision": base_precision, "images_per_s": rate})
    del loader, net, opt, step
    gc.collect()

    loader, _ = data.make_loaders(dataset=dataset, root=root, loader="device", batch_size=batch_size, seed=0,
                                  device=device, memory_format=memory_format)
    fast = {"baseline": False, "loader": "device", "workers": 0, "precision": fast_precision}
    for compiled in (False, True) if compile else (False,):
        net, opt = _model_and_optimiser(model, k, device, fast=True)
        row = {**fast, "variant": "fast path" + (" + torch.compile" if compiled else "")}
        try:
            step = _step(torch.compile(net) if compiled else net, opt, fast_precision, device)
            row["images_per_s"] = _images_per_s(_batches(loader), step, **timing)
        except Exception as exc:  # torch.compile needs a working compiler toolchain; eager still stands
            if not compiled:
                raise
            row.update(images_per_s=None, note=f"torch.compile failed: {type(exc).__name__}: {exc}".splitlines()[0])
        rows.append(row)
    del loader
    gc.collect()

    rows += _fit_rows(model=model, num_classes=k, batch_size=batch_size, precision=precision, device=device,
                      steps=steps, warmup=warmup, repeats=repeats)
    return _finish(rows, device=device, what="train", model=model, dataset=dataset, batch_size=batch_size,
                   steps=steps, warmup=warmup, repeats=repeats)


def write_rows(rows: list[dict], results: str | Path) -> Path:
    host = socket.gethostname()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    return records.atomic_write_table(table, Path(results) / "bench" / f"{stamp}-{host}.parquet")


def render(rows: list[dict]) -> str:
    """A plain-text table: what, variant, images/s, ratio to the baseline, device, torch version."""
    width = max(len(r["variant"]) for r in rows)
    lines = [f"{'what':<9} {'variant':<{width}} {'images/s':>10} {'x baseline':>10}  device / torch"]
    for r in rows:
        rate, ratio = r["images_per_s"], r["ratio"]
        lines.append(f"{r['what']:<9} {r['variant']:<{width}} {'-' if rate is None else f'{rate:,.0f}':>10} "
                     f"{'-' if ratio is None else f'{ratio:.2f}':>10}  {r['device']} / {r['torch_version']}"
                     + (f"  ({r['note']})" if r.get("note") else ""))
    return "\n".join(lines)
