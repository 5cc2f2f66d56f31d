"""Chaos run on the local SLURM cluster: faults while a grid trains, then check that nothing was lost.

    python scripts/chaos.py [--workdir DIR] [--runs 24] [--faults 12] [--seconds S | --max-seconds 3600] [--pack K]
                            [--json]

A grid of short deterministic CPU runs on synthetic data is submitted (with --pack K, K runs to an array task);
meanwhile a driver repeatedly picks a random running array task and requeues it (scontrol requeue), cancels it
(scancel) or SIGKILLs its training process (in a packed task, one run's worker process), and a second submission
of the same grid is made concurrently. Afterwards failed, cancelled and lost runs are resubmitted with
--retry-failed until every run has ended. Checks: every run has exactly one readable, completed record; its final
metrics equal those of the same run trained uninterrupted (computed in a separate process with the same thread
count); `status` accounts for every run. The driver is bounded in faults and time: --seconds, or by default a bound
scaled from one epoch of the grid's first run timed alone first (a calibration), at most --max-seconds. The report
comes however the run ends: when the bound passes, with `deadline_passed` and the runs still missing (the grid's
jobs left are then cancelled); after a crash, with `error`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from cifarbench.cluster import status
from cifarbench.config.grid import load_grid
from cifarbench.store import records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.store.manifests import read_manifests
from cifarbench.store.progress import read_progress
from cifarbench.train import data

GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
epochs: 6
batch_sizes: [64, 128]
seeds: {seeds}
precision: 32-true
deterministic: true
root: {root}
results: {results}
pack: {pack}
slurm:
  gpus_per_node: 0
  cpus_per_task: {pack}
  time: "00:10:00"
  array_parallelism: 2
  max_requeues: 5
"""
METRICS = ("final_test_acc", "final_test_loss", "final_train_loss", "test_acc", "train_loss")
KINDS = ("requeue", "cancel", "kill")
# Trains a grid's runs one after the other in a fresh process on one thread, as a job does (a CPU per run):
# argv: grid file, results folder, and "calibrate" to train only the first run's first epoch.
FIT = """\
import dataclasses, sys, torch
torch.set_num_threads(1)
from cifarbench.config.grid import load_grid
from cifarbench.store.datasets import fingerprint
from cifarbench.train.fit import fit
specs = load_grid(sys.argv[1], fingerprint=fingerprint).specs
if sys.argv[3:] == ["calibrate"]:
    specs = [dataclasses.replace(specs[0], epochs=1)]
for s in specs:
    fit(dataclasses.replace(s, results=sys.argv[2]))
"""
# The calibrated bound. On a quiet 2-core machine the reference, sharing it with two jobs and their start-ups,
# trained 24 x 6 epochs in 700-840 s where one epoch alone takes about 1.2 s: 4-5x; SLOWDOWN leaves twice that.
FIXED_SECONDS = 600
SLOWDOWN = 10


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifarbench", *args], capture_output=True, text=True)


def running_tasks(array_ids: set[str]) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
    return [j for j in out.stdout.split() if j.split("_")[0] in array_ids]


def training_pid(task: str) -> int | None:
    """The python process that trains a run of an array task ("12_3"), found by its SLURM environment: a packed
    task's first run's worker, else the job process itself."""
    job, _, index = task.partition("_")
    found: dict[bytes, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            kind = next((k for k in (b"cifarbench.train.pack", b"submitit.core._submit") if k in cmdline), None)
            if kind is None:
                continue
            env = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURM_ARRAY_JOB_ID") == job.encode() and env.get(b"SLURM_ARRAY_TASK_ID") == index.encode():
            found.setdefault(kind, int(proc.name))
    return found.get(b"cifarbench.train.pack", found.get(b"submitit.core._submit"))


def inject(task: str, kind: str) -> bool:
    if kind == "requeue":
        return subprocess.run(["scontrol", "requeue", task], capture_output=True).returncode == 0
    if kind == "cancel":
        return subprocess.run(["scancel", task], capture_output=True).returncode == 0
    pid = training_pid(task)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL)
    return True


@dataclass
class Seen:
    """What the driver did and measured so far: the report is made of it and of the folders, however the run ends."""

    injected: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    second: list[subprocess.CompletedProcess] = field(default_factory=list)
    rounds: int = 0
    reference: subprocess.Popen | None = None
    epoch_seconds: float | None = None  # the calibration: one epoch of the grid's first run, alone, on one thread
    bound: float = 0.0
    deadline_passed: bool = False
    error: str | None = None


def calibrate(grid_path: Path, work: Path, timeout: float) -> float | None:
    """Seconds of one training epoch of the grid's first run in a fresh process on one thread, as a job trains it
    (None when it failed or took longer than ``timeout``; its output is in calibration.log)."""
    with open(work / "calibration.log", "w") as log:
        try:
            subprocess.run(
                [sys.executable, "-c", FIT, str(grid_path), str(work / "calibration"), "calibrate"],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None
    found = [records.read_record(p) for p in (work / "calibration").glob("runs/*/record.parquet")]
    return found[0]["epoch_seconds"][0] if found and found[0] and found[0]["epoch_seconds"] else None


def bound(epochs: int, epoch_seconds: float | None, most: float) -> float:
    """The whole chaos run's seconds from the calibration: a fixed part for what does not scale with training (job
    start-ups, SLURM's scheduling, the driver's pauses, retry rounds) and SLOWDOWN times the reference's ``epochs``
    at the calibrated speed; ``most`` at most, and where the calibration failed."""
    if epoch_seconds is None:
        return most
    return min(most, FIXED_SECONDS + SLOWDOWN * epochs * epoch_seconds)


def drive(args, work: Path, grid_path: Path, specs: list, start: float, seen: Seen) -> None:
    """Train the grid under faults and resubmit what failed until every run has ended or the deadline passes."""
    results = work / "results"
    if args.seconds is None:
        seen.epoch_seconds = calibrate(grid_path, work, args.max_seconds)
        epochs = sum(s.schedule.epochs for s in specs)
        seen.bound = bound(epochs, seen.epoch_seconds, args.max_seconds)
        measured = "failed" if seen.epoch_seconds is None else f"{seen.epoch_seconds:.2f} s"
        print(
            f"chaos: calibration: one epoch alone {measured} ({time.monotonic() - start:.0f} s with start-up); bound "
            f"{seen.bound:.0f} s ({FIXED_SECONDS} + {SLOWDOWN} x {epochs} epochs, at most {args.max_seconds:.0f})",
            file=sys.stderr,
        )
    else:
        seen.bound = args.seconds
    deadline = start + seen.bound
    if time.monotonic() >= deadline:
        seen.deadline_passed = True
        return

    # The uninterrupted reference, in its own process, one thread like the jobs (a CPU per run); its output goes
    # to a file, which no pipe left unread can block.
    with open(work / "reference.log", "w") as log:
        seen.reference = reference = subprocess.Popen(
            [sys.executable, "-c", FIT, str(grid_path), str(work / "reference")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    first = cli("submit", str(grid_path))
    if first.returncode != 0:
        raise RuntimeError(f"submit failed: {first.stderr.strip()}")
    concurrent = threading.Thread(target=lambda: seen.second.append(cli("submit", str(grid_path))))
    concurrent.start()

    def arrays() -> set[str]:
        return {e["array_job_id"] for e in read_manifests(results).values()}

    rng = random.Random(0)
    attempted = 0
    while (
        sum(seen.injected.values()) < args.faults and time.monotonic() < deadline - 240 and attempted < 10 * args.faults
    ):
        time.sleep(rng.uniform(4, 8))
        attempted += 1
        tasks = running_tasks(arrays())
        if not tasks:
            if all(s.status not in ("pending", "running") for s in status.collect_status(str(results), specs)):
                break
            continue
        # Mostly hit runs that have a checkpoint (so they must resume), sometimes ones still starting up.
        entries = {e["job_id"]: e["run_id"] for e in read_manifests(results).values()}
        resumable = [
            t for t in tasks if t in entries and (read_progress(results, entries[t]) or {}).get("epochs_done", 0) >= 1
        ]
        pool = resumable if resumable and rng.random() < 0.75 else tasks
        kind = KINDS[sum(seen.injected.values()) % len(KINDS)]
        if inject(rng.choice(pool), kind):
            seen.injected[kind] += 1
    concurrent.join()

    while True:
        states = {s.status for s in status.collect_status(str(results), specs)}
        if states <= {"completed"}:
            break
        if time.monotonic() >= deadline:
            seen.deadline_passed = True
            break
        if states & {"pending", "running"}:
            time.sleep(3)
            continue
        seen.rounds += 1
        cli("submit", str(grid_path), "--retry-failed")
    try:
        reference.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        seen.deadline_passed = True


def make_report(work: Path, specs: list, start: float, seen: Seen) -> dict:
    """What the folders hold now, beside what the driver did: complete or not."""
    results, ref_results = work / "results", work / "reference"
    final = status.collect_status(str(results), specs)
    record_files = sorted(results.glob("runs/*/record.parquet"))
    readable = [records.read_record(p) for p in record_files]
    completed = {r["run_id"] for r in readable if r and r["status"] == "completed"}
    references = [records.read_record(Layout(ref_results).record(s.run_id)) for s in specs]
    mismatched = []
    for spec, ref in zip(specs, references):
        ours = records.read_record(Layout(results).record(spec.run_id))
        if not (ours and ref and all(ours[k] == ref[k] for k in METRICS)):
            mismatched.append(spec.run_id)
    second = seen.second[0] if seen.second else None
    return {
        "runs": len(specs),
        "deadline_passed": seen.deadline_passed,
        "error": seen.error,
        "runs_completed": len(completed),
        "runs_missing": [s.run_id for s in specs if s.run_id not in completed],
        "reference_completed": sum(1 for r in references if r and r["status"] == "completed"),
        "faults_injected": seen.injected,
        "concurrent_submission_exit": second.returncode if second else None,
        "concurrent_submission_said": (second.stdout.splitlines() or [""])[0] if second else None,
        "retry_rounds": seen.rounds,
        "records": len(record_files),
        "records_unreadable": sum(r is None for r in readable),
        "records_lost": len([s for s in specs if s.run_id not in completed]),
        "duplicates": len(record_files) - len({p.parent.name for p in record_files}),
        "metrics_mismatched": mismatched,
        "status_counts": status.summary(final),
        "runs_resumed_from_checkpoint": sum(1 for r in readable if r and r["attempts"] >= 2),
        "max_attempts": max((r["attempts"] for r in readable if r), default=0),
        "reference_exit": seen.reference.poll() if seen.reference else None,
        "calibration_epoch_seconds": None if seen.epoch_seconds is None else round(seen.epoch_seconds, 3),
        "seconds_bound": round(seen.bound, 1),
        "seconds": round(time.monotonic() - start, 1),
        "workdir": str(work),
    }


def stop(results: Path, seen: Seen) -> None:
    """End what this run started and would outlive it: the reference, and the grid's jobs where it did not finish
    (they would keep the cluster busy for whoever uses it next)."""
    if seen.reference is not None and seen.reference.poll() is None:
        seen.reference.kill()
        seen.reference.wait()
    if seen.deadline_passed or seen.error:
        arrays = sorted({e["array_job_id"] for e in read_manifests(results).values()})
        if arrays:
            subprocess.run(["scancel", *arrays], capture_output=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir")
    p.add_argument("--runs", type=int, default=24, help="even: two batch sizes x runs/2 seeds")
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--seconds", type=float, help="overall bound (default: from a one-epoch calibration)")
    p.add_argument("--max-seconds", type=float, default=3600, help="the most the calibrated bound may be")
    p.add_argument("--pack", type=int, default=1, help="runs per array task, each task with a CPU per run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    start = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cifarbench-chaos-"))
    root, results = work / "data", work / "results"
    data.write_synthetic("synthetic10", root, train_size=256, test_size=100)
    grid_path = work / "grid.yaml"
    grid_path.write_text(GRID.format(seeds=list(range(args.runs // 2)), root=root, results=results, pack=args.pack))
    specs = list(load_grid(grid_path, fingerprint=fingerprint).specs)

    seen = Seen()
    try:
        drive(args, work, grid_path, specs, start, seen)
    except Exception as e:  # the report of what was found still comes; the traceback goes to stderr
        traceback.print_exc()
        seen.error = f"{type(e).__name__}: {e}"
    report = make_report(work, specs, start, seen)
    stop(results, seen)
    if seen.deadline_passed:
        print(f"chaos: the {seen.bound:.0f} s bound passed; runs missing: {report['runs_missing']}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>28}: {value}")
    ok = (
        not seen.deadline_passed
        and seen.error is None
        and report["records_lost"] == 0
        and not report["metrics_mismatched"]
        and report["records_unreadable"] == 0
        and report["status_counts"] == {"completed": len(specs)}
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
