"""How long ``cifarbench collect`` takes on N records, read for the first time and again.

    python scripts/bench_collect.py 10000 [--keep DIR [--reuse]] [--repeat 3] [--earlier]

Writes N synthetic records (8 models x 2 datasets x 3 recipes x 3 batch sizes, as many seeds as it takes, 200
epochs of curves, 2% failed runs, and a few truncated files), each with its summary file as ``write_record``
writes it, into a temporary folder, then runs collect in a fresh process each time and prints how long the call
took, the median of ``--repeat`` calls, with the load average before each:

- first read: no runs.parquet (a folder just copied, a fresh --out, a grid just finished), collect --no-plots
  --no-report (the tables, with their 95% intervals as by default), collect --no-plots (the tables and
  report.html), collect (the default: tables, plots, report.html), the tables with --no-ci and the tables with
  --compare recipe=cos-200,step-200. The records are in the page cache: just written, or read by the previous
  call;
- again: runs.parquet from the previous collect, nothing changed, the same; the ratios of the report to the tables
  alone and of the tables with intervals and a comparison to those with neither follow.

``--earlier`` writes the records without summary files, as a cifarbench before them did: every record is then
read from its Parquet footer and, for the curves and report.html, its columns (the slow path).

Records are written with pyarrow as ``write_record`` writes them (record schema, summary in the footer, summary
file beside it, through ``records.summary_file``), without its per-file fsync and rename, from a pool of
processes: the benchmark measures collect, not writing.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import resource
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
from cifarbench.store.records import RECORD_VERSION, SCHEMA, SUMMARY_KEY, summary_file, with_summary

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
    failed = rng.random(n) < 0.02
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
        "python": ["/opt/envs/bench/bin/python"] * n,
        "world_size": [1] * n,
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
        # no warm-up, verified CIFAR, no validation split, trained alone and unfused, no container, one process: these
        # are null
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
                "container",
                "sync_bn",
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
    results, start, stop, summary_files = args
    for i in range(start, stop):
        record = with_summary(_table.slice(i, 1))
        run_id = record["run_id"][0].as_py()
        path = Layout(results).record(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(record, path)
        if summary_files:
            Layout(results).record_summary(run_id).write_bytes(summary_file(record, path))


def write_records(table: pa.Table, results: Path, *, summary_files: bool = True) -> None:
    """The records of ``table``, each with its summary file as ``write_record`` writes it, or (``summary_files``
    False) without, as an earlier cifarbench wrote them."""
    global _table
    _table = table
    step = 1000
    chunks = [(results, i, min(i + step, table.num_rows), summary_files) for i in range(0, table.num_rows, step)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_range, chunks)
    for i in range(max(1, table.num_rows // 2000)):  # jobs killed mid-write on a filesystem without atomic rename
        bad = results / "runs" / f"truncated-{i}" / "record.parquet"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"PAR1" + os.urandom(3000))


_MEASURE = """
import json, os, sys, time
t0 = time.perf_counter()
from cifarbench.report.collect import collect
t1, c1 = time.perf_counter(), os.times()
report = collect(sys.argv[1], **json.loads(sys.argv[2]))
t2, c2 = time.perf_counter(), os.times()
cpu = c2.user - c1.user + c2.system - c1.system
print(t1 - t0, t2 - t1, cpu, len(report.warnings), sum(p.suffix == ".png" for p in report.written),
      max((p.stat().st_size for p in report.written if p.suffix == ".html"), default=0))
"""


def measure(results: Path, options: dict) -> tuple[float, float, int, int, int]:
    """(wall seconds, CPU seconds, warning lines, PNGs, report.html bytes) of a collect in a fresh process, the
    start of the interpreter and the imports included: what a user waits for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(results), json.dumps(options)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, int(out[3]), int(out[4]), int(out[5])


TABLES = {"plots": False, "report": False}
VARIANTS = {  # name -> collect's options
    "tables": TABLES,  # with 95% intervals, as by default
    "tables + report": {"plots": False, "report": True},
    "default": {},
    "tables --no-ci": {**TABLES, "ci": None},
    "tables --compare": {**TABLES, "compare": "recipe=cos-200,step-200"},
}


def report(name: str, results: Path, *, cold: bool, repeat: int) -> float:
    """The median of ``repeat`` collects (``cold``: each without runs.parquet); prints it, the load average before
    each (the machine may be shared: CPU time hardly moves with it, wall time does) and the spread."""
    walls, cpus, loads = [], [], []
    for _ in range(repeat):
        if cold:
            Layout(results).runs_table.unlink(missing_ok=True)
        loads.append(os.getloadavg()[0])
        seconds, cpu, warnings, pngs, size = measure(results, VARIANTS[name])
        walls.append(seconds)
        cpus.append(cpu)
    print(
        f"{'first read' if cold else 'again':10s} {name:16s} {statistics.median(walls):7.2f} s wall "
        f"{statistics.median(cpus):6.2f} s CPU  (of {', '.join(f'{w:.2f}' for w in walls)}; load "
        f"{', '.join(f'{x:.1f}' for x in loads)}; {warnings} warning lines, {pngs} PNGs, report.html "
        f"{size / 1e6:.1f} MB)",
        flush=True,
    )
    return statistics.median(walls)


def machine() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return f"{os.cpu_count()} cores ({cpu}), load average {os.getloadavg()[0]:.2f} (1 min)"


def has_summaries(results: Path) -> bool:
    """Whether the records in ``results`` were written with a summary in their footer (record/1 and later)."""
    run = next(e.name for e in os.scandir(results / "runs") if not e.name.startswith("truncated-"))
    return SUMMARY_KEY in (pq.read_metadata(Layout(results).record(run)).metadata or {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="how many records")
    parser.add_argument("--keep", type=Path, help="write the records here and keep them (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="measure the records already in --keep")
    parser.add_argument("--repeat", type=int, default=3, help="measure each this many times; print the median")
    parser.add_argument("--earlier", action="store_true", help="write the records without summary files")
    parser.add_argument(
        "--only", choices=list(VARIANTS), action="append", help="measure only these (repeatable; default: all)"
    )
    args = parser.parse_args(argv)
    if args.reuse and args.keep is None:
        parser.error("--reuse needs --keep DIR")
    if args.reuse and not has_summaries(args.keep):
        parser.error(f"the records in {args.keep} have no summary in their footer: write them again (no --reuse)")
    results = args.keep or Path(tempfile.mkdtemp(prefix="cifarbench-bench-"))
    try:
        if not args.reuse:
            t = time.perf_counter()
            write_records(synthetic_table(args.n), results, summary_files=not args.earlier)
            print(f"wrote {args.n} records to {results} in {time.perf_counter() - t:.1f} s")
        files = list((results / "runs").glob("*/record.*"))
        size = sum(f.stat().st_size for f in files)
        with_summary_files = sum(f.suffix == ".json" for f in files)
        print(f"{results}: {size / 1e6:.0f} MB of records, {with_summary_files} summary files", flush=True)
        print(f"machine: {machine()}; median of {args.repeat} fresh processes", flush=True)
        variants = args.only or list(VARIANTS)
        for name in variants:
            report(name, results, cold=True, repeat=args.repeat)
        again = {name: report(name, results, cold=False, repeat=args.repeat) for name in variants}
        if {"tables", "tables + report"} <= again.keys():
            print(f"{'again: report / tables':27s} {again['tables + report'] / again['tables']:7.2f} x")
        if {"tables --no-ci", "tables --compare"} <= again.keys():
            ratio = again["tables --compare"] / again["tables --no-ci"]
            print(f"{'again: intervals and a comparison / neither':27s} {ratio:7.2f} x")
    finally:
        if args.keep is None:
            shutil.rmtree(results, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
