"""Chaos run on the local SLURM cluster: faults while a grid trains, then check that nothing was lost.

    python scripts/chaos.py [--workdir DIR] [--runs 24] [--faults 12] [--seconds 300] [--pack K] [--json]

A grid of short deterministic CPU runs on synthetic data is submitted (with --pack K, K runs to an array task);
meanwhile a driver repeatedly picks a random running array task and requeues it (scontrol requeue), cancels it
(scancel) or SIGKILLs its training process (in a packed task, one run's worker process), and a second submission
of the same grid is made concurrently. Afterwards failed, cancelled and lost runs are resubmitted with
--retry-failed until every run has ended. Checks: every run has exactly one readable, completed record; its final
metrics equal those of the same run trained uninterrupted (computed in a separate process with the same thread
count); `status` accounts for every run. The driver is bounded in faults and time.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir")
    p.add_argument("--runs", type=int, default=24, help="even: two batch sizes x runs/2 seeds")
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--seconds", type=float, default=600, help="overall bound")
    p.add_argument("--pack", type=int, default=1, help="runs per array task, each task with a CPU per run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.seconds
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cifarbench-chaos-"))
    root, results = work / "data", work / "results"
    data.write_synthetic("synthetic10", root, train_size=256, test_size=100)
    grid_path = work / "grid.yaml"
    grid_path.write_text(GRID.format(seeds=list(range(args.runs // 2)), root=root, results=results, pack=args.pack))
    specs = list(load_grid(grid_path, fingerprint=fingerprint).specs)

    # The uninterrupted reference, in its own process, one thread like the jobs (a CPU per run).
    ref_results = work / "reference"
    reference = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, torch; torch.set_num_threads(1)\n"
            "from cifarbench.train.fit import fit; from cifarbench.config.grid import load_grid\n"
            "import dataclasses\n"
            "from cifarbench.store.datasets import fingerprint\n"
            "for s in load_grid(sys.argv[1], fingerprint=fingerprint).specs:\n"
            "    fit(dataclasses.replace(s, results=sys.argv[2]))",
            str(grid_path),
            str(ref_results),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    first = cli("submit", str(grid_path))
    if first.returncode != 0:
        raise SystemExit(f"submit failed: {first.stderr}")
    second: list[subprocess.CompletedProcess] = []
    concurrent = threading.Thread(target=lambda: second.append(cli("submit", str(grid_path))))
    concurrent.start()

    def arrays() -> set[str]:
        return {e["array_job_id"] for e in read_manifests(results).values()}

    rng = random.Random(0)
    kinds = ["requeue", "cancel", "kill"]
    injected = {k: 0 for k in kinds}
    attempted = 0
    while sum(injected.values()) < args.faults and time.monotonic() < deadline - 240 and attempted < 10 * args.faults:
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
        kind = kinds[sum(injected.values()) % len(kinds)]
        if inject(rng.choice(pool), kind):
            injected[kind] += 1
    concurrent.join()

    rounds = 0
    while time.monotonic() < deadline:
        current = status.collect_status(str(results), specs)
        states = {s.status for s in current}
        if states <= {"completed"}:
            break
        if states & {"pending", "running"}:
            time.sleep(3)
            continue
        rounds += 1
        cli("submit", str(grid_path), "--retry-failed")
    reference.wait(timeout=max(deadline - time.monotonic(), 1))

    final = status.collect_status(str(results), specs)
    record_files = sorted(results.glob("runs/*/record.parquet"))
    readable = [records.read_record(p) for p in record_files]
    completed = {r["run_id"] for r in readable if r and r["status"] == "completed"}
    mismatched = []
    for spec in specs:
        ours = records.read_record(Layout(results).record(spec.run_id))
        ref = records.read_record(Layout(ref_results).record(spec.run_id))
        if not (ours and ref and all(ours[k] == ref[k] for k in METRICS)):
            mismatched.append(spec.run_id)
    report = {
        "runs": len(specs),
        "faults_injected": injected,
        "concurrent_submission_exit": second[0].returncode if second else None,
        "concurrent_submission_said": (second[0].stdout.splitlines() or [""])[0] if second else None,
        "retry_rounds": rounds,
        "records": len(record_files),
        "records_unreadable": sum(r is None for r in readable),
        "records_lost": len([s for s in specs if s.run_id not in completed]),
        "duplicates": len(record_files) - len({p.parent.name for p in record_files}),
        "metrics_mismatched": mismatched,
        "status_counts": status.summary(final),
        "runs_resumed_from_checkpoint": sum(1 for r in readable if r and r["attempts"] >= 2),
        "max_attempts": max((r["attempts"] for r in readable if r), default=0),
        "reference_exit": reference.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "workdir": str(work),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>28}: {value}")
    ok = (
        report["records_lost"] == 0
        and not mismatched
        and report["records_unreadable"] == 0
        and report["status_counts"] == {"completed": len(specs)}
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
