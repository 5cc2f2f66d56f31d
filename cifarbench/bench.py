"""Throughput of the input pipeline and of training steps: cifarbench's fast path against the usual baseline.

Every measurement warms up, then times ``repeats`` windows of ``steps`` batches and keeps the median window's
images/s, synchronising the device before each clock read. ``ratio`` is images/s over the baseline row's of the
same kind. Rows are written to ``<results>/bench/<UTC time>-<host>.parquet`` with their own schema (``bench/2``),
which the collector does not read as run records.
"""

from __future__ import annotations

import contextlib
import gc
import io
import multiprocessing
import os
import queue
import resource
import socket
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import lightning as L
import pyarrow as pa
import torch
import torch.nn.functional as F

from cifarbench.config.spec import DATASETS, RunSpec, get_recipe
from cifarbench.errors import plural
from cifarbench.store import records
from cifarbench.store.layout import Layout
from cifarbench.system import allowed_cores, usable_cores
from cifarbench.train import data
from cifarbench.train import fit as fitting
from cifarbench.train.fit import FastPath
from cifarbench.train.models import get_resnet, init_weights
from cifarbench.train.module import AUTOCAST, ResNetModule
from cifarbench.train.pack import mps_server, shares

BENCH_TAG = b"bench/2"
_str, _int = pa.string(), pa.int32()
SCHEMA = pa.schema(
    [
        ("what", _str),
        ("variant", _str),
        ("baseline", pa.bool_()),  # what: pipeline | train
        ("images_per_s", pa.float64()),  # null: the variant could not run (see note)
        ("ratio", pa.float64()),  # images_per_s / the baseline's of the same `what`
        # a lever or compile row: images_per_s / the fast path row's ("lightning fit"'s for a compiled fit)
        ("ratio_to_fast_path", pa.float64()),
        ("eval_images_per_s", pa.float64()),  # test-set images/s of the fast path (the `lightning fit` rows)
        ("minutes_200_epochs", pa.float64()),  # a 200-epoch run of 50,000 + 10,000 images/epoch, projected
        ("model", _str),
        ("dataset", _str),
        ("batch_size", _int),
        ("precision", _str),
        ("loader", _str),
        ("workers", _int),
        ("steps", _int),
        ("warmup", _int),
        ("repeats", _int),
        ("note", _str),
        ("device", _str),
        ("torch_version", _str),
        ("cuda_version", _str),
        ("hostname", _str),
        ("cpu_cores", _int),
        ("torch_threads", _int),
        ("load_avg", pa.float64()),  # 1-minute load average at the end, ours included
        # what: pack. images_per_s is the aggregate of `pack` concurrent runs; ratio: over one run alone
        ("pack", _int),
        ("per_run_images_per_s", pa.float64()),  # the median run's own images/s
        ("slowdown", pa.float64()),  # one run alone's images/s over the median packed run's
        ("peak_memory_mb", pa.float64()),  # summed over the runs; the note says which memory
        ("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={records.SCHEMA_KEY: BENCH_TAG},
)


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
            images += y.numel()  # a fused group's [K, B] labels: all members' images
        _sync(device)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def _finish(rows: list[dict], *, device: torch.device, **common) -> list[dict]:
    """Add the ratio to the baseline row, and the columns every row shares; a row's own value of one of them wins
    (the runs of ``bench_pack`` train in processes of their own, with their own thread count)."""
    base = next(r["images_per_s"] for r in rows if r["baseline"])
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "hostname": socket.gethostname(),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "created_at": datetime.now(timezone.utc),
    }
    return [
        {**common, **env, **r, "ratio": None if r["images_per_s"] is None else r["images_per_s"] / base} for r in rows
    ]


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
) -> list[dict]:
    """Images/s of augmented, normalised training batches ready on ``device``: the device loader against
    torchvision's per-image PIL pipeline in a DataLoader (each batch moved to the device)."""
    timing = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    rows: list[dict] = []
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
        rate = _images_per_s(
            _batches(loader), lambda x, y: (x.to(device, non_blocking=True), y.to(device, non_blocking=True)), **timing
        )
        rows.append(
            {
                "variant": f"torchvision DataLoader, {workers} workers",
                "loader": "torchvision",
                "workers": workers,
                "images_per_s": rate,
                "baseline": not rows,
            }
        )
        del loader  # stops its persistent workers before the next measurement
        gc.collect()
    loader, _ = data.make_loaders(
        dataset=dataset,
        root=root,
        loader="device",
        batch_size=batch_size,
        seed=0,
        device=device,
        memory_format=FastPath.for_device(device).memory_format,
    )
    rate = _images_per_s(_batches(loader), lambda x, y: None, **timing)
    rows.append({"variant": "device loader", "loader": "device", "workers": 0, "images_per_s": rate, "baseline": False})
    return _finish(
        rows,
        device=device,
        what="pipeline",
        dataset=dataset,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
    )


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


def _model_and_optimiser(name: str, num_classes: int, device: torch.device, *, channels_last: bool, fused: bool):
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


def _eval_images_per_s(
    name: str,
    num_classes: int,
    loader,
    fast: FastPath,
    device: torch.device,
    repeats: int,
    compile_mode: str | None = None,
) -> float:
    """Test-set throughput of the fast path (no grad, batches of the test loader), median over passes."""
    model, _ = _model_and_optimiser(name, num_classes, device, channels_last=fast.channels_last, fused=False)
    model.eval()
    if compile_mode:
        model.compile(mode=compile_mode, dynamic=False)  # as a run's model is compiled (train.fit)
    dtype = AUTOCAST[fast.precision]
    rates = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(repeats + 1):  # the first pass warms up (and compiles)
            _sync(device)
            start, images = time.perf_counter(), 0
            for x, y in loader:
                model(x)
                images += len(y)
            _sync(device)
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates[1:])


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
            _sync(self.device)
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
    rate = statistics.median(steps * batch_size / (b - a) for a, b in zip(clock.times, clock.times[1:]))
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
                "images_per_s": rate,
                "note": f"trained eagerly: {fallback}" if fallback else None,
            }
        ]
    return [
        {**common, "variant": "lightning fit", "images_per_s": rate},
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
) -> list[dict]:
    """Images/s of full training steps: the seed notebook's setup (PIL DataLoader on all cores, eager, 16-mixed
    on GPU / 32-true on CPU) against the fast path (device loader and ``FastPath.for_device``: on GPU bf16,
    channels_last, cudnn.benchmark, fused SGD), and through Lightning's ``fit``. ``with_levers`` adds a row per
    lever flipped, ``compile`` rows under torch.compile (and CUDA graphs on GPU). The ``lightning fit`` row
    carries the test-set images/s and the projected minutes of a 200-epoch CIFAR run."""
    k = DATASETS[dataset].num_classes
    fast = FastPath.for_device(device, precision)
    timing = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    benchmark_was = torch.backends.cudnn.benchmark
    if device.type == "cuda":  # as a run sets it
        torch.set_float32_matmul_precision("high")
    rows = []

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
    net, opt = _model_and_optimiser(model, k, device, channels_last=False, fused=False)
    base_step = _step(net, opt, base_precision, device)

    def consume(x, y, step=base_step):
        return step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))

    rate = _images_per_s(_batches(loader), consume, **timing)
    rows.append(
        {
            "variant": "baseline: PIL DataLoader, eager",
            "baseline": True,
            "loader": "torchvision",
            "workers": workers,
            "precision": base_precision,
            "images_per_s": rate,
        }
    )
    del loader, net, opt, base_step, consume
    gc.collect()

    loaders = {}  # memory format -> device loaders
    variants: list[tuple[str, FastPath, str | None]] = [("fast path", fast, None)]
    variants += [(f"fast path, {label}", v, None) for label, v in levers(fast, device)] if with_levers else []
    variants += [(f"fast path + {label}", fast, mode) for label, mode in compile_modes(device)] if compile else []
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
        net, opt = _model_and_optimiser(model, k, device, channels_last=v.channels_last, fused=v.fused_sgd)
        try:
            compiled = torch.compile(net, mode=mode) if mode else net
            row["images_per_s"] = _images_per_s(
                _batches(loaders[v.memory_format][0]), _step(compiled, opt, v.precision, device), **timing
            )
        except Exception as exc:  # torch.compile needs a working compiler toolchain; eager still stands
            if not mode:
                raise
            row.update(images_per_s=None, note=f"torch.compile failed: {type(exc).__name__}: {exc}".splitlines()[0])
        if label != "fast path":
            fast_rate = rows[1]["images_per_s"]  # after the baseline: the variants' first row
            row["ratio_to_fast_path"] = row["images_per_s"] and row["images_per_s"] / fast_rate
        rows.append(row)
        del net, opt
        if mode:
            torch.compiler.reset()  # the next variant compiles afresh
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark
    test_loader = loaders[fast.memory_format][1]
    eval_rate = _eval_images_per_s(model, k, test_loader, fast, device, repeats)
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
    fit[0].update(eval_images_per_s=eval_rate, minutes_200_epochs=projected_minutes(fit[0]["images_per_s"], eval_rate))
    rows += fit
    for _, mode in compile_modes(device) if compile else ():  # the job's own compile option, end to end
        (row,) = _fit_rows(**fit_args, compile_mode=mode)
        if row["note"] is None:
            compiled_eval = _eval_images_per_s(model, k, test_loader, fast, device, repeats, compile_mode=mode)
            row.update(
                ratio_to_fast_path=row["images_per_s"] / fit[0]["images_per_s"],
                eval_images_per_s=compiled_eval,
                minutes_200_epochs=projected_minutes(row["images_per_s"], compiled_eval),
            )
        rows.append(row)
        torch.compiler.reset()
    torch.backends.cudnn.benchmark = benchmark_was
    return _finish(
        rows,
        device=device,
        what="train",
        model=model,
        dataset=dataset,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
    )


def _packed_run(task: dict, barrier, out) -> None:
    """One of the concurrent runs of ``bench_pack``, in a process of its own: warm up, wait for the others, then
    time ``steps`` fast-path training steps."""
    torch.set_num_threads(task["threads"])
    if task["cores"]:
        os.sched_setaffinity(0, task["cores"])
    device = torch.device(task["device"])
    fast = FastPath.for_device(device, task["precision"])
    if device.type == "cuda":  # as a run sets them
        torch.backends.cudnn.benchmark = fast.cudnn_benchmark
        torch.set_float32_matmul_precision("high")
    loader, _ = data.make_loaders(
        dataset=task["dataset"],
        root=task["root"],
        loader="device",
        batch_size=task["batch_size"],
        seed=task["index"],
        device=device,
        memory_format=fast.memory_format,
    )
    classes = DATASETS[task["dataset"]].num_classes
    net, opt = _model_and_optimiser(
        task["model"], classes, device, channels_last=fast.channels_last, fused=fast.fused_sgd
    )
    step, batches = _step(net, opt, fast.precision, device), _batches(loader)
    for _ in range(task["warmup"]):
        step(*next(batches))
    _sync(device)
    barrier.wait()
    start, images = time.monotonic(), 0
    for _ in range(task["steps"]):
        x, y = next(batches)
        step(x, y)
        images += len(y)
    _sync(device)
    end = time.monotonic()
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "device memory allocated by torch"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resident memory (RSS)"
    out.put({"start": start, "end": end, "images": images, "peak": peak, "kind": kind, "precision": fast.precision})


def _gather(procs: list, out) -> list[dict]:
    """Each run's figures; a run whose process died stops the others (they would wait for it forever)."""
    runs: list[dict] = []
    try:
        while len(runs) < len(procs):
            try:
                runs.append(out.get(timeout=5))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a run of the packing benchmark died (exit {dead[0]})") from None
    finally:
        for proc in procs:
            if len(runs) < len(procs):
                proc.terminate()
            proc.join()
    return runs


def bench_pack(
    *,
    model: str,
    dataset: str,
    root: str | Path,
    batch_size: int,
    device: torch.device,
    packs: list[int],
    precision: str = "auto",
    mps: str = "auto",
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 3,
) -> list[dict]:
    """Aggregate training images/s of K fast-path runs at once on ``device``, each in a process of its own as a
    packed job trains them (on a CPU each with its share of the cores), against one run alone (K = 1, always
    measured): all runs warm up, then start their ``steps * repeats`` timed steps together; the aggregate is all
    their images over the time from the first start to the last end. Also each run's own images/s (the median
    run's), its slowdown against the run alone, and the peak memory of the runs together."""
    packs = sorted({1, *packs})
    spawn = multiprocessing.get_context("spawn")  # a CUDA context does not survive fork
    rows = []
    with tempfile.TemporaryDirectory(prefix="cifarbench-bench-pack-") as tmp, mps_server(mps, Path(tmp)) as shared:
        label, env = shared
        os.environ.update(env)  # the spawned runs are clients of the MPS server
        for k in packs:
            threads, cores = shares(k, usable_cores(), allowed_cores())
            barrier, out = spawn.Barrier(k), spawn.Queue()
            common = dict(model=model, dataset=dataset, root=str(root), batch_size=batch_size, precision=precision)
            procs = [
                spawn.Process(
                    target=_packed_run,
                    args=(
                        {
                            **common,
                            "device": str(device),
                            "index": i,
                            "threads": threads,
                            "cores": cores[i] if cores else None,
                            "warmup": warmup,
                            "steps": steps * repeats,
                        },
                        barrier,
                        out,
                    ),
                )
                for i in range(k)
            ]
            for proc in procs:
                proc.start()
            runs = _gather(procs, out)
            rates = [r["images"] / (r["end"] - r["start"]) for r in runs]
            aggregate = sum(r["images"] for r in runs) / (max(r["end"] for r in runs) - min(r["start"] for r in runs))
            rows.append(
                {
                    "variant": f"{plural(k, 'run')} at once" + (f", MPS {label}" if label and k > 1 else ""),
                    "baseline": k == 1,
                    "pack": k,
                    "loader": "device",
                    "workers": 0,
                    "precision": runs[0]["precision"],
                    "images_per_s": aggregate,
                    "per_run_images_per_s": statistics.median(rates),
                    "peak_memory_mb": sum(r["peak"] for r in runs) / 2**20,
                    "torch_threads": threads,
                    "note": f"{threads} threads per run; peak: {runs[0]['kind']}, summed over the runs",
                }
            )
    alone = rows[0]["per_run_images_per_s"]
    for row in rows:
        row["slowdown"] = alone / row["per_run_images_per_s"]
    return _finish(
        rows,
        device=device,
        what="pack",
        model=model,
        dataset=dataset,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
    )


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
) -> list[dict]:
    """Aggregate training images/s of a fused group of K runs (K seeds stacked under vmap in one
    ``ResNetModule``: the forward pass, losses and optimiser its training step uses) for each K in ``sizes``,
    against one unfused run's fast-path steps, which is also what K runs one after another achieve together.
    Each row carries the test-set images/s per member and the projected minutes of the group's 200-epoch CIFAR run
    (all K members). Rows of K runs packed onto the device at once belong beside these, with the same ``what``
    and K in the variant, where packing exists."""
    from cifarbench.train.fuse import StackedBatches

    k = DATASETS[dataset].num_classes
    fast = FastPath.for_device(device, precision)
    timing = dict(device=device, steps=steps, warmup=warmup, repeats=repeats)
    benchmark_was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    train, test = data.make_loaders(
        dataset=dataset,
        root=root,
        loader="device",
        batch_size=batch_size,
        seed=0,
        device=device,
        memory_format=fast.memory_format,
    )
    net, opt = _model_and_optimiser(model, k, device, channels_last=fast.channels_last, fused=fast.fused_sgd)
    one = _images_per_s(_batches(train), _step(net, opt, fast.precision, device), **timing)
    eval_one = _eval_images_per_s(model, k, test, fast, device, repeats)
    rows: list[dict] = [
        {
            "variant": "1 run, unfused (K runs in sequence: the same)",
            "baseline": True,
            "images_per_s": one,
            "eval_images_per_s": eval_one,
            "minutes_200_epochs": projected_minutes(one, eval_one),
        }
    ]
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
            rate = _images_per_s(_batches(batches), consume, **timing)
            eval_rate = _module_eval_images_per_s(module, test, dtype, repeats)
            row.update(
                images_per_s=rate,
                eval_images_per_s=eval_rate,
                # the whole group: K runs' images each epoch, at the aggregate rates
                minutes_200_epochs=projected_minutes(rate / size, eval_rate / size),
            )
            del module, optimiser
        except torch.OutOfMemoryError:
            row.update(images_per_s=None, note="out of device memory")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    torch.backends.cudnn.benchmark = benchmark_was
    return _finish(
        rows,
        device=device,
        what="fuse",
        model=model,
        dataset=dataset,
        batch_size=batch_size,
        precision=fast.precision,
        loader="device",
        workers=0,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
    )


def _module_eval_images_per_s(module: ResNetModule, loader, dtype: torch.dtype | None, repeats: int) -> float:
    """Aggregate test-set images/s of a module's members (every member's images counted), median over passes."""
    module.eval()
    rates = []
    with torch.inference_mode(), torch.autocast(module.device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(repeats + 1):  # the first pass warms up
            _sync(module.device)
            start, images = time.perf_counter(), 0
            for x, y in loader:
                module(x)
                images += len(y) * len(module.live)
            _sync(module.device)
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def write_rows(rows: list[dict], results: str | Path) -> Path:
    host = socket.gethostname()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows], schema=SCHEMA)
    return records.write_table(table, Layout(results).bench / f"{stamp}-{host}.parquet")


def render_pack(rows: list[dict]) -> str:
    """A plain-text table of ``bench_pack``'s rows."""
    lines = [
        f"{'runs at once':>12} {'images/s':>10} {'x one run':>9} {'per run':>9} {'slowdown':>8} {'peak MB':>9}"
        "  device / torch, threads per run"
    ]
    for r in rows:
        lines.append(
            f"{r['pack']:>12} {r['images_per_s']:>10,.0f} {r['ratio']:>9.2f} {r['per_run_images_per_s']:>9,.0f} "
            f"{r['slowdown']:>8.2f} {r['peak_memory_mb']:>9,.0f}  {r['device']} / {r['torch_version']}, "
            f"{r['torch_threads']}" + (f"  ({r['variant']})" if "MPS" in r["variant"] else "")
        )
    return "\n".join(lines + [f"peak: {rows[0]['note'].partition('peak: ')[2]}"])


def render(rows: list[dict]) -> str:
    """A plain-text table: what, variant, images/s, ratio to the baseline, ratio to the fast path (lever and
    compile rows), projected 200-epoch minutes (where measured), device, torch version."""
    width = max(len(r["variant"]) for r in rows)
    lines = [
        f"{'what':<9} {'variant':<{width}} {'images/s':>10} {'x baseline':>10} {'x fast':>6} {'200 ep min':>10}"
        "  device / torch"
    ]
    for r in rows:
        rate, ratio = r["images_per_s"], r["ratio"]
        lever, minutes = r.get("ratio_to_fast_path"), r.get("minutes_200_epochs")
        lines.append(
            f"{r['what']:<9} {r['variant']:<{width}} {'-' if rate is None else f'{rate:,.0f}':>10} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>10} {'' if lever is None else f'{lever:.2f}':>6} "
            f"{'' if minutes is None else f'{minutes:,.1f}':>10}  {r['device']} / {r['torch_version']}"
            + (f"  ({r['note']})" if r.get("note") else "")
        )
    return "\n".join(lines)
