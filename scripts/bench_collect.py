"""How long ``cifarbench collect`` takes on N records.

    python scripts/bench_collect.py 10000 [--keep DIR [--reuse]] [--repeat 3]

Writes N synthetic records (8 models x 2 datasets x 3 recipes x 3 batch sizes, as many seeds as it takes, 200
epochs of curves, 1% failed runs, and a few truncated files) into a temporary folder, then runs collect in a
fresh process each time and prints how long the call took:

- cold: no runs.parquet yet, every record's footer is read (the records are in the page cache: just written);
  ``--repeat`` times, then the median;
- warm: runs.parquet from the previous collect, nothing changed (what a second collect costs);
- warm, tables + report: the same with report.html, which first reads every record's environment columns;
- warm, report again: these now come from runs.parquet (the ratio to the tables alone follows);
- warm, tables + plots: tables, report.html and the PNGs, which first read the curves of every completed run from
  its record;
- warm, plots again: the curves now come from runs.parquet.

Records are written with pyarrow as ``write_record`` writes them (record schema, summary in the footer), without
its per-file fsync and rename, from a pool of processes: the benchmark measures collect, not writing.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cifarbench.store.layout import Layout
from cifarbench.store.records import RECORD_VERSION, SCHEMA, SUMMARY_KEY, with_summary

MODELS = ["resnet18", "resnet20", "resnet32", "resnet34", "resnet44", "resnet50", "resnet56", "resnet110"]
DATASETS = {"cifar10": 10, "cifar100": 100}
BATCH_SIZES = [64, 128, 256]
EPOCHS = 200
_table: pa.Table | None = None  # the records, shared with the writer processes by fork


def _params() -> dict[tuple[str, int], int]:
    from cifarbench.train.models import count_parameters, get_resnet

    return {(m, k): count_parameters(get_resnet(m, k)) for m in MODELS for k in DATASETS.values()}


def _curve_column(values: np.ndarray, rows_done: np.ndarray) -> pa.Array:
    """A list<double> column: row i holds values[i, :rows_done[i]]."""
    offsets = np.concatenate([[0], np.cumsum(rows_done)]).astype(np.int32)
    flat = values[np.arange(values.shape[1])[None, :] < rows_done[:, None]]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def synthetic_table(n: int, seed: int = 0) -> pa.Table:
    from cifarbench.config.spec import RunSpec, get_recipe

    rng = np.random.default_rng(seed)
    params = _params()
    configs = list(itertools.product(MODELS, DATASETS, ("step-160", "step-200", "cos-200"), BATCH_SIZES))
    specs = [
        RunSpec(model=m, dataset=d, recipe=get_recipe(r), batch_size=bs, seed=i // len(configs))
        for i, (m, d, r, bs) in zip(range(n), itertools.cycle(configs))
    ]
    base = {c: rng.uniform(0.65, 0.95) if c[1] == "cifar10" else rng.uniform(0.55, 0.78) for c in configs}
    final = np.array([base[(s.model, s.dataset, s.recipe.name, s.batch_size)] for s in specs]) + rng.normal(0, 0.004, n)
    failed = rng.random(n) < 0.01
    epochs = np.array([s.recipe.epochs for s in specs])
    done = np.where(failed, rng.integers(1, EPOCHS, n), epochs)
    e = np.arange(1, EPOCHS + 1)[None, :]
    gap = np.where(e < 80, 0.15, np.where(e < 120, 0.06, np.where(e < 160, 0.02, 0.0)))  # steps at milestones
    acc = final[:, None] - gap - 0.5 * np.exp(-e / 8) + rng.normal(0, 0.01, (n, EPOCHS))
    loss = 2.5 * np.exp(-e / 40) + 0.1 + rng.normal(0, 0.01, (n, EPOCHS))
    lr = np.where(e < 60, 0.1, np.where(e < 120, 0.02, np.where(e < 160, 0.004, 0.0008))) * np.ones((n, 1))
    seconds = rng.normal(12.0, 0.5, (n, EPOCHS))
    curves = {
        name: _curve_column(v, done)
        for name, v in (
            ("test_acc", acc),
            ("test_top5", acc + 0.04),
            ("train_loss", loss),
            ("test_loss", loss + 0.3),
            ("lr_curve", lr),
            ("epoch_seconds", seconds),
        )
    }
    ended = np.datetime64("2025-01-01T00:00:00", "us") + (np.arange(n) * 60_000_000).astype("timedelta64[us]")
    cols = {
        "record_version": [RECORD_VERSION] * n,
        "run_id": [s.run_id for s in specs],
        "status": np.where(failed, "failed", "completed").tolist(),
        "model": [s.model for s in specs],
        "dataset": [s.dataset for s in specs],
        "recipe": [s.recipe.name for s in specs],
        "recipe_epochs": epochs.tolist(),
        "lr": [s.schedule.lr for s in specs],
        "momentum": [s.schedule.momentum for s in specs],
        "weight_decay": [s.schedule.weight_decay for s in specs],
        "schedule": [s.schedule.schedule for s in specs],
        "milestones": [list(s.schedule.milestones) for s in specs],
        "gamma": [s.schedule.gamma for s in specs],
        "batch_size": [s.batch_size for s in specs],
        "seed": [s.seed for s in specs],
        "epochs": epochs.tolist(),
        "precision": ["auto"] * n,
        "precision_used": ["bf16-mixed"] * n,
        "loader": ["device"] * n,
        "deterministic": [False] * n,
        "compile": [None] * n,
        "compile_fallback": [None] * n,
        "data_root": ["/data/cifar"] * n,
        "data_verified": [True] * n,
        "num_classes": [s.num_classes for s in specs],
        "params": [params[(s.model, s.num_classes)] for s in specs],
        "epochs_done": done.tolist(),
        "final_test_acc": np.where(failed, np.nan, acc[:, -1]),
        "best_test_acc": np.where(failed, np.nan, acc.max(1)),
        "best_epoch": acc.argmax(1) + 1,
        "final_test_top5": acc[:, -1] + 0.04,
        "best_test_top5": acc.max(1) + 0.04,
        "final_train_loss": loss[:, -1],
        "final_test_loss": loss[:, -1] + 0.3,
        **curves,
        "train_seconds": seconds.sum(1) * 0.93,
        "test_seconds": seconds.sum(1) * 0.07,
        "images_per_s": 50_000 / seconds.mean(1),
        "attempts": [1] * n,
        "time_limit_s": [4 * 3600] * n,
        "estimated_s": seconds.sum(1) * rng.uniform(0.8, 1.2, n),
        "estimate_source": ["records: 3 records on NVIDIA H100 80GB HBM3"] * n,
        "started_at": ended - np.timedelta64(40, "m"),
        "ended_at": ended,
        "hostname": [f"node{i % 16:02d}" for i in range(n)],
        "device_name": ["NVIDIA H100 80GB HBM3"] * n,
        "device_count": [1] * n,
        "torch_version": ["2.4.0"] * n,
        "torchvision_version": ["0.19.0"] * n,
        "lightning_version": ["2.4.0"] * n,
        "cifarbench_version": ["0.1.0"] * n,
        "cuda_version": ["12.4"] * n,
        "git_commit": [hashlib.sha1(b"bench").hexdigest()] * n,
        "slurm_job_id": [str(1000 + i // 1000) for i in range(n)],
        "slurm_array_task_id": [str(i % 1000) for i in range(n)],
        "error": np.where(failed, "RuntimeError: CUDA error: an illegal memory access was encountered", None).tolist(),
        "traceback": [None] * n,
        "milestone_unit": ["epochs"] * n,
        "iterations": [e * -(-50_000 // s.batch_size) for e, s in zip(epochs.tolist(), specs)],
        "warmup_iterations": [0] * n,
        "val_split": [0] * n,
        "train_images": [50_000] * n,
        "val_images": [0] * n,
        "test_images": [10_000] * n,
        "pack_size": [1] * n,
        "packed_with": [[]] * n,
        "alloc_gpus": [1] * n,
        "alloc_cpus": [8] * n,
        "wall_seconds": seconds.sum(1) + 40.0,
        "peak_host_mb": rng.normal(3000.0, 100.0, n),
        "peak_device_mb": rng.uniform(500.0, 8000.0, n),
        # no warm-up, verified CIFAR, no validation split, trained alone and unfused: these are null
        **dict.fromkeys(
            (
                "warmup_lr",
                "warmup_mode",
                "data_fingerprint",
                "val_loss",
                "val_acc",
                "best_val_acc",
                "best_val_epoch",
                "test_acc_at_best_val",
                "mps",
                "fuse_size",
                "fused_with",
            ),
            [None] * n,
        ),
    }
    # failed runs have no final accuracy: NaN above is null in a record
    for key in ("final_test_acc", "best_test_acc"):
        cols[key] = pa.array(cols[key], pa.float64(), mask=failed)
    return pa.table(
        {
            f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array) else cols[f.name]
            for f in SCHEMA
        },
        schema=SCHEMA,
    )


def _write_range(args) -> None:
    results, start, stop = args
    for i in range(start, stop):
        row = _table.slice(i, 1)
        path = Layout(results).record(row["run_id"][0].as_py())
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(with_summary(row), path)


def write_records(table: pa.Table, results: Path) -> None:
    global _table
    _table = table
    step = 1000
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_range, [(results, i, min(i + step, table.num_rows)) for i in range(0, table.num_rows, step)])
    for i in range(max(1, table.num_rows // 2000)):  # jobs killed mid-write on a filesystem without atomic rename
        bad = results / "runs" / f"truncated-{i}" / "record.parquet"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"PAR1" + os.urandom(3000))


_MEASURE = """
import os, sys, time
t0 = time.perf_counter()
from cifarbench.report.collect import collect
t1, c1 = time.perf_counter(), os.times()
report = collect(sys.argv[1], plots=sys.argv[2] == "plots", report=sys.argv[3] == "report")
t2, c2 = time.perf_counter(), os.times()
cpu = c2.user - c1.user + c2.system - c1.system
print(t1 - t0, t2 - t1, cpu, len(report.warnings), sum(p.suffix == ".png" for p in report.written),
      max((p.stat().st_size for p in report.written if p.suffix == ".html"), default=0))
"""


def measure(results: Path, plots: bool, page: bool) -> tuple[float, float, float, int, int, int]:
    """(import seconds, collect seconds, collect CPU seconds, warning lines, PNGs, report.html bytes), in a fresh
    process."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(results), "plots" if plots else "tables", "report" if page else "-"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), int(out[3]), int(out[4]), int(out[5])


def report(name: str, results: Path, plots: bool, page: bool = True) -> float:
    # The machine may be shared: the load average and CPU time say how much of the wall time was waiting.
    load = os.getloadavg()[0]
    imports, seconds, cpu, warnings, pngs, size = measure(results, plots, page)
    print(
        f"{name:22s} {seconds:7.2f} s wall {cpu:7.2f} s CPU  (+{imports:.2f} s imports; {warnings} warning "
        f"lines, {pngs} PNGs, report.html {size / 1e6:.1f} MB; load {load:.1f})",
        flush=True,
    )
    return seconds


def has_summaries(results: Path) -> bool:
    """Whether the records in ``results`` were written with a summary in their footer (record/1 and later)."""
    run = next(e.name for e in os.scandir(results / "runs") if not e.name.startswith("truncated-"))
    return SUMMARY_KEY in (pq.read_metadata(Layout(results).record(run)).metadata or {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="how many records")
    parser.add_argument("--keep", type=Path, help="write the records here and keep them (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="measure the records already in --keep")
    parser.add_argument("--repeat", type=int, default=1, help="measure cold this many times; print the median")
    args = parser.parse_args(argv)
    if args.reuse and args.keep is None:
        parser.error("--reuse needs --keep DIR")
    if args.reuse and not has_summaries(args.keep):
        parser.error(f"the records in {args.keep} have no summary in their footer: write them again (no --reuse)")
    results = args.keep or Path(tempfile.mkdtemp(prefix="cifarbench-bench-"))
    try:
        if not args.reuse:
            t = time.perf_counter()
            write_records(synthetic_table(args.n), results)
            print(f"wrote {args.n} records to {results} in {time.perf_counter() - t:.1f} s")
        size = sum(f.stat().st_size for f in (results / "runs").glob("*/record.parquet"))
        print(f"{results}: {size / 1e6:.0f} MB of records; {os.cpu_count()} cores", flush=True)
        cold = []
        for _ in range(args.repeat):
            (results / "runs.parquet").unlink(missing_ok=True)
            cold.append(report("cold, tables", results, plots=False, page=False))
        if args.repeat > 1:
            print(f"{'cold, median':22s} {statistics.median(cold):7.2f} s wall")
        tables = report("warm, tables", results, plots=False, page=False)
        report("warm, tables + report", results, plots=False)
        again = report("warm, report again", results, plots=False)
        print(f"{'report again / tables':22s} {again / tables:7.2f} x")
        report("warm, tables + plots", results, plots=True)
        report("warm, plots again", results, plots=True)
    finally:
        if args.keep is None:
            shutil.rmtree(results, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
