"""How close ``time: auto`` comes to the measured task times once a grid has records.

    .venv/bin/python scripts/bench_plan.py [--train-size 1000] [--test-size 500] [--epochs 3] [--repeat 1]

Writes a small synthetic CIFAR-10 (``cifarbench data synthetic``) and a CPU grid with ``time: auto`` and every kind
of array task: resnet20 and resnet32 alone, the two packed side by side (``pack: 2``), and two seeds of resnet20
fused into one group (``fuse: seeds``). Runs it to the end with ``cifarbench submit --executor local --wait`` (the
tasks one after another in one local job, as on a CPU-only machine), then plans the same grid again with the
finished grid's records as evidence (``estimate.read_evidence``, ``plan.make_tasks``) and sets each task's estimate
and time limit beside the task's measured time: the longest ``wall_seconds`` of its runs, a task being a run with
the runs of its ``packed_with`` or ``fused_with``. The plan made before the grid ran (no records: the prior) is
compared the same way, to show what the records gain.

Two limits are shown: the one ``time: auto`` asks for (estimate x time_margin, rounded up to 5 minutes, at least
10 minutes) and the raw estimate x time_margin. Below 400 s estimated the 10-minute floor is the whole limit,
so only the raw one says how good the estimate is. The estimate is then split into start-up (what the records
measured, else the ``START_S`` allowance) and epochs, each beside what the task measured: the rest of its wall time
(process start, imports, data, model, record) and its epochs' training and test seconds.

``--repeat N`` runs N fresh grids (each in a results folder of its own, the same run ids), compares each with the
plan made from its own records and, from the second on, with the plan made from the previous grid's records (out
of sample), and prints the medians over all. Timings are what this machine did while it ran: the load average is
printed at the start and end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cifarbench.cluster import estimate, plan
from cifarbench.config.grid import Grid, load_grid
from cifarbench.store.datasets import fingerprint, image_counts
from cifarbench.store.layout import Layout
from cifarbench.store.records import read_record

CLI = Path(sys.executable).with_name("cifarbench")
COLUMNS = """
columns: est x m = estimate x time_margin (the raw limit); limit = what time: auto asks for (rounded up to 5 min,
  at least 10 min); est: start / epochs = the estimate's start-up (the records', else START_S) and its epochs;
  meas: rest / epochs = the task's measured wall time less its training and test seconds, and those seconds.
  On tasks this short the 10-minute floor sets every limit: the raw ratio is the one that says how good the
  estimate is."""
GOAL = 1.5  # a re-planned limit should be at most this many times the measured task time (and at least it)


def grid_text(data: Path, results: Path, epochs: int) -> str:
    """Two runs alone, a pack of two, a fused group of two seeds: one resource set for the runs alone and the fused
    group (which is a task of its own), another for the pack (``pack: 2`` in its include entries)."""
    return f"""models: [resnet20, resnet32]
datasets: [synthetic10]
opts: [step-160]
epochs: {epochs}
batch_sizes: [64]
seeds: [0]
root: {data}
results: {results}
slurm: {{gpus_per_node: 0, cpus_per_task: 2, time: auto}}
include:
  - {{model: resnet20, seed: 1, pack: 2}}
  - {{model: resnet32, seed: 1, pack: 2}}
  - {{model: resnet20, seed: 2, fuse: seeds}}
  - {{model: resnet20, seed: 3, fuse: seeds}}
"""


@dataclass(frozen=True, kw_only=True)
class Measured:
    """One task of a finished grid, from its runs' records."""

    wall: float  # the longest wall_seconds of its runs: the task's time
    work: float  # that run's training and test seconds (a fused member's: the group's)

    @property
    def rest(self) -> float:
        """Start-up and everything else around the epochs: process start, imports, data, model, record."""
        return self.wall - self.work


@dataclass(frozen=True, kw_only=True)
class Row:
    task: str
    source: str
    estimated: float
    measured: Measured
    start: float  # the estimate's start-up: the rest is its epochs
    raw_limit: float  # estimate x time_margin
    limit: int  # as time: auto asks: rounded up to 5 minutes, at least 10

    @property
    def ratio(self) -> float:
        return self.measured.wall / self.estimated


def measured_tasks(results: Path) -> dict[frozenset[str], Measured]:
    """The finished tasks under ``results``, each keyed by its runs' ids."""
    records = [read_record(p) for p in sorted(Layout(results).runs.glob("*/record.parquet"))]
    tasks: dict[frozenset[str], list[dict]] = {}
    for r in records:
        if r is None or r["status"] != "completed":
            continue
        key = frozenset([r["run_id"], *(r.get("packed_with") or ()), *(r.get("fused_with") or ())])
        tasks.setdefault(key, []).append(r)
    out = {}
    for key, runs in tasks.items():
        longest = max(runs, key=lambda r: r["wall_seconds"])
        out[key] = Measured(wall=longest["wall_seconds"], work=longest["train_seconds"] + longest["test_seconds"])
    return out


def describe(task: plan.Task) -> str:
    models = sorted({s.model for s in task.specs})
    if task.fused:
        return f"{models[0]} fuse {len(task.specs)} seeds"
    if len(task.specs) > 1:
        return f"{'+'.join(models)} pack {len(task.specs)}"
    return f"{models[0]} alone"


def start_up(task: plan.Task, evidence: estimate.Evidence, data: dict) -> float:
    """The start-up within ``task``'s estimate, whatever it came from: start + E x per epoch, estimated again at
    2E epochs, gives start = 2 x est(E) - est(2E)."""
    longer = [dataclasses.replace(s, epochs=2 * s.schedule.epochs) for s in task.specs]
    twice = estimate.estimate_task(longer, task.resources, evidence, fused=task.fused, data=data).seconds
    return 2 * task.estimate.seconds - twice


def compare(
    tasks: list[plan.Task], evidence: estimate.Evidence, measured: dict[frozenset[str], Measured], data: dict
) -> list[Row]:
    rows = []
    for t in tasks:
        key = frozenset(s.run_id for s in t.specs)
        if key not in measured:
            print(f"  no finished task holds exactly {describe(t)} ({', '.join(sorted(key))}); left out")
            continue
        est = t.estimate.seconds
        rows.append(
            Row(
                task=describe(t),
                source=t.estimate.source,
                estimated=est,
                measured=measured[key],
                start=start_up(t, evidence, data),
                raw_limit=est * t.resources.time_margin,
                limit=t.resources.seconds,
            )
        )
    return rows


def planned(grid: Grid, evidence: estimate.Evidence, measured: dict[frozenset[str], Measured], title: str) -> list[Row]:
    """Plan ``grid`` from ``evidence``, print each task beside its measured time, and return the rows."""
    data = {key: image_counts(*key) for key in {(s.dataset, s.data_root) for s in grid.specs}}
    tasks = plan.make_tasks(grid.specs, grid.resources, grid.fuse, evidence, data=data)
    rows = compare(tasks, evidence, measured, data)
    print_rows(title, rows)
    return rows


def print_rows(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(
        f"  {'task':<27} {'source':<8} {'est s':>7} {'meas s':>7} {'meas/est':>8} {'est x m':>8} {'limit':>6} "
        f"{'raw/meas':>8} {'limit/meas':>10}   {'est: start':>10} {'epochs':>7}   {'meas: rest':>10} {'epochs':>7}"
    )
    for r in rows:
        m = r.measured
        print(
            f"  {r.task:<27} {r.source:<8} {r.estimated:>7.1f} {m.wall:>7.1f} {r.ratio:>8.2f} {r.raw_limit:>8.1f} "
            f"{r.limit:>6} {r.raw_limit / m.wall:>8.2f} {r.limit / m.wall:>10.2f}   {r.start:>10.1f} "
            f"{r.estimated - r.start:>7.1f}   {m.rest:>10.1f} {m.work:>7.1f}"
        )


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}, range {min(values):.2f}-{max(values):.2f}"


def summarise(title: str, rows: list[Row]) -> None:
    if not rows:
        print(f"\n{title}: no tasks to compare")
        return
    raw = [r.raw_limit / r.measured.wall for r in rows]
    floored = [r.limit / r.measured.wall for r in rows]
    epochs = [r.measured.work / (r.estimated - r.start) for r in rows]

    def within(ratios: list[float]) -> str:
        inside = sum(1 - 1e-9 <= x <= GOAL + 1e-9 for x in ratios)  # an exact 1.5 is within
        return f"{'yes' if inside == len(ratios) else 'no'} ({inside} of {len(ratios)} tasks)"

    print(f"\n{title} ({len(rows)} tasks)")
    print(f"  measured / estimated:                       {spread([r.ratio for r in rows])}")
    print(f"  measured epochs / estimated epochs:         {spread(epochs)}")
    print(f"  estimated start-up, s:                      {spread([r.start for r in rows])}")
    print(f"  measured rest of the task, s:               {spread([r.measured.rest for r in rows])}")
    print(f"  (estimate x time_margin) / measured:        {spread(raw)}")
    print(f"  limit / measured (5-min rounding, 10-min floor): {spread(floored)}")
    print(f"  every limit within 1-{GOAL:g}x of the measured task time: {within(floored)}")
    print(f"  every raw estimate x time_margin within 1-{GOAL:g}x:        {within(raw)}")


def run_grid(grid: Path) -> float:
    """``submit --executor local --wait``: the grid to its end; wall seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        [str(CLI), "submit", str(grid), "--executor", "local", "--wait"], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"submit --wait failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="finished grids to compare (each run afresh)")
    args = parser.parse_args()
    import torch  # only for its thread count: the runs train in processes of their own

    print(
        f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} "
        f"usable), torch {torch.__version__} with {torch.get_num_threads()} threads; load average at start "
        + "/".join(f"{x:.2f}" for x in os.getloadavg())
        + " (1/5/15 min)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="cifarbench-bench-plan-"))
    try:
        data = tmp / "data"
        subprocess.run(
            [str(CLI), "data", "synthetic", "--root", str(data), "--dataset", "synthetic10",
             "--train-size", str(args.train_size), "--test-size", str(args.test_size)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        print(
            f"data: synthetic10, {args.train_size} training and {args.test_size} test images; {args.epochs} epochs "
            "per run, batch size 64, CPU tasks of 2 cores, time: auto (time_margin 1.5)"
        )
        before_rows, own_rows, previous_rows = [], [], []
        previous: Path | None = None
        for i in range(args.repeat):
            results = tmp / f"results{i}"
            grid = tmp / f"grid{i}.yaml"
            grid.write_text(grid_text(data, results, args.epochs))
            g = load_grid(grid, fingerprint=fingerprint)
            prior = estimate.read_evidence(results)  # an empty folder: no records
            seconds = run_grid(grid)
            measured = measured_tasks(results)
            print(
                f"\ngrid {i + 1} of {args.repeat}: {len(g.specs)} runs in {len(measured)} tasks, finished in "
                f"{seconds:.1f} s (submit --wait); the tasks' measured times add up to "
                f"{sum(m.wall for m in measured.values()):.1f} s; load average "
                + "/".join(f"{x:.2f}" for x in os.getloadavg())
            )
            before_rows += planned(g, prior, measured, "planned before the grid ran (no records)")
            own = estimate.read_evidence(results)
            own_rows += planned(g, own, measured, "re-planned from this grid's own records")
            if previous is not None:
                earlier = estimate.read_evidence(previous)
                previous_rows += planned(
                    g, earlier, measured, "planned from the previous grid's records (out of sample)"
                )
            previous = results
        print(COLUMNS)
        summarise("before the grid ran (prior)", before_rows)
        summarise("re-planned from the finished grid's records", own_rows)
        if not previous_rows:
            print(
                "  (the same records the estimates came from: where a configuration has one record, the estimate is "
                "that record's time;\n  --repeat 2 or more also plans each grid from the previous one's records)"
            )
        if previous_rows:
            summarise("planned from the previous grid's records (out of sample)", previous_rows)
        print("\nload average at end " + "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)")
    finally:
        if os.environ.get("KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
