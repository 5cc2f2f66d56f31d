"""``python3 scripts/gpu_check.py OUT_DIR [--smoke] [--budget S] [--only PARTS]``: the GPU story in one unattended
run (``scripts/gpu_check.sh`` sets up the machine and calls this). The check's orchestration lives here, beside
the script, not in the package users import: its parts call the ``cifarbench`` command like a user would.

Seven parts, the figures that matter most first, each run as ``python -m cifarbench ...`` subprocesses with a
timeout, so that a hang or a crash in one leaves the others standing:

- ``speed``: ``cifarbench bench --what train``: the fast path against the notebook's baseline (resnet56, batch 64,
  PIL DataLoader, eager, 16-mixed), and the projected minutes of a 200-epoch run;
- ``fuse``: like with like: a fused group of K = 8 (``bench --what fuse``) beside K runs packed onto the GPU and K
  runs one after another (``bench --what pack``, the unfused run), the same model, data, images, precision and K;
- ``fit``: the fast path's accuracy: 2 seeds each of the fast path and the torchvision baseline loader, 5 epochs of
  ``cifarbench run`` (resnet20) on synthetic CIFAR-100 of the real size, and a run compiled with CUDA graphs, all
  five training at once (accuracy is what this part measures; the speeds are the other parts');
- ``levers``: ``cifarbench bench --what all --levers --compile``: each lever flipped alone, torch.compile;
- ``pack``: 8 resnet20 runs at once against one alone, without MPS and, where
  ``nvidia-cuda-mps-control`` is on the PATH, under MPS; and one of 8 packed runs given a batch too big for the
  GPU, which must fail alone while the others complete;
- ``ddp``: ``cifarbench bench --what ddp --processes 2``: one run's global batch on one process and split between
  two (one GPU each); skipped where the machine has one GPU;
- ``grid``: a 5-run grid through ``cifarbench submit --executor local --wait`` and ``cifarbench collect``.

Everything lands directly in OUT_DIR, in four files (the GPU machine returns one folder of at most 8 files):
``summary.md`` (every table and a verdict per goal), ``tables.parquet`` (every table's rows; ``part`` and
``table`` say whose), ``env.json`` and ``log.txt`` (every subprocess's output). ``cifarbench bench`` adds each
row to its table as soon as it is measured, and summary.md and tables.parquet are rewritten after each benchmark,
each run and each part, so a part cut off at its cap, or a check killed from outside, still leaves every row it
finished.

Each part has a time cap; the caps scale with ``--budget`` (default 540 s) and leave ``RESERVE_S`` of it for
start-up and writing. A part starts only while the budget lasts, and is cut off at its cap or the budget's end
(less the reserve), whichever comes first. Each verdict is a median of repeated windows and states their spread;
none takes the best of several noisy rows. The exit code is 0 whenever the files were written, whatever the
parts did, and 2 when OUT_DIR cannot be written.

``--smoke`` runs the same code paths at CPU size (resnet20, small synthetic data, timing windows of a few batches,
K = 2, one seed of each loader, torch.compile skipped since it takes minutes on a CPU, and a labelled error
standing in for the out-of-memory run), which is how tests keep this check from rotting.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import cifarbench
from cifarbench.config.grid import load_grid
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.errors import check_name
from cifarbench.store import atomic, records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.system import usable_cores

DEFAULT_BUDGET_S = 540
RESERVE_S = 60  # of the budget, never given to a part: a fresh machine's start-up, and writing the files
MIN_START_S = 5  # a part or command given less than this would spend it starting Python
SPEEDUP_GOAL = 4.0  # fast path over the baseline, training images/s
MINUTES_GOAL = 4.0  # a projected 200-epoch run on an H100-class GPU
FUSE_GOAL = 6.0  # aggregate training images/s of a fused group of K over one unfused run's
PACK_GOAL = 3.0  # aggregate images/s of the largest pack over one run alone, on a GPU
# the seed notebook's ResNet56/CIFAR-100 table: 9 configurations x 5 seeds, each configuration one fused group
TABLE_GROUPS, TABLE_SEEDS = 9, 5
# tests/test_parity.py's TOLERANCE: the run-to-run noise of the median final accuracy of 6 seeds per loader,
# measured on CPU (a test checks that the two stay equal). Nothing measured one for 2 seeds: test_parity.py's
# seeds 0-19 ranged 0.94-1.00 (device loader) and 0.76-1.00 (torchvision), so a mean of 2 can move by more than
# 0.05 on one slow start. Part fit compares its seeds with this tolerance and calls the verdict indicative.
PARITY_TOLERANCE = 0.05
PARITY_EPOCHS = 5
FULL_TRAIN_SIZE = 50_000
BATCH_SIZE = 64
GRID_SEEDS = 5
LOG_LIMIT = 15 * 2**20  # the GPU machine returns files of at most 16 MiB
TAIL_LINES = 20
SOURCE = Path(cifarbench.__file__).resolve().parent.parent  # the tree this cifarbench runs from
FORCED_FAILURE = "import sys; sys.exit('forced failure (--fail-part)')"
NO_COMPILE_IN_SMOKE = "--smoke: torch.compile takes minutes on a CPU"
MPS_CONTROL = "nvidia-cuda-mps-control"


@dataclass(frozen=True, kw_only=True)
class Size:
    """What the parts run: the real check on a GPU, or its CPU-sized smoke version."""

    model: str  # of parts speed, fuse and levers
    fit_model: str  # of part fit's runs, which train at once
    train_size: int  # synthetic100 of parts speed, fuse, fit and levers
    test_size: int
    bench_timing: tuple[str, ...]  # extra `cifarbench bench` arguments
    precision: str  # of the fused, packed and unfused runs compared in part fuse
    fuse_k: int
    seeds: int  # of each loader in part fit
    packs: str  # part pack's runs at once
    compile: bool
    grid_train_size: int  # synthetic10 of parts pack and grid
    grid_test_size: int
    budgets: dict[str, int]  # part -> seconds at the default total budget


GPU = Size(
    model="resnet56",
    fit_model="resnet20",
    train_size=FULL_TRAIN_SIZE,
    test_size=10_000,
    bench_timing=("--steps", "10", "--warmup", "3", "--repeats", "5"),
    precision="bf16-mixed",
    fuse_k=8,
    seeds=2,
    packs="1,8",
    compile=True,
    grid_train_size=1000,
    grid_test_size=200,
    # from the first check on an H200 (torch 2.11): a cifarbench command takes 10-13 s to start there (torch,
    # CUDA), each spawned run of a pack as long; resnet56 at batch 64 trains at 2,300-3,300 images/s, resnet20
    # at about 7,500; writing synthetic100 takes 22 s. Part speed writes synthetic100, part pack synthetic10.
    budgets={"speed": 50, "fuse": 110, "fit": 115, "levers": 40, "pack": 95, "ddp": 30, "grid": 30},
)
SMOKE = Size(  # one batch an epoch: on a busy 2-core CPU resnet20 trains at a few dozen images/s
    model="resnet20",
    fit_model="resnet20",
    train_size=64,
    test_size=64,
    bench_timing=("--steps", "1", "--warmup", "1", "--repeats", "2"),
    precision="32-true",
    fuse_k=2,
    seeds=1,  # each run costs seconds of start-up on a CPU: one pair tests the same code
    packs="2",
    compile=False,
    grid_train_size=128,
    grid_test_size=64,
    budgets={"speed": 35, "fuse": 70, "fit": 90, "levers": 55, "pack": 70, "ddp": 45, "grid": 55},
)


@dataclass
class Step:
    """One subprocess of a part: ok, failed (non-zero exit), timed out, or skipped (on purpose)."""

    label: str
    status: str
    detail: str = ""
    seconds: float = 0.0
    output: str = ""


@dataclass
class Part:
    name: str
    title: str
    budget_s: float
    deadline: float = 0.0
    status: str | None = None  # None: derived from the steps and problems when the part ends
    note: str = ""
    seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what went wrong beyond a step's exit
    rows: list[dict] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)  # Markdown, below the part's status

    @property
    def state(self) -> str:
        return self.status or ("running" if self.deadline else "not run")


class Check:
    """The run of every part: the work folder, log.txt, the clock and the subprocesses."""

    def __init__(
        self,
        *,
        log: Any,
        work: Path,
        size: Size,
        budget: float,
        fail_part: str | None = None,
        kill_part: str | None = None,
        saved: Callable[[], None] = lambda: None,
    ):
        self.log, self.work, self.size = log, work, size
        self.budget, self.fail_part, self.kill_part = budget, fail_part, kill_part
        self.saved = saved  # writes summary.md and tables.parquet: called after every command
        self.started = time.monotonic()
        self.data = work / "data"
        self.written: set[str] = set()  # datasets written in this check
        self.forced = False  # --fail-part's failure was used
        self.gpus = 0  # as the environment's probe saw them
        paths = [str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}

    def say(self, line: str) -> None:
        """A progress line, to log.txt and stdout (the GPU machine shows the end of stdout)."""
        self.log.write(line + "\n")
        self.log.flush()
        print(line, flush=True)

    def left(self) -> float:
        """Seconds the parts may still use: the budget less the reserve."""
        return self.started + self.budget - RESERVE_S - time.monotonic()

    def step(
        self, part: Part, label: str, args: list[str], *, skip: str | None = None, watch: Path | None = None
    ) -> Step:
        """Run ``cifarbench ARGS`` until it ends or the part's time is up; its output goes to log.txt. ``watch``:
        the results folder of a ``cifarbench bench`` command, whose rows ``--kill-part`` waits for."""
        step = self._unstarted(part, label, skip) or self._run(
            part, label, args, watch if self.kill_part == part.name else None
        )
        part.steps.append(step)
        return step

    def _unstarted(self, part: Part, label: str, skip: str | None) -> Step | None:
        """The step of a command skipped on purpose, or left with too little of the part's time to start; None
        for one to run."""
        if skip:
            self.say(f"[{part.name}] {label}: skipped: {skip}")
            return Step(label, "skipped", skip)
        if part.deadline - time.monotonic() < MIN_START_S:
            step = Step(label, "timed out", "not started: the part's time was used up")
            self.say(f"[{part.name}] {label}: {step.detail}")
            return step
        return None

    def _run(self, part: Part, label: str, args: list[str], watch: Path | None) -> Step:
        log_path = Path(self.log.name)
        start = log_path.stat().st_size
        began = time.monotonic()
        proc = self._start(part, label, args, self.log)
        code: int | None = None
        killed = ""
        try:
            while code is None and time.monotonic() < part.deadline:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(timeout=min(0.5, max(part.deadline - time.monotonic(), 0.01)))
                if code is None and watch is not None and bench_rows(watch):
                    killed = "killed after its first row (--kill-part)"  # as its cap would, at a known point
                    break
        finally:
            _kill(proc)
        with open(log_path, "rb") as fh:
            fh.seek(start)
            output = fh.read().decode("utf-8", errors="replace")
        return self._ended(part, label, code, time.monotonic() - began, output, killed)

    def at_once(self, part: Part, commands: list[tuple[str, list[str], str | None]]) -> list[Step]:
        """Run several ``cifarbench`` commands (label, args, skip) at the same time until each ends or the part's
        time is up; each one's output goes to log.txt whole when it ends. The steps come back in the order given."""
        steps: dict[int, Step] = {}
        running: dict[int, tuple[subprocess.Popen, Any, float]] = {}
        for i, (label, args, skip) in enumerate(commands):
            if unstarted := self._unstarted(part, label, skip):
                steps[i] = unstarted
            else:
                output = tempfile.TemporaryFile(dir=self.work)  # noqa: SIM115 (closed by _collect)
                running[i] = (self._start(part, label, args, output), output, time.monotonic())
        try:
            while running and time.monotonic() < part.deadline:
                for i, (proc, output, began) in list(running.items()):
                    if proc.poll() is not None:
                        steps[i] = self._collect(part, commands[i][0], proc.returncode, began, output)
                        del running[i]
                time.sleep(0.2)
        finally:
            for i, (proc, output, began) in running.items():
                _kill(proc)
                steps[i] = self._collect(part, commands[i][0], None, began, output)
        ordered = [steps[i] for i in range(len(commands))]
        part.steps += ordered
        return ordered

    def _collect(self, part: Part, label: str, code: int | None, began: float, output: Any) -> Step:
        output.seek(0)
        text = output.read().decode("utf-8", errors="replace")
        output.close()
        self.log.write(text)
        self.log.flush()
        return self._ended(part, label, code, time.monotonic() - began, text)

    def _start(self, part: Part, label: str, args: list[str], output: Any) -> subprocess.Popen:
        """``cifarbench ARGS`` (or the forced failure of ``--fail-part``, for a part's first command) in a session
        of its own: on a timeout the whole group goes, DataLoader workers and local jobs included."""
        forced = self.fail_part == part.name and not part.steps and not self.forced
        self.forced |= forced
        command = [sys.executable, "-c", FORCED_FAILURE] if forced else [sys.executable, "-m", "cifarbench", *args]
        shown = "cifarbench " + " ".join(args) + (" (replaced by a forced failure: --fail-part)" if forced else "")
        self.say(f"[{part.name}] {label}: {shown} (up to {part.deadline - time.monotonic():.0f} s)")
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=self.work,
            env=self.env,
            start_new_session=True,
        )

    def _ended(self, part: Part, label: str, code: int | None, seconds: float, output: str, killed: str = "") -> Step:
        if code == 0:
            step = Step(label, "ok", seconds=seconds, output=output)
        elif code is None:
            step = Step(label, "timed out", killed or f"killed after {seconds:.0f} s", seconds, output)
        else:
            step = Step(label, "failed", f"exit {code}", seconds, output)
        self.say(f"[{part.name}] {label}: {step.status}{f' ({step.detail})' if step.detail else ''} in {seconds:.1f} s")
        return step

    def dataset(self, part: Part, name: str, train_size: int, test_size: int) -> bool:
        """Write a synthetic dataset into the work folder once; whether it is there."""
        if name in self.written:
            return True
        args = ["data", "synthetic", "--root", str(self.data), "--dataset", name]
        step = self.step(part, f"data {name}", args + ["--train-size", str(train_size), "--test-size", str(test_size)])
        if step.status == "ok":
            self.written.add(name)
        return step.status == "ok"

    def bench(self, part: Part, label: str, args: list[str], *, skip: str | None = None) -> list[dict]:
        """Run ``cifarbench bench ARGS`` into a results folder of its own; the rows it wrote, even if it was cut
        off (bench adds each row to its table as it is measured), each with ``step``: ``label``."""
        results = self.work / f"bench-{part.name}-{len(part.steps)}"
        step = self.step(part, label, ["bench", *args, "--results", str(results)], skip=skip, watch=results)
        measured = [{"step": label, **row} for row in bench_rows(results)]
        part.rows += measured
        if measured and step.status in ("failed", "timed out"):
            step.detail += f"; kept the {len(measured)} rows it had measured"
        self.saved()
        return measured


def _kill(proc: subprocess.Popen) -> None:
    """Kill a command's process group (its children too), then reap it."""
    with contextlib.suppress(ProcessLookupError):  # none of the group left
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def bench_rows(results: Path) -> list[dict]:
    """The rows of the bench tables under ``results`` (written atomically: a table is whole or absent)."""
    return [row for path in sorted(Layout(results).bench.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def _bench_args(check: Check, model: str, dataset: str) -> list[str]:
    return ["--model", model, "--dataset", dataset, "--batch-size", str(BATCH_SIZE), "--data-root", str(check.data)]


BENCH_COLUMNS = [
    ("step", "command", ""),
    ("what", "what", ""),
    ("variant", "variant", ""),
    ("precision", "precision", ""),
    ("images_per_s", "images/s", ",.0f"),
    ("spread", "min-max", ""),
    ("ratio", "x baseline", ".2f"),
    ("ratio_to_fast_path", "x fast", ".2f"),
    ("eval_images_per_s", "test images/s", ",.0f"),
    ("minutes_200_epochs", "200 ep min", ",.1f"),
    ("note", "note", ""),
]


def _bench_section(rows: list[dict], intro: str, columns: list[tuple[str, str, str]] = BENCH_COLUMNS) -> str:
    first = rows[0]
    return (
        f"{intro} On {first['device']} (torch {first['torch_version']}, CUDA {first['cuda_version']}); 1-minute load "
        f"average at the first row {_cell(first['load_avg'], '.2f')}. images/s: the median of {first['repeats']} "
        f"timed windows of {first['steps']} batches (after {first['warmup']} to warm up); `min-max`: the slowest and "
        "fastest window.\n\n" + markdown_table([{**r, "spread": spread(r)} for r in rows], columns)
    )


def spread(row: dict) -> str:
    """A row's slowest and fastest window, e.g. "9,870-10,410"."""
    low, high = row.get("images_per_s_min"), row.get("images_per_s_max")
    return "" if low is None or high is None else f"{low:,.0f}-{high:,.0f}"


def part_speed(check: Check, part: Part) -> None:
    size = check.size
    if not check.dataset(part, "synthetic100", size.train_size, size.test_size):
        return
    args = ["--what", "train", *_bench_args(check, size.model, "synthetic100"), *size.bench_timing]
    rows = check.bench(part, "bench train", args)
    if rows:
        part.sections.append(
            _bench_section(
                rows,
                f"`cifarbench bench --what train`: {size.model}, synthetic100 ({size.train_size:,} training images), "
                f"batch {BATCH_SIZE}: the notebook's baseline against the fast path. `x baseline`: images/s over the "
                "baseline's.",
            )
        )


def part_fuse(check: Check, part: Part) -> None:
    """Fused K beside its alternatives, all on the same model, data, images, precision, K and timing windows."""
    size = check.size
    if not check.dataset(part, "synthetic100", size.train_size, size.test_size):
        return
    k = size.fuse_k
    common = [*_bench_args(check, size.model, "synthetic100"), "--precision", size.precision, *size.bench_timing]
    # K first: a cap that cuts the command short cuts the group of TABLE_SEEDS, measured for the projection only
    sizes = ",".join(str(n) for n in dict.fromkeys([k, TABLE_SEEDS if size is GPU else k]))
    check.bench(part, f"fuse {k}", ["--what", "fuse", "--fuse", sizes, *common])
    check.bench(part, f"pack {k}", ["--what", "pack", "--pack", str(k), "--mps", "auto", *common])
    if part.rows:
        part.sections.append(
            _bench_section(
                part.rows,
                f"Like with like: {size.model}, synthetic100 ({size.train_size:,} training images), batch "
                f"{BATCH_SIZE}, {size.precision}, K = {k}: a fused group (`bench --what fuse`), K runs packed "
                "onto the device at once, each in a process of its own (`bench --what pack`, under MPS where it "
                "runs) and one unfused run, whose images/s K runs one after another also reach. images/s: all "
                "runs together; "
                "`x baseline`: over one run alone (of the same command).",
                [c for c in BENCH_COLUMNS if c[0] not in ("ratio_to_fast_path",)],
            )
        )
        found = like_with_like(part.rows, k)
        if found is not None:
            part.sections.append(f"The fused group against the best alternative: {found[2]}.")


def like_with_like(rows: list[dict], k: int) -> tuple[float, float, str] | None:
    """(gain of the fused group of ``k`` over the best alternative, its worst case from the windows' spread,
    the sentence that says so); None until the group and an alternative are measured. The best alternative is
    the faster median of K runs packed and K runs in sequence (one unfused run's images/s)."""
    fused = next((r for r in rows if r["what"] == "fuse" and r["variant"] == f"fused group of {k}"), None)
    sequence = next((r for r in rows if r["what"] == "fuse" and r["baseline"]), None)
    packed = next((r for r in rows if r["what"] == "pack" and r["pack"] == k), None)
    options = [(r, name) for r, name in ((packed, f"{k} runs packed"), (sequence, f"{k} runs in sequence")) if r]
    if fused is None or not fused["images_per_s"] or not options:
        return None
    best, name = max(options, key=lambda o: o[0]["images_per_s"])
    gain = fused["images_per_s"] / best["images_per_s"]
    worst = fused["images_per_s_min"] / best["images_per_s_max"]
    others = "; ".join(f"{n} {r['images_per_s']:,.0f} ({spread(r)})" for r, n in options if r is not best)
    text = (
        f"{gain:.2f}x the best alternative ({name}; {worst:.2f}x slowest fused window against its fastest): fused "
        f"{fused['images_per_s']:,.0f} images/s (windows {spread(fused)}) against {best['images_per_s']:,.0f} "
        f"({spread(best)})" + (f"; {others}" if others else "")
    )
    return gain, worst, text


COMPILED = "fast path + torch.compile reduce-overhead"


def fit_runs(seeds: int) -> list[tuple[str, str, str | None, int]]:
    """(label, loader, compile mode, seed) of part fit: seed by seed, so a part cut short still has pairs."""
    pairs = (("fast path", "device"), ("baseline loader (torchvision)", "torchvision"))
    return [(label, loader, None, seed) for seed in range(seeds) for label, loader in pairs] + [
        (COMPILED, "device", "reduce-overhead", 0)
    ]


def part_fit(check: Check, part: Part) -> None:
    """The fit runs train at once, sharing the device: their accuracy is what is measured here (each run's
    batches and weights are its seed's alone), not their speed, which parts speed, fuse and levers measure."""
    size = check.size
    if not check.dataset(part, "synthetic100", size.train_size, size.test_size):
        return
    results = check.work / "fit"
    runs, commands = [], []
    for label, loader, mode, seed in fit_runs(size.seeds):
        spec = RunSpec(
            model=size.fit_model,
            dataset="synthetic100",
            recipe=get_recipe("cos-200"),  # the recipe tests/test_parity.py measured its tolerance with
            batch_size=BATCH_SIZE,
            seed=seed,
            epochs=PARITY_EPOCHS,
            loader=loader,
            compile=mode,
            data_fingerprint=fingerprint("synthetic100", check.data),  # as `cifarbench run` names the run
            data_root=str(check.data),
            results=str(results),
        )
        args = ["run", "--model", spec.model, "--dataset", spec.dataset, "--opt", spec.recipe.name]
        args += ["--batch-size", str(spec.batch_size), "--seed", str(spec.seed), "--epochs", str(spec.epochs)]
        args += ["--loader", loader, "--data-root", spec.data_root, "--results", spec.results]
        args += ["--compile", mode] if mode else []
        skip = None if size.compile or not mode else NO_COMPILE_IN_SMOKE
        runs.append((label, seed, spec))
        commands.append((f"run {label}, seed {seed}", args, skip))
    for (label, seed, spec), step in zip(runs, check.at_once(part, commands)):
        if step.status == "skipped":
            continue
        record = records.read_record(Layout(results).record(spec.run_id))
        if step.status == "ok" and (record is None or record["status"] != "completed"):
            part.problems.append(f"run {label}, seed {seed} exited 0 without a completed record")
        part.rows.append(_fit_row(label, step, record))
    check.saved()
    part.sections.append(
        f"{size.seeds} seed(s) each of the fast path and the baseline loader, {PARITY_EPOCHS} epochs of cos-200 on "
        f"synthetic100 ({size.train_size:,} / {size.test_size:,} images), {size.fit_model}, batch {BATCH_SIZE}, "
        "and one run compiled with CUDA graphs, all training at once on the one device: their accuracy is what "
        "counts here, and their images/s (the record's mean over epochs, the first with warm-up and compiling) "
        "are shares of a device, not speeds.\n\n"
        + markdown_table(
            part.rows,
            [
                ("variant", "run", ""),
                ("seed", "seed", ""),
                ("status", "status", ""),
                ("epochs_done", "epochs", ""),
                ("final_test_acc", "final acc", ".4f"),
                ("best_test_acc", "best acc", ".4f"),
                ("images_per_s", "images/s", ",.0f"),
                ("last_epoch_seconds", "last epoch s", ".1f"),
                ("precision", "precision", ""),
                ("note", "note", ""),
                ("seconds", "wall s", ".0f"),
            ],
        )
    )


def _fit_row(label: str, step: Step, record: dict | None) -> dict:
    row: dict[str, Any] = {"variant": label, "seconds": step.seconds}
    if record is None:
        return {**row, "status": f"no record ({step.status})"}
    keys = ["run_id", "model", "dataset", "batch_size", "seed", "loader", "compile", "status", "epochs_done"]
    keys += ["final_test_acc", "best_test_acc", "images_per_s", "train_seconds", "torch_version"]
    row |= {key: record[key] for key in keys}
    row |= {"precision": record["precision_used"], "device": record["device_name"]}
    row["note"] = f"trained eagerly: {record['compile_fallback']}" if record["compile_fallback"] else record["error"]
    if record["epoch_seconds"]:
        row["last_epoch_seconds"] = record["epoch_seconds"][-1]
    return row


def part_levers(check: Check, part: Part) -> None:
    size = check.size
    if not check.dataset(part, "synthetic100", size.train_size, size.test_size):
        return
    args = ["--what", "all", "--levers", *(["--compile"] if size.compile else [])]
    rows = check.bench(
        part, "bench levers", [*args, *_bench_args(check, size.model, "synthetic100"), *size.bench_timing]
    )
    if rows:
        part.sections.append(
            _bench_section(
                rows,
                f"`cifarbench bench --what all --levers{' --compile' if size.compile else ''}`: {size.model}, "
                f"synthetic100, batch {BATCH_SIZE}"
                + ("" if size.compile else f" (torch.compile left out: {NO_COMPILE_IN_SMOKE})")
                + ". `x baseline`: images/s over the baseline row's of the same `what`; `x fast`: over the fast "
                "path's.",
            )
        )


PACK_COLUMNS = [
    ("step", "command", ""),
    ("pack", "runs at once", ""),
    ("variant", "variant", ""),
    ("images_per_s", "images/s", ",.0f"),
    ("spread", "min-max", ""),
    ("ratio", "x one run", ".2f"),
    ("per_run_images_per_s", "per run", ",.0f"),
    ("slowdown", "slowdown", ".2f"),
    ("peak_memory_mb", "peak MB", ",.0f"),
    ("failed_runs", "failed", ""),
    ("note", "note", ""),
]


def part_pack(check: Check, part: Part) -> None:
    size = check.size
    if not check.dataset(part, "synthetic10", size.grid_train_size, size.grid_test_size):
        return
    args = ["--what", "pack", "--pack", size.packs, "--isolation", *_bench_args(check, "resnet20", "synthetic10")]
    args += size.bench_timing
    mps = ["off", "on"] if shutil.which(MPS_CONTROL) else ["off"]
    for mode in mps:
        check.bench(part, f"pack, MPS {mode}", [*args, "--mps", mode])
    if part.rows:
        where = "" if len(mps) > 1 else f" ({MPS_CONTROL} is not on the PATH here: no MPS rows)"
        part.sections.append(
            _bench_section(
                part.rows,
                f"`cifarbench bench --what pack --pack {size.packs} --isolation`, without MPS and under it{where}: "
                f"resnet20, synthetic10, batch {BATCH_SIZE}. images/s: all runs together; `x one run`: over one run "
                "alone; `slowdown`: one run alone's images/s over each packed run's (median); the `isolation` row: "
                "the largest pack again with run 0 given a batch too big for the device's memory, which must fail "
                "alone"
                + ("" if check.size is GPU else " (on a CPU a labelled error stands in for running out of memory)")
                + ".",
                PACK_COLUMNS,
            )
        )


DDP_COLUMNS = [
    ("step", "command", ""),
    ("variant", "processes", ""),
    ("precision", "precision", ""),
    ("images_per_s", "images/s", ",.0f"),
    ("spread", "min-max", ""),
    ("ratio", "x one process", ".2f"),
    ("efficiency", "scaling efficiency", ".2f"),
    ("note", "note", ""),
]


def part_ddp(check: Check, part: Part) -> None:
    size = check.size
    if size is GPU and check.gpus < 2:
        part.status = "skipped"
        part.note = f"DDP needs 2 GPUs, and this machine has {check.gpus}"
        return
    if not check.dataset(part, "synthetic10", size.grid_train_size, size.grid_test_size):
        return
    args = ["--what", "ddp", "--processes", "2", *_bench_args(check, "resnet20", "synthetic10"), *size.bench_timing]
    check.bench(part, "ddp, 2 processes", args)
    if part.rows:
        part.sections.append(
            _bench_section(
                part.rows,
                f"`cifarbench bench --what ddp --processes 2`: resnet20, synthetic10, global batch {BATCH_SIZE} on one "
                "process and split between two (DDP, one device each: NCCL on GPUs, gloo on a CPU's cores shared "
                "out); `scaling efficiency`: images/s of the two over 2 x the one's. With one GPU there is no second "
                "device, and the row says it measured nothing.",
                DDP_COLUMNS,
            )
        )


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def part_grid(check: Check, part: Part) -> None:
    if not installed("submitit"):
        part.status = "skipped"
        part.note = "submitit is not installed, and .whl/ held no wheel of it (see scripts/gpu_check.sh)"
        return
    size = check.size
    if not check.dataset(part, "synthetic10", size.grid_train_size, size.grid_test_size):
        return
    results = check.work / "grid-results"
    grid = check.work / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "models": ["resnet20"],
                "datasets": ["synthetic10"],
                "opts": ["cos-200"],
                "epochs": 2,
                "batch_sizes": [BATCH_SIZE],
                "seeds": list(range(GRID_SEEDS)),
                "root": str(check.data),
                "results": str(results),
            },
            sort_keys=False,
        )
    )
    check.step(part, "submit --wait", ["submit", str(grid), "--executor", "local", "--wait"])
    for spec in load_grid(grid, fingerprint=fingerprint).specs:
        record = records.read_record(Layout(results).record(spec.run_id)) or {}
        row = {"run_id": spec.run_id, "model": spec.model, "dataset": spec.dataset, "seed": spec.seed}
        keys = ("status", "epochs_done", "final_test_acc", "images_per_s", "device_name", "error")
        part.rows.append(row | {key: record.get(key) for key in keys} | {"status": record.get("status", "no record")})
    completed = sum(row["status"] == "completed" for row in part.rows)
    if completed < GRID_SEEDS:
        part.problems.append(f"{completed} of {GRID_SEEDS} runs completed")
    part.sections.append(
        f"{completed} of {GRID_SEEDS} runs completed (resnet20, synthetic10 {size.grid_train_size:,} / "
        f"{size.grid_test_size:,} images, 2 epochs, seeds 0-{GRID_SEEDS - 1}).\n\n"
        + markdown_table(
            part.rows,
            [
                ("run_id", "run", ""),
                ("seed", "seed", ""),
                ("status", "status", ""),
                ("final_test_acc", "final acc", ".4f"),
                ("images_per_s", "images/s", ",.0f"),
                ("error", "error", ""),
            ],
        )
    )
    if check.step(part, "collect", ["collect", str(results), "--no-plots"]).status == "ok":
        tables = Layout(results).tables.read_text()
        # its headings go one level below the part's
        part.sections.append(
            "`cifarbench collect --no-plots`, its tables.md:\n\n" + re.sub(r"(?m)^#", "###", tables).strip()
        )


PARTS: dict[str, tuple[str, Callable[[Check, Part], None]]] = {
    "speed": ("1. Fast path against the notebook's baseline (`cifarbench bench --what train`)", part_speed),
    "fuse": ("2. Fused K against K runs packed and K runs in sequence", part_fuse),
    "fit": ("3. The fast path's accuracy: real short fits (`cifarbench run`)", part_fit),
    "levers": ("4. Throughput levers (`cifarbench bench --levers`)", part_levers),
    "pack": ("5. Packing, MPS and a packed run out of memory (`cifarbench bench --what pack`)", part_pack),
    "ddp": ("6. One run on two devices (`cifarbench bench --what ddp`)", part_ddp),
    "grid": ("7. The whole path: `submit --executor local --wait`, then `collect`", part_grid),
}


def run_part(check: Check, part: Part, selected: list[str]) -> None:
    left = check.left()
    if part.name not in selected:
        part.status, part.note = "skipped", "not selected (--only)"
        return
    if left < MIN_START_S:
        part.status = "skipped"
        part.note = f"the total budget of {check.budget:.0f} s was used up ({max(left, 0):.0f} s left)"
        check.say(f"[{part.name}] skipped: {part.note}")
        return
    part.deadline = time.monotonic() + min(part.budget_s, left)
    check.say(f"[{part.name}] {part.title}: up to {min(part.budget_s, left):.0f} s")
    began = time.monotonic()
    try:
        PARTS[part.name][1](check, part)
    except Exception as exc:  # a bug or a surprise in one part must not cost the others
        check.say(traceback.format_exc().rstrip())
        part.status = "failed"
        part.note = f"{type(exc).__name__}: {exc}".splitlines()[0]
    except BaseException:  # stopped from outside: the summary written on the way out says where
        part.status, part.note = "interrupted", "the check was stopped during this part"
        raise
    part.seconds = time.monotonic() - began
    if part.status is None:
        bad = [s for s in part.steps if s.status in ("failed", "timed out")]
        part.status = (
            "failed" if part.problems or any(s.status == "failed" for s in bad) else ("timed out" if bad else "ok")
        )
        part.note = "; ".join([f"{s.label}: {s.status} ({s.detail})" for s in bad] + part.problems)
    skipped = [f"{s.label} ({s.detail})" for s in part.steps if s.status == "skipped"]
    if skipped:
        part.note = "; ".join(filter(None, [part.note, "not run: " + ", ".join(skipped)]))
    check.say(f"[{part.name}] {part.status} in {part.seconds:.1f} s" + (f": {part.note}" if part.note else ""))


# Run in a subprocess of its own: a broken CUDA set-up fails there, not in the check.
PROBE = """
import json
import lightning, torch, torchvision
cuda = torch.cuda.is_available()
free, total = torch.cuda.mem_get_info() if cuda else (None, None)
print(json.dumps({
    "gpu_name": torch.cuda.get_device_name() if cuda else None,
    "gpu_count": torch.cuda.device_count(),
    "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
    "gpu_memory_free_mib": free and free // 2**20,
    "gpu_memory_total_mib": total and total // 2**20,
    "cuda_version": torch.version.cuda,
    "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "torch_version": torch.__version__,
    "torchvision_version": torchvision.__version__,
    "lightning_version": lightning.__version__,
    "bf16_supported": cuda and torch.cuda.is_bf16_supported(),
}))
"""


def environment(check: Check, smoke: bool) -> dict:
    """env.json: the machine, the GPU (through torch and nvidia-smi) and the software."""
    env: dict[str, Any] = dict.fromkeys(
        (
            "gpu_name",
            "gpu_count",
            "gpu_capability",
            "gpu_memory_free_mib",
            "gpu_memory_total_mib",
            "driver_version",
            "cuda_version",
            "cudnn_version",
            "torch_version",
            "torchvision_version",
            "lightning_version",
            "bf16_supported",
        )
    )
    check.say("[env] torch, CUDA and the GPU (a probe in a python3 of its own)")
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            env=check.env,
            cwd=check.work,
        )
        check.log.write(out.stderr)
        check.log.flush()
        env.update(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {})
        env["probe_error"] = None if out.returncode == 0 else tail(out.stderr)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        env["probe_error"] = f"{type(exc).__name__}: {exc}"
    smi = _command(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.free", "--format=csv,noheader,nounits"]
    )
    if smi:
        name, driver, total, free = ([*smi.splitlines()[0].split(","), "", "", ""])[:4]
        env["driver_version"] = driver.strip()
        env["gpu_name"] = env["gpu_name"] or name.strip()
        with contextlib.suppress(ValueError):  # "[N/A]" where the driver does not tell
            env["gpu_memory_total_mib"] = env["gpu_memory_total_mib"] or int(total)
            env["gpu_memory_free_mib"] = env["gpu_memory_free_mib"] or int(free)
    try:
        submitit_version: str | None = metadata.version("submitit")
    except metadata.PackageNotFoundError:
        submitit_version = None
    env |= {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python_version": platform.python_version(),
        "python": sys.executable,
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _command(["git", "-C", str(SOURCE), "rev-parse", "HEAD"]),
        "cifarbench_version": cifarbench.__version__,
        "cifarbench_source": str(SOURCE),
        "submitit_version": submitit_version,
        "smoke": smoke,
        "budget_s": check.budget,
    }
    check.log.write(json.dumps(env, indent=1) + "\n")
    check.log.flush()
    return env


def _command(argv: list[str]) -> str | None:
    """A command's stripped stdout, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # NaN: a figure that does not exist
        return ""
    text = format(value, spec) if spec else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, heading, format spec); a missing or null value is an empty cell."""
    lines = ["| " + " | ".join(heading for _, heading, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key), spec) for key, _, spec in columns) + " |" for row in rows]
    return "\n".join(lines)


def _h100_class(name: str | None) -> bool:
    return bool(name) and re.search(r"\bG?H(100|200)\b", name or "") is not None


def _not_measured(part: Part) -> str:
    return f"part {part.name}: {part.state}" + (f" ({part.note})" if part.note else "")


def verdicts(parts: dict[str, Part], env: dict) -> list[tuple[str, str, str]]:
    """(goal, met | not met | not measured, the figure and where it comes from). Each figure is one row's median
    of repeated windows, with their spread; none is the best of several measurements of the same thing."""
    gpu = env.get("gpu_name")
    where = "" if gpu else "; on a CPU, while the goal is a GPU's"
    size = SMOKE if env.get("smoke") else GPU
    out = []

    goal = f"fast path >= {SPEEDUP_GOAL:g}x the baseline's training images/s ({GPU.model}, batch {BATCH_SIZE})"
    speed = parts["speed"].rows
    fast = next((r for r in speed if r["variant"] == "fast path" and r["ratio"] is not None), None)
    base = next((r for r in speed if r["baseline"]), None)
    if fast is None or base is None:
        out.append((goal, "not measured", _not_measured(parts["speed"])))
    else:
        out.append(
            (
                goal,
                "met" if fast["ratio"] >= SPEEDUP_GOAL else "not met",
                f"{fast['ratio']:.2f}x ({fast['images_per_s_min'] / base['images_per_s_max']:.2f}-"
                f"{fast['images_per_s_max'] / base['images_per_s_min']:.2f}x window against window): "
                f"{fast['images_per_s']:,.0f} (windows {spread(fast)}) vs {base['images_per_s']:,.0f} images/s "
                f"({spread(base)}); {fast['model']}, batch {fast['batch_size']}, {fast['device']}" + where,
            )
        )

    goal = f"a 200-epoch run projected at <= {MINUTES_GOAL:g} minutes on an H100-class GPU"
    # one figure per configuration: where two commands measured the same one, the median of their figures
    measured: dict[str, list[float]] = {}
    for name in ("speed", "levers"):
        for r in parts[name].rows:
            if r.get("minutes_200_epochs") is not None and r["what"] == "train":
                measured.setdefault(f"bench: {r['variant']}", []).append(r["minutes_200_epochs"])
    if not measured:
        out.append((goal, "not measured", f"{_not_measured(parts['speed'])}, {_not_measured(parts['levers'])}"))
    else:
        figures = sorted((statistics.median(m), source, len(m)) for source, m in measured.items())
        minutes, source, n = figures[0]
        others = "; ".join(f"{m:,.1f} min ({s})" for m, s, _ in figures[1:])
        out.append(
            (
                goal,
                "met" if minutes <= MINUTES_GOAL else "not met",
                f"{minutes:,.1f} min with the fastest setting ({source}"
                + (f", the median of {n} measurements" if n > 1 else "")
                + ")"
                + (f"; also {others}" if others else "")
                + ("" if _h100_class(gpu) else f"; measured on {gpu or 'a CPU'}, not an H100-class GPU"),
            )
        )

    out += _fusion_verdicts(parts, size.fuse_k, gpu, where)
    out.append(_accuracy_verdict(parts["fit"], size.seeds))

    goal = "a run compiled with reduce-overhead (CUDA graphs) completes without falling back to eager"
    compiled = next((r for r in parts["fit"].rows if r["variant"] == COMPILED), None)
    if compiled is None:
        skipped = any(s.status == "skipped" and "compile" in s.label for s in parts["fit"].steps)
        out.append((goal, "not measured", NO_COMPILE_IN_SMOKE if skipped else _not_measured(parts["fit"])))
    else:
        ok = compiled["status"] == "completed" and not (compiled.get("note") or "").startswith("trained eagerly")
        out.append(
            (
                goal,
                "met" if ok else "not met",
                f"{compiled['status']}"
                + (f", {compiled['images_per_s']:,.0f} images/s" if compiled.get("images_per_s") else "")
                + (f"; {compiled['note']}" if compiled.get("note") else ""),
            )
        )

    pack = parts["pack"]
    goal = f"{PACK_GOAL:g}x the aggregate training images/s with the most runs packed onto one GPU (resnet20)"
    packed = [r for r in pack.rows if r["what"] == "pack" and r["images_per_s"] is not None]
    largest = max((r["pack"] for r in packed), default=1)
    if largest == 1:
        out.append((goal, "not measured", _not_measured(pack)))
    else:
        largest_rows = [r for r in packed if r["pack"] == largest]  # one per MPS mode
        met = bool(gpu) and all(r["ratio"] >= PACK_GOAL for r in largest_rows)
        out.append(
            (
                goal,
                "met" if met else "not met",
                "; ".join(
                    f"{r['ratio']:.2f}x with {r['variant']}: {r['images_per_s']:,.0f} images/s (windows {spread(r)}), "
                    f"each run {r['slowdown']:.2f}x slower"
                    for r in largest_rows
                )
                + f", on {largest_rows[0]['device']}"
                + where,
            )
        )

    goal = "a packed run that runs out of memory fails alone: the other runs of its pack complete"
    isolation = [r for r in pack.rows if r["what"] == "isolation"]
    tried = any(s.label.startswith("pack") and s.status == "failed" for s in pack.steps)
    if not isolation:
        out.append((goal, "not met" if tried else "not measured", _not_measured(pack)))
    else:
        # run 0 ran out of memory (or, on a CPU, its stand-in failed), and no other run failed: every other run
        # reported its timed windows, or there would be no figure
        alone = all(
            r["failed_runs"] == 1
            and re.search(r"^run 0: (OutOfMemoryError|RuntimeError: stand-in for out of memory)", r["note"])
            and "failed: run 0;" in r["note"]
            and r["images_per_s"]
            for r in isolation
        )
        stand_in = "" if gpu else " (on a CPU a labelled error stands in for running out of memory)"
        out.append((goal, "met" if alone else "not met", "; ".join(r["note"] for r in isolation) + stand_in))

    goal = f"the whole path on this node: {GRID_SEEDS} of {GRID_SEEDS} grid runs completed, then collected"
    grid = parts["grid"]
    if not grid.rows:
        out.append((goal, "not measured", _not_measured(grid)))
    else:
        completed = sum(r["status"] == "completed" for r in grid.rows)
        collected = any(s.label == "collect" and s.status == "ok" for s in grid.steps)
        out.append(
            (
                goal,
                "met" if completed == GRID_SEEDS and collected else "not met",
                f"{completed} of {GRID_SEEDS} completed; collect {'ok' if collected else 'did not succeed'}",
            )
        )
    return out


def _fusion_verdicts(parts: dict[str, Part], k: int, gpu: str | None, where: str) -> list[tuple[str, str, str]]:
    """Fused K against its alternatives (K: the size's, 2 at smoke size), and the projection of the table."""
    fuse = parts["fuse"]
    rows, out = fuse.rows, []
    goal = (
        f"a fused group of {GPU.fuse_k} beats both alternatives, {GPU.fuse_k} runs packed and {GPU.fuse_k} runs "
        "one after another, beyond the spread of the windows"
    )
    found = like_with_like(rows, k)
    if found is None:
        out.append((goal, "not measured", _not_measured(fuse)))
    else:
        _, worst, text = found
        out.append((goal, "met" if worst > 1 and bool(gpu) else "not met", f"K = {k}: {text}{where}"))

    goal = f"a fused group of {GPU.fuse_k} >= {FUSE_GOAL:g}x one unfused run's training images/s ({GPU.model})"
    group = next((r for r in rows if r["what"] == "fuse" and r["variant"] == f"fused group of {k}"), None)
    if group is None or group["images_per_s"] is None:
        out.append((goal, "not measured", _not_measured(fuse)))
    else:
        out.append(
            (
                goal,
                "met" if group["ratio"] >= FUSE_GOAL and bool(gpu) else "not met",
                f"K = {k}: {group['ratio']:.2f}x, {group['images_per_s']:,.0f} images/s (windows {spread(group)}), "
                f"{group['model']} on {group['device']}{where}",
            )
        )
    table = next((r for r in rows if r["what"] == "fuse" and r["variant"] == f"fused group of {TABLE_SEEDS}"), None)
    if table is not None and table["minutes_200_epochs"] is not None:
        hours = TABLE_GROUPS * table["minutes_200_epochs"] / 60
        out.append(
            (
                f"projected: the {TABLE_GROUPS * TABLE_SEEDS}-run {table['model']} table (200 epochs, "
                f"{TABLE_GROUPS} fused groups of {TABLE_SEEDS}, one after another on this device)",
                "measured",
                f"{hours:.2f} h on {table['device']} (synthetic CIFAR-100 sizes, {table['precision']}, "
                f"batch {BATCH_SIZE})",
            )
        )
    return out


def _accuracy_verdict(fit: Part, seeds: int) -> tuple[str, str, str]:
    goal = (
        f"the fast path's final accuracy within {PARITY_TOLERANCE} of the baseline loader's ({seeds} seed(s) "
        f"each, {PARITY_EPOCHS} epochs)"
    )
    done = [r for r in fit.rows if r["status"] == "completed" and r["compile"] is None]
    fast = {r["seed"]: r["final_test_acc"] for r in done if r["loader"] == "device"}
    base = {r["seed"]: r["final_test_acc"] for r in done if r["loader"] == "torchvision"}
    if not fast or not base:
        return goal, "not measured", _not_measured(fit)
    diff = abs(statistics.median(fast.values()) - statistics.median(base.values()))
    return (
        goal,
        "met" if diff <= PARITY_TOLERANCE else "not met",
        f"medians {statistics.median(fast.values()):.4f} (device loader, seeds {sorted(fast)}) vs "
        f"{statistics.median(base.values()):.4f} (torchvision, seeds {sorted(base)}): difference {diff:.4f}. "
        f"Indicative only: the tolerance is tests/test_parity.py's for medians of 6 seeds on CPU; none was measured "
        f"for {seeds} seed(s), whose median a single slow start can move by more than it",
    )


SO_FAR = [
    ("step", "command", ""),
    ("variant", "variant", ""),
    ("seed", "seed", ""),
    ("status", "status", ""),
    ("images_per_s", "images/s", ",.0f"),
    ("images_per_s_min", "slowest window", ",.0f"),
    ("images_per_s_max", "fastest window", ",.0f"),
    ("ratio", "x baseline", ".2f"),
    ("final_test_acc", "final acc", ".4f"),
    ("note", "note", ""),
]


def summary(parts: dict[str, Part], env: dict, *, smoke: bool, budget: float, used: float, setup: str) -> str:
    gpu = env.get("gpu_name")
    machine = (
        f"{gpu} (driver {env.get('driver_version')}, CUDA {env.get('cuda_version')}, cuDNN {env.get('cudnn_version')})"
        if gpu
        else "no GPU"
    )
    lines = [
        "# cifarbench GPU check",
        "",
        f"- machine: {machine}; {env.get('cpu_count')} CPUs; {env.get('hostname')}; {env.get('date')}",
        f"- software: Python {env.get('python_version')}, torch {env.get('torch_version')}, torchvision "
        f"{env.get('torchvision_version')}, lightning {env.get('lightning_version')}, submitit "
        f"{env.get('submitit_version')}; cifarbench at {env.get('git_commit') or 'an unknown commit'}",
        "- mode: "
        + (
            f"--smoke (CPU-sized: {SMOKE.model}, small synthetic data, timing windows of a few batches, K = "
            f"{SMOKE.fuse_k}, {SMOKE.seeds} seed of each loader, torch.compile skipped, a labelled error standing in "
            "for a run out of memory)"
            if smoke
            else f"full ({GPU.model}, synthetic100 {GPU.train_size:,} / {GPU.test_size:,} images, K = {GPU.fuse_k})"
        ),
        f"- time: {used:.0f} s of a {budget:.0f} s budget ({RESERVE_S} s of it kept for start-up and writing)",
        "- files: summary.md, tables.parquet (every table below; columns `part` and `table` say whose), env.json, "
        "log.txt (every command's output)",
    ]
    if env.get("probe_error"):
        lines.append(f"- the torch probe failed: {env['probe_error'].splitlines()[-1]}")
    lines += [f"- {line}" for line in setup.splitlines() if line.startswith("set-up:")]  # pip's output: log.txt
    lines += ["", "## Goals", ""]
    try:
        lines += [f"- **{verdict}**: {goal}: {detail}" for goal, verdict, detail in verdicts(parts, env)]
    except Exception as exc:  # figures of a shape nobody foresaw must not cost the tables below
        lines.append(f"- the verdicts could not be worked out: {type(exc).__name__}: {exc}")
    lines += ["", "## Parts", ""]
    rows = [
        {"part": p.name, "title": p.title, "status": p.state, "seconds": p.seconds, "budget": p.budget_s}
        | {"note": p.note}
        for p in parts.values()
    ]
    lines.append(
        markdown_table(
            rows,
            [
                ("part", "part", ""),
                ("title", "what", ""),
                ("status", "status", ""),
                ("seconds", "seconds", ".0f"),
                ("budget", "cap s", ".0f"),
                ("note", "note", ""),
            ],
        )
    )
    for part in parts.values():
        lines += ["", f"## {part.title}", "", f"Status: **{part.state}**" + (f": {part.note}" if part.note else "")]
        for section in part.sections:
            lines += ["", section]
        if part.rows and not part.sections:  # stopped before the part wrote its tables: what it had measured
            lines += ["", "Measured before the check was stopped:", "", markdown_table(part.rows, SO_FAR)]
        for step in part.steps:
            if step.status in ("failed", "timed out") and step.output:
                lines += ["", f"`{step.label}` {step.status} ({step.detail}); the end of its output:", ""]
                lines += ["```text", tail(step.output), "```"]
    return "\n".join(lines) + "\n"


def table(parts: dict[str, Part]) -> pa.Table:
    """Every table's rows in one: the parts' statuses, then each part's own rows."""
    rows = [
        {"part": p.name, "table": "parts", "variant": p.title, "status": p.state, "seconds": p.seconds}
        | {"budget_s": p.budget_s, "note": p.note}
        for p in parts.values()
    ]
    rows += [
        {"part": p.name, "table": {"fit": "fit", "grid": "grid"}.get(p.name, "bench"), **row}
        for p in parts.values()
        for row in p.rows
    ]
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # parts that disagree on a column's type: keep it as text
            columns[name] = pa.array([None if v is None else str(v) for v in values])
    return pa.table(columns)


def write_outputs(out: Path, parts: dict[str, Part], env: dict, **facts: Any) -> None:
    atomic.write_text(out / "summary.md", summary(parts, env, **facts))
    records.write_table(table(parts), out / "tables.parquet")


def cap_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Keep log.txt under ``limit`` bytes: its start and its end, which hold the set-up and the last failure."""
    size = path.stat().st_size
    if size <= limit:
        return
    with open(path, "rb") as fh:
        head = fh.read(limit // 4)
        fh.seek(size - (limit - limit // 4 - 200))
        end = fh.read()
    marker = f"\n[... {size - len(head) - len(end):,} bytes of output left out: the file was over {limit:,} ...]\n"
    atomic.write_bytes(path, head + marker.encode() + end)


def _parts_list(text: str) -> list[str]:
    try:
        return [check_name(name.strip(), PARTS, "part") for name in text.split(",") if name.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every error a cifarbench user can cause
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python3 scripts/gpu_check.py",
        description="The GPU check: the fast path against the baseline, fusion against packing and running in "
        "sequence, the fast path's accuracy, throughput levers, packing (MPS, a run out of memory) and a grid through "
        "submit and collect, each part in subprocesses with a time cap. Writes summary.md, tables.parquet, env.json "
        "and log.txt directly under OUT_DIR.",
    )
    p.add_argument("out", metavar="OUT_DIR", help="where the four files go (created if missing)")
    p.add_argument("--smoke", action="store_true", help="the same code paths at CPU size (a few minutes)")
    p.add_argument(
        "--budget",
        type=_seconds,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for all parts together (default {DEFAULT_BUDGET_S}); each part's cap scales with it",
    )
    p.add_argument("--only", type=_parts_list, help=f"run only these parts, e.g. fit,grid ({', '.join(PARTS)})")
    p.add_argument(
        "--fail-part",
        choices=list(PARTS),
        help="for tests: replace PART's first command with one that fails, to see the next part still run",
    )
    p.add_argument(
        "--kill-part",
        choices=list(PARTS),
        help="for tests: kill PART's first benchmark once it has written its first row, as its cap would",
    )
    p.add_argument("--setup-log", help="a file whose lines (scripts/gpu_check.sh's set-up) head log.txt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    size = SMOKE if args.smoke else GPU
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "log.txt").write_text("")
    except OSError as exc:
        return _cannot_write(out, exc)
    setup = Path(args.setup_log).read_text() if args.setup_log and Path(args.setup_log).is_file() else ""
    selected = args.only or list(PARTS)
    # caps scale with the budget; and where the selected parts' caps fit into this budget less the reserve,
    # each keeps its cap at the default budget (--only fuse,fit --budget 300 gives them what a whole check would)
    usable = max(args.budget - RESERVE_S, 0)
    scale = max(usable / (DEFAULT_BUDGET_S - RESERVE_S), min(1.0, usable / sum(size.budgets[n] for n in selected)))
    parts = {name: Part(name, title, size.budgets[name] * scale) for name, (title, _) in PARTS.items()}
    facts = dict(smoke=args.smoke, budget=args.budget, setup=setup)
    work = Path(tempfile.mkdtemp(prefix="cifarbench-gpu-check-"))

    def stop(signum, frame):  # a kill from outside still leaves the files, saying what ran
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with open(out / "log.txt", "a", encoding="utf-8") as log:  # appending: the subprocesses write into it too
            check = Check(
                log=log, work=work, size=size, budget=args.budget, fail_part=args.fail_part, kill_part=args.kill_part
            )
            log.write(setup)
            check.say(f"cifarbench GPU check{' (--smoke)' if args.smoke else ''}: {args.budget:.0f} s, into {out}")
            env = environment(check, args.smoke)
            check.gpus = env.get("gpu_count") or 0
            atomic.write_text(out / "env.json", json.dumps(env, indent=1) + "\n")

            def save() -> None:
                write_outputs(out, parts, env, used=time.monotonic() - check.started, **facts)

            check.saved = save
            try:
                for part in parts.values():
                    run_part(check, part, selected)
                    save()
            except BaseException:  # stopped mid-part
                save()
                raise
            statuses = ", ".join(f"{p.name} {p.state}" for p in parts.values())
            check.say(f"done in {time.monotonic() - check.started:.0f} s: {statuses}")
        cap_log(out / "log.txt")
    except OSError as exc:
        return _cannot_write(out, exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _cannot_write(out: Path, exc: OSError) -> int:
    print(f"gpu_check: error: cannot write to {out}: {exc.strerror or exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
