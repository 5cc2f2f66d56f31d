"""How long the commands a researcher types all day take on a big grid: status, submit --dry-run, submit.

    python scripts/bench_control.py [--runs 5040] [--records N] [--repeat 3] [--earlier] [--submit]

Builds a grid of ``--runs`` runs (8 models x 2 datasets x 3 recipes x 3 batch sizes x as many seeds as it takes)
and a results folder in which ``--records`` of them (default: three quarters) have a record, with its summary
file (``--earlier``: without, as a cifarbench before them wrote records), and all of them a SLURM manifest entry
(array jobs that SLURM no longer knows: one sacct call answers for all). Each command runs in a fresh process,
``--repeat`` times, status on a first read of the folder (no runs.parquet) each time; the median wall and CPU
times are printed beside two baselines measured in the same run: a bare interpreter start and the import of the
training stack (torch + lightning), which the control plane no longer pays for.

``--submit`` (needs the local cluster: ``bash slurm/cluster.sh up``) also submits the whole grid to SLURM for
real, held (``--hold``, released never: the arrays are cancelled right after), into an empty results folder,
and breaks the submission's wall time down: start-up (imports), expanding the grid, planning (status of every
run), submitit writing one pickle per run and moving it into place, the sbatch calls, and the rest (cifarbench's
own work: manifest, executor set-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from bench_collect import BATCH_SIZES, DATASETS, MODELS, machine, synthetic_table, write_records

RECIPES = ["step-160", "step-200", "cos-200"]


# three resource groups: the default, the deep CIFAR ResNet, and the ImageNet-style ones
RULES = """resources:
  - match: {model: resnet110}
    time: "04:00:00"
  - match: {model: [resnet18, resnet34, resnet50]}
    mem_gb: 2
"""


def grid_text(runs: int, results: Path, data: Path, *, hold: bool = False) -> str:
    configs = len(MODELS) * len(DATASETS) * len(RECIPES) * len(BATCH_SIZES)
    seeds = math.ceil(runs / configs)
    extra = ", extra: {hold: true}" if hold else ""
    return (
        f"models: [{', '.join(MODELS)}]\ndatasets: [{', '.join(DATASETS)}]\nopts: [{', '.join(RECIPES)}]\n"
        f"batch_sizes: [{', '.join(map(str, BATCH_SIZES))}]\nseeds: [{', '.join(map(str, range(seeds)))}]\n"
        f"results: {results}\nroot: {data}\nverify: false\n"
        f'slurm: {{gpus_per_node: 1, cpus_per_task: 1, mem_gb: 1, time: "01:00:00"{extra}}}\n{RULES}'
    )


def write_data(root: Path) -> None:
    """Tiny stand-ins of CIFAR-10 and CIFAR-100 in their real layout (the grid reads them with verify: false),
    so that the preflight's data check finds them."""
    from cifarbench.train import data

    for name, real in (("synthetic10", "cifar-10-batches-py"), ("synthetic100", "cifar-100-python")):
        folder = data.write_synthetic(name, root, train_size=50, test_size=10)
        (root / real).symlink_to(folder)


def fill_results(grid: Path, results: Path, with_records: int, *, summary_files: bool = True) -> int:
    """Records for the first ``with_records`` runs, a manifest entry (a long-gone SLURM array) for every run."""
    from cifarbench.config.grid import load_grid
    from cifarbench.store.datasets import fingerprint
    from cifarbench.store.layout import Layout

    specs = load_grid(grid, fingerprint=fingerprint).specs
    table = synthetic_table(with_records)  # the same runs, in another order
    # made without data, the records get the ids that the grid's data (a fingerprinted copy) gives its runs
    renamed = {dataclasses.replace(s, data_fingerprint=None).run_id: s.run_id for s in specs}
    ids = pa.array([renamed[i] for i in table.column("run_id").to_pylist()])
    table = table.set_column(table.schema.get_field_index("run_id"), "run_id", ids)
    write_records(table, results, summary_files=summary_files)
    entries = [
        {
            "run_id": s.run_id,
            "job_id": f"{990000 + i // 1000}_{i % 1000}",
            "array_job_id": str(990000 + i // 1000),
            "array_index": i % 1000,
            "stdout": "/dev/null",
            "stderr": "/dev/null",
            "spec": s.to_dict(),
        }
        for i, s in enumerate(specs)
    ]
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    folder = Layout(results).submissions
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"submitted_at": yesterday, "executor": "slurm", "grid": str(grid), "results": str(results)}
    (folder / "20250101T000000000000-1.json").write_text(json.dumps({**manifest, "runs": entries}))
    return len(specs)


def measure(argv: list[str], repeat: int, *, cold: Path | None = None, env=None) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (user + system, the process and its children) of ``argv`` run
    ``repeat`` times in fresh processes (``cold``: a results folder whose runs.parquet is removed before each;
    NaN where the command fails). CPU time hardly moves with the load of a shared machine; wall time does."""
    walls, cpus = [], []
    for _ in range(repeat):
        if cold is not None:
            (cold / "runs.parquet").unlink(missing_ok=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        if subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env).returncode:
            return math.nan, math.nan
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def without_slurm(folder: Path) -> dict[str, str] | None:
    """Where SLURM does not answer (``scontrol ping``), an environment whose ``sacct`` and ``squeue`` are stubs
    that know no job, so that status is timed, not their timeouts (a command that needs SLURM, such as
    ``submit --dry-run``, then fails and is shown as nan); None where SLURM answers."""
    if shutil.which("scontrol") and subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("sacct", "squeue"):
        (folder / name).write_text("#!/bin/sh\nexit 0\n")
        (folder / name).chmod(0o755)
    print("SLURM does not answer here: sacct and squeue are stubs that know no job")
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def wall(argv: list[str], repeat: int) -> float:
    return measure(argv, repeat)[0]


def submit_breakdown(grid: Path) -> dict[str, float]:
    """Submit ``grid`` in this process, timing each phase; returns seconds per phase and the job ids."""
    import submitit
    from submitit.core import utils

    spent = {"sbatch": 0.0, "pickles": 0.0, "moves": 0.0, "batch": 0.0}

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(utils.CommandFunction, "__call__", "sbatch")
    timed(utils.DelayedSubmission, "dump", "pickles")
    timed(utils.JobPaths, "move_temporary_file", "moves")
    timed(submitit.core.core.Executor, "_submit_delayed_batch", "batch")  # all of submitit's work for a chunk
    assert submitit  # imported: its import is part of start-up, measured apart

    from cifarbench.cluster import estimate, inventory, plan, preflight, status, submit
    from cifarbench.config.grid import load_grid
    from cifarbench.store.datasets import fingerprint

    t0 = time.perf_counter()
    g = load_grid(grid, fingerprint=fingerprint)
    t1 = time.perf_counter()
    todo = plan.plan(list(g.specs), status.state_map(g.results, list(g.specs)))
    limits = inventory.read_limits(accounting=False)
    evidence = estimate.read_evidence(g.results)
    tasks = plan.make_tasks(
        todo.submit, g.resources, g.fuse, evidence, preflight.max_times(limits, g.resources.values())
    )
    assert not preflight.problems(tasks, limits)
    t2 = time.perf_counter()
    manifest = submit.submit(tasks, g.results, executor="slurm", grid_source=str(grid))
    t3 = time.perf_counter()
    arrays = sorted({e["array_job_id"] for e in manifest["runs"]})
    subprocess.run(["scancel", *arrays], check=False)
    files = spent["pickles"] + spent["moves"]
    return {
        "expand": t1 - t0,
        "plan": t2 - t1,
        "submit": t3 - t2,
        **spent,
        "submitit_rest": spent["batch"] - files - spent["sbatch"],  # its job objects and paths, per run
        "cifarbench": (t3 - t2) - spent["batch"],
        "arrays": len(arrays),
        "runs": len(manifest["runs"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5040)
    parser.add_argument("--records", type=int, help="runs with a record (default: three quarters of --runs)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--earlier", action="store_true", help="write the records without summary files")
    parser.add_argument("--submit", action="store_true", help="also submit the grid for real (held, then cancelled)")
    args = parser.parse_args()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="cifarbench-bench-control-"))
    try:
        write_data(tmp / "data")
        results = tmp / "results"
        grid = tmp / "grid.yaml"
        grid.write_text(grid_text(args.runs, results, tmp / "data"))
        records = args.runs * 3 // 4 if args.records is None else min(args.records, args.runs)
        n = fill_results(grid, results, with_records=records, summary_files=not args.earlier)
        kind = "without summary files" if args.earlier else "each with its summary file"
        print(f"grid: {n} runs; results: {records} records ({kind}), a manifest entry for every run")
        print(f"machine: {machine()}; median of {args.repeat} fresh processes")
        bare = wall([py, "-c", "pass"], args.repeat)
        env = without_slurm(tmp / "stubs")
        cifarbench = [py, "-m", "cifarbench"]
        rows = [  # name, argv, whether each run reads the folder for the first time
            ("python -c pass (baseline)", [py, "-c", "pass"], False),
            ("import torch, lightning (baseline)", [py, "-c", "import torch, lightning"], False),
            ("cifarbench status, first read", [*cifarbench, "status", str(results)], True),
            ("cifarbench status --json, first read", [*cifarbench, "status", str(results), "--json"], True),
            ("cifarbench submit --dry-run", [*cifarbench, "submit", str(grid), "--dry-run"], False),
            ("cifarbench collect --no-plots", [*cifarbench, "collect", str(results), "--no-plots"], False),
        ]
        measured = []
        for name, argv, cold in rows:
            load = os.getloadavg()[0]
            measured.append((name, *measure(argv, args.repeat, cold=results if cold else None, env=env), load))
        stack = measured[1][1]
        print(f"\n{'command':<38} {'wall s':>7} {'cpu s':>6} {'x torch import':>15} {'load before':>12}")
        for name, seconds, cpu, load in measured:
            print(f"{name:<38} {seconds:>7.2f} {cpu:>6.2f} {seconds / stack:>15.2f} {load:>12.1f}")
        print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
        if args.submit:
            if not shutil.which("sbatch"):
                sys.exit("--submit needs sbatch on the PATH (bash slurm/cluster.sh up)")
            fresh = tmp / "fresh"
            held = tmp / "held.yaml"
            held.write_text(grid_text(args.runs, fresh / "results", tmp / "data", hold=True))
            start_up = (
                wall(
                    [py, "-c", "import cifarbench.cli, cifarbench.cluster.submit, cifarbench.config.grid"], args.repeat
                )
                - bare
            )
            out = subprocess.run([py, __file__, "--_breakdown", str(held)], capture_output=True, text=True, check=True)
            b = json.loads(out.stdout.strip().splitlines()[-1])
            own = start_up + b["expand"] + b["plan"] + b["cifarbench"]
            print(f"\nsubmit of {b['runs']} runs: {b['arrays']} arrays, {b['arrays']} sbatch calls")
            for name, seconds in (
                ("start-up (imports)", start_up),
                ("expand the grid", b["expand"]),
                ("plan (status, estimates, preflight)", b["plan"]),
                ("submitit: one pickle per run", b["pickles"]),
                ("submitit: move pickles into place", b["moves"]),
                ("submitit: job objects and paths", b["submitit_rest"]),
                ("sbatch calls", b["sbatch"]),
                ("cifarbench's own rest (manifest...)", b["cifarbench"]),
            ):
                print(f"  {name:<36} {seconds:>7.2f}")
            print(f"  {'all but sbatch and submitit files':<36} {own:>7.2f}")
    finally:
        if os.environ.get("KEEP"):
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_breakdown":  # the submission, in a process of its own
        print(json.dumps(submit_breakdown(Path(sys.argv[2]))))
    else:
        main()
