"""``python -m cifarbench.gpu_check OUT_DIR [--smoke] [--budget S] [--only PARTS]``: the GPU story in one
unattended run (``scripts/gpu_check.sh`` sets up the machine and calls this).

Four parts, each run as ``python -m cifarbench ...`` subprocesses with a timeout, so that a hang or a crash in one
leaves the others standing:

- ``levers``: ``cifarbench bench`` of the notebook-like baseline against the fast path, each lever flipped alone,
  torch.compile (default and reduce-overhead), projected minutes of a 200-epoch run;
- ``fit``: three 3-epoch runs through ``cifarbench run`` (the code a job runs): the fast path, the torchvision
  baseline loader (does the fast path keep the accuracy?) and the fast path compiled with CUDA graphs;
- ``pack``: ``cifarbench bench --what pack`` (1, 2, 4 and 8 resnet20 runs at once on the device against one alone;
  1 and 2 in --smoke); fusion is reported as not implemented until ``bench`` offers it;
- ``grid``: a 5-run grid through ``cifarbench submit --executor local --wait`` and ``cifarbench collect``.

Everything lands directly in OUT_DIR, in four files (the GPU machine returns one folder of at most 8 files):
``summary.md`` (every table and a verdict per goal), ``tables.parquet`` (every table's rows; ``part`` and
``table`` say whose), ``env.json`` and ``log.txt`` (every subprocess's output). summary.md and tables.parquet are
rewritten after each part, so a check killed from outside still leaves what it measured.

Each part has a time cap; the caps scale with ``--budget`` (default 480 s, all parts together). A part starts
only while the total budget lasts, and is cut off at its cap or the budget's end, whichever comes first. The exit
code is 0 whenever the files were written, whatever the parts did, and 2 when OUT_DIR cannot be written.

``--smoke`` runs the same code paths at CPU size (resnet20, small synthetic data, timing windows of a few batches,
torch.compile skipped since it takes minutes on a CPU), which is how tests keep this check from rotting.
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

DEFAULT_BUDGET_S = 480
MIN_START_S = 5  # a part or command given less than this would spend it starting Python
SPEEDUP_GOAL = 4.0  # fast path over the baseline, training images/s
MINUTES_GOAL = 4.0  # a projected 200-epoch run on an H100-class GPU
FUSE_GOAL = 6.0  # aggregate training images/s of a fused group of FUSE_K over one unfused run's
FUSE_K = 8
# the seed notebook's ResNet56/CIFAR-100 table: 9 configurations x 5 seeds, each configuration one fused group
TABLE_GROUPS, TABLE_SEEDS = 9, 5
FUSE_MODELS = ("resnet56", "resnet20")  # the table's model first: the projection needs it
# tests/test_parity.py's TOLERANCE: the run-to-run noise of final accuracy between the two loaders, measured on
# CPU over 6 seeds each (a test checks that the two stay equal)
PARITY_TOLERANCE = 0.05
FULL_TRAIN_SIZE = 50_000
BATCH_SIZE = 64
GRID_SEEDS = 5
LOG_LIMIT = 15 * 2**20  # the GPU machine returns files of at most 16 MiB
TAIL_LINES = 20
SOURCE = Path(cifarbench.__file__).resolve().parent.parent  # the tree this cifarbench runs from
FORCED_FAILURE = "import sys; sys.exit('forced failure (--fail-part)')"
NO_COMPILE_IN_SMOKE = "--smoke: torch.compile takes minutes on a CPU"


@dataclass(frozen=True, kw_only=True)
class Size:
    """What the parts run: the real check on a GPU, or its CPU-sized smoke version."""

    model: str
    train_size: int  # synthetic100 of parts levers and fit
    test_size: int
    bench_timing: tuple[str, ...]  # extra `cifarbench bench` arguments
    compile: bool
    grid_train_size: int  # synthetic10 of part grid
    grid_test_size: int
    budgets: dict[str, int]  # part -> seconds at the default total budget


GPU = Size(
    model="resnet56",
    train_size=FULL_TRAIN_SIZE,
    test_size=10_000,
    bench_timing=(),
    compile=True,
    grid_train_size=1000,
    grid_test_size=200,
    budgets={"levers": 175, "fit": 135, "pack": 95, "grid": 75},
)
SMOKE = Size(  # two batches an epoch: on a busy 2-core CPU resnet20 trains at a few dozen images/s
    model="resnet20",
    train_size=128,
    test_size=64,
    bench_timing=("--steps", "1", "--warmup", "1", "--repeats", "1"),
    compile=False,
    grid_train_size=128,
    grid_test_size=64,
    budgets={"levers": 145, "fit": 145, "pack": 70, "grid": 120},
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
        return self.status or "not run"


class Check:
    """The run of every part: the work folder, log.txt, the clock and the subprocesses."""

    def __init__(self, *, log: Any, work: Path, size: Size, budget: float, fail_part: str | None):
        self.log, self.work, self.size = log, work, size
        self.budget, self.fail_part = budget, fail_part
        self.started = time.monotonic()
        self.data = work / "data"
        self.written: set[str] = set()  # datasets written in this check
        paths = [str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}

    def say(self, line: str) -> None:
        """A progress line, to log.txt and stdout (the GPU machine shows the end of stdout)."""
        self.log.write(line + "\n")
        self.log.flush()
        print(line, flush=True)

    def left(self) -> float:
        return self.started + self.budget - time.monotonic()

    def step(self, part: Part, label: str, args: list[str], *, skip: str | None = None) -> Step:
        """Run ``cifarbench ARGS`` until it ends or the part's time is up; its output goes to log.txt."""
        if skip:
            step = Step(label, "skipped", skip)
            self.say(f"[{part.name}] {label}: skipped: {skip}")
        elif part.deadline - time.monotonic() < MIN_START_S:
            step = Step(label, "timed out", "not started: the part's time was used up")
            self.say(f"[{part.name}] {label}: {step.detail}")
        else:
            step = self._run(part, label, args)
        part.steps.append(step)
        return step

    def _run(self, part: Part, label: str, args: list[str]) -> Step:
        timeout = part.deadline - time.monotonic()
        forced = self.fail_part == part.name and not part.steps
        command = [sys.executable, "-c", FORCED_FAILURE] if forced else [sys.executable, "-m", "cifarbench", *args]
        shown = "cifarbench " + " ".join(args) + (" (replaced by a forced failure: --fail-part)" if forced else "")
        self.say(f"[{part.name}] {label}: {shown} (up to {timeout:.0f} s)")
        log_path = Path(self.log.name)
        start = log_path.stat().st_size
        began = time.monotonic()
        # a session of its own: on a timeout the whole group goes, DataLoader workers and local jobs included
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
            env=self.env,
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):  # none of the group left
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - began
        with open(log_path, "rb") as fh:
            fh.seek(start)
            output = fh.read().decode("utf-8", errors="replace")
        if code == 0:
            step = Step(label, "ok", seconds=seconds, output=output)
        elif code is None:
            step = Step(label, "timed out", f"killed after {seconds:.0f} s", seconds, output)
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


def part_levers(check: Check, part: Part) -> None:
    size = check.size
    if not check.dataset(part, "synthetic100", size.train_size, size.test_size):
        return
    common = ["--model", size.model, "--dataset", "synthetic100", "--batch-size", str(BATCH_SIZE)]
    common += ["--data-root", str(check.data), *size.bench_timing]
    # Two commands where one would do: bench writes its table only at its end, so a compile that overruns or
    # hangs must not take the levers' figures with it.
    for label, args, skip in (
        ("levers", ["--what", "all", "--levers"], None),
        ("compile", ["--what", "train", "--compile"], None if size.compile else NO_COMPILE_IN_SMOKE),
    ):
        results = check.work / f"bench-{label}"
        check.step(part, f"bench {label}", ["bench", *args, *common, "--results", str(results)], skip=skip)
        for path in sorted(Layout(results).bench.glob("*.parquet")):
            part.rows += [{"step": label, **row} for row in pq.read_table(path).to_pylist()]
    if part.rows:
        first = part.rows[0]
        part.sections.append(
            f"{first['model'] or size.model}, {first['dataset']}, batch {first['batch_size']}, on {first['device']} "
            f"(torch {first['torch_version']}, CUDA {first['cuda_version']}); 1-minute load average at the end "
            f"{_cell(first['load_avg'], '.2f')}. `x baseline`: images/s over the baseline row's of the same command "
            "and `what`; `x fast`: over the fast path's.\n\n"
            + markdown_table(
                part.rows,
                [
                    ("step", "command", ""),
                    ("what", "what", ""),
                    ("variant", "variant", ""),
                    ("precision", "precision", ""),
                    ("images_per_s", "images/s", ",.0f"),
                    ("ratio", "x baseline", ".2f"),
                    ("ratio_to_fast_path", "x fast", ".2f"),
                    ("eval_images_per_s", "test images/s", ",.0f"),
                    ("minutes_200_epochs", "200 ep min", ",.1f"),
                    ("note", "note", ""),
                ],
            )
        )


FIT_RUNS = (  # label, loader, compile mode
    ("fast path", "device", None),
    ("baseline loader (torchvision)", "torchvision", None),
    ("fast path + torch.compile reduce-overhead", "device", "reduce-overhead"),
)


def part_fit(check: Check, part: Part) -> None:
    size = check.size
    if not check.dataset(part, "synthetic100", size.train_size, size.test_size):
        return
    results = check.work / "fit"
    for label, loader, mode in FIT_RUNS:
        spec = RunSpec(
            model=size.model,
            dataset="synthetic100",
            recipe=get_recipe("cos-200"),  # the recipe tests/test_parity.py measured its tolerance with
            batch_size=BATCH_SIZE,
            seed=0,
            epochs=3,
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
        step = check.step(part, f"run {label}", args, skip=None if size.compile or not mode else NO_COMPILE_IN_SMOKE)
        if step.status == "skipped":
            continue
        record = records.read_record(Layout(results).record(spec.run_id))
        if step.status == "ok" and (record is None or record["status"] != "completed"):
            part.problems.append(f"run {label} exited 0 without a completed record")
        part.rows.append(_fit_row(label, step, record, size))
    part.sections.append(
        "One seed each, 3 epochs of cos-200 on synthetic100 "
        f"({size.train_size:,} / {size.test_size:,} images), batch {BATCH_SIZE}. images/s: the record's mean over "
        "epochs (the first includes warm-up and compiling); `200 ep min`: 200 times the last epoch (training and "
        "test pass)"
        + (f", scaled to {FULL_TRAIN_SIZE:,} training images" if size.train_size != FULL_TRAIN_SIZE else "")
        + ".\n\n"
        + markdown_table(
            part.rows,
            [
                ("variant", "run", ""),
                ("status", "status", ""),
                ("epochs_done", "epochs", ""),
                ("final_test_acc", "final acc", ".4f"),
                ("best_test_acc", "best acc", ".4f"),
                ("images_per_s", "images/s", ",.0f"),
                ("last_epoch_seconds", "last epoch s", ".1f"),
                ("minutes_200_epochs", "200 ep min", ",.1f"),
                ("precision", "precision", ""),
                ("note", "note", ""),
                ("seconds", "wall s", ".0f"),
            ],
        )
    )


def _fit_row(label: str, step: Step, record: dict | None, size: Size) -> dict:
    row: dict[str, Any] = {"variant": label, "seconds": step.seconds}
    if record is None:
        return {**row, "status": f"no record ({step.status})"}
    keys = ["run_id", "model", "dataset", "batch_size", "seed", "loader", "compile", "status", "epochs_done"]
    keys += ["final_test_acc", "best_test_acc", "images_per_s", "train_seconds", "torch_version"]
    row |= {key: record[key] for key in keys}
    row |= {"precision": record["precision_used"], "device": record["device_name"]}
    row["note"] = f"trained eagerly: {record['compile_fallback']}" if record["compile_fallback"] else record["error"]
    if record["epoch_seconds"]:
        last = record["epoch_seconds"][-1]
        row["last_epoch_seconds"] = last
        row["minutes_200_epochs"] = 200 * last * FULL_TRAIN_SIZE / size.train_size / 60
    return row


PACKS = {"gpu": "1,2,4,8", "smoke": "1,2"}  # runs at once, part pack
PACK_GOAL = 3.0  # aggregate images/s of packed runs over one run alone, on a GPU


def part_pack(check: Check, part: Part) -> None:
    step = check.step(part, "bench --help", ["bench", "--help"])
    if step.status != "ok":
        return
    found = re.search(r"--what \{([^}]*)\}", step.output)
    if found is None:
        part.problems.append("bench --help shows no --what {...} choices to look for pack and fuse in")
        return
    choices = found.group(1).split(",")
    unknown = [c for c in choices if c not in ("pipeline", "train", "all", "pack", "fuse")]
    if unknown:
        part.problems.append(
            f"bench --what offers {', '.join(unknown)}, which this check does not know: add it to "
            "cifarbench/gpu_check.py"
        )
    if "pack" not in choices and "fuse" not in choices:
        part.status = "skipped"
        part.note = f"not implemented yet: bench --what offers {', '.join(choices)}, no pack or fuse"
        return
    if "pack" in choices:
        _pack_rows(check, part)
    if "fuse" in choices and check.size is not SMOKE:  # K models at once: a GPU's measurement
        _fuse_rows(check, part)
    elif "fuse" in choices:
        part.sections.append("Fusion: measured on a GPU only, not at smoke size.")


def _pack_rows(check: Check, part: Part) -> None:
    size = check.size
    if not check.dataset(part, "synthetic10", size.grid_train_size, size.grid_test_size):
        return
    packs = PACKS["smoke" if size is SMOKE else "gpu"]
    results = check.work / "bench-pack"
    args = ["bench", "--what", "pack", "--pack", packs, "--model", "resnet20", "--dataset", "synthetic10"]
    args += ["--batch-size", str(BATCH_SIZE), "--data-root", str(check.data), *size.bench_timing]
    check.step(part, "bench pack", [*args, "--results", str(results)])
    for path in sorted(Layout(results).bench.glob("*.parquet")):
        part.rows += pq.read_table(path).to_pylist()
    rows = [r for r in part.rows if r["what"] == "pack"]
    if rows:
        first = rows[0]
        part.sections.append(
            f"`cifarbench bench --what pack --pack {packs}`: resnet20, batch {BATCH_SIZE}, on {first['device']} "
            f"(torch {first['torch_version']}); 1-minute load average at the end {_cell(first['load_avg'], '.2f')}. "
            "images/s: all runs together; `x one run`: over one run alone; `slowdown`: one run alone's images/s "
            f"over each packed run's (median); peak: {first['note'].partition('peak: ')[2]}.\n\n"
            + markdown_table(
                rows,
                [
                    ("pack", "runs at once", ""),
                    ("variant", "variant", ""),
                    ("images_per_s", "images/s", ",.0f"),
                    ("ratio", "x one run", ".2f"),
                    ("per_run_images_per_s", "per run", ",.0f"),
                    ("slowdown", "slowdown", ".2f"),
                    ("peak_memory_mb", "peak MB", ",.0f"),
                    ("torch_threads", "threads", ""),
                ],
            )
        )


def _fuse_rows(check: Check, part: Part) -> None:
    if not check.dataset(part, "synthetic100", check.size.train_size, check.size.test_size):
        return
    sizes = ",".join(str(k) for k in sorted({1, TABLE_SEEDS, FUSE_K}))
    for model in FUSE_MODELS:
        results = check.work / f"bench-fuse-{model}"
        args = ["bench", "--what", "fuse", "--model", model, "--dataset", "synthetic100", "--batch-size"]
        args += [str(BATCH_SIZE), "--precision", "bf16-mixed", "--fuse", sizes, "--data-root", str(check.data)]
        check.step(
            part,
            f"fuse {model}",
            [*args, "--steps", "10", "--warmup", "3", "--repeats", "2"] + ["--results", str(results)],
        )
        for path in sorted(Layout(results).bench.glob("*.parquet")):
            part.rows += [{"step": f"fuse {model}", **row} for row in pq.read_table(path).to_pylist()]
    fused = [r for r in part.rows if r["what"] == "fuse"]
    if fused:
        part.sections.append(
            f"Fused groups of K seeds (`bench --what fuse`), batch {BATCH_SIZE}, bf16: aggregate training images/s "
            "of the group; `x baseline`: over one unfused run's (K unfused runs in sequence reach the same); "
            "`200 ep min`: the whole group's 200-epoch CIFAR run.\n\n"
            + markdown_table(
                fused,
                [
                    ("model", "model", ""),
                    ("variant", "variant", ""),
                    ("images_per_s", "images/s", ",.0f"),
                    ("ratio", "x baseline", ".2f"),
                    ("eval_images_per_s", "test images/s", ",.0f"),
                    ("minutes_200_epochs", "200 ep min", ",.1f"),
                    ("note", "note", ""),
                ],
            )
        )


def fuse_rows(rows: list[dict], model: str, k: int) -> tuple[dict | None, dict | None]:
    """The unfused row and the fused group of ``k``'s row of ``model`` in part pack's rows."""
    mine = [r for r in rows if r["model"] == model and r["what"] == "fuse"]
    alone = next((r for r in mine if r["baseline"]), None)
    group = next((r for r in mine if r["variant"] == f"fused group of {k}" and r["images_per_s"]), None)
    return alone, group


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
    "levers": ("1. Throughput levers (`cifarbench bench`)", part_levers),
    "fit": ("2. A real short fit (`cifarbench run`)", part_fit),
    "pack": ("3. Packing and fusion benchmarks", part_pack),
    "grid": ("4. The whole path: `submit --executor local --wait`, then `collect`", part_grid),
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


def probe() -> None:
    """Print the training stack's versions and the GPU's memory as JSON (run in a subprocess of its own: a
    broken CUDA set-up fails there, not in the check)."""
    import lightning
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    free, total = torch.cuda.mem_get_info() if cuda else (None, None)
    print(
        json.dumps(
            {
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
            }
        )
    )


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
    check.say("[env] torch, CUDA and the GPU (python -c 'cifarbench.gpu_check.probe()')")
    try:
        out = subprocess.run(
            [sys.executable, "-c", "from cifarbench.gpu_check import probe; probe()"],
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


def verdicts(parts: dict[str, Part], env: dict) -> list[tuple[str, str, str]]:
    """(goal, met | not met | not measured, the figure and where it comes from)."""
    gpu = env.get("gpu_name")
    where = "" if gpu else "; on a CPU, while the goal is a GPU's"
    out = []

    goal = f"fast path >= {SPEEDUP_GOAL:g}x the baseline's training images/s"
    train = [r for r in parts["levers"].rows if r["what"] == "train"]
    fast = next((r for r in train if r["variant"] == "fast path" and r["ratio"] is not None), None)
    if fast is None:
        out.append((goal, "not measured", f"part levers: {parts['levers'].state}"))
    else:
        base = next(r for r in train if r["baseline"] and r["step"] == fast["step"])
        best = max((r for r in train if r["step"] == fast["step"] and r["ratio"]), key=lambda r: r["ratio"])
        out.append(
            (
                goal,
                "met" if fast["ratio"] >= SPEEDUP_GOAL else "not met",
                f"{fast['ratio']:.2f}x: {fast['images_per_s']:,.0f} vs {base['images_per_s']:,.0f} images/s "
                f"({fast['model']}, batch {fast['batch_size']}, {fast['device']}; bench {fast['step']})"
                + (f"; best: {best['variant']}, {best['ratio']:.2f}x" if best is not fast else "")
                + where,
            )
        )

    goal = f"a 200-epoch run projected at <= {MINUTES_GOAL:g} minutes on an H100-class GPU"
    projections = [
        (r["minutes_200_epochs"], f"bench {r['step']}: {r['variant']}")
        for r in parts["levers"].rows
        if r.get("minutes_200_epochs") is not None
    ] + [
        (r["minutes_200_epochs"], f"run {r['variant']}, from its last epoch")
        for r in parts["fit"].rows
        if r.get("minutes_200_epochs") is not None and r["status"] == "completed"
    ]
    if not projections:
        out.append((goal, "not measured", f"parts levers: {parts['levers'].state}, fit: {parts['fit'].state}"))
    else:
        minutes, source = min(projections)
        others = "; ".join(f"{m:,.1f} min ({s})" for m, s in sorted(projections)[1:])
        out.append(
            (
                goal,
                "met" if minutes <= MINUTES_GOAL else "not met",
                f"{minutes:,.1f} min ({source})"
                + (f"; also {others}" if others else "")
                + ("" if _h100_class(gpu) else f"; measured on {gpu or 'a CPU'}, not an H100-class GPU"),
            )
        )

    goal = f"the fast path's final accuracy within {PARITY_TOLERANCE} of the baseline loader's"
    fit = {r["variant"]: r for r in parts["fit"].rows if r["status"] == "completed"}
    fast_run, base_run = fit.get(FIT_RUNS[0][0]), fit.get(FIT_RUNS[1][0])
    if fast_run is None or base_run is None:
        out.append((goal, "not measured", f"part fit: {parts['fit'].state}"))
    else:
        diff = abs(fast_run["final_test_acc"] - base_run["final_test_acc"])
        out.append(
            (
                goal,
                "met" if diff <= PARITY_TOLERANCE else "not met",
                f"{fast_run['final_test_acc']:.4f} (device loader) vs {base_run['final_test_acc']:.4f} (torchvision): "
                f"difference {diff:.4f}; one seed each, so only indicative (the tolerance is tests/test_parity.py's, "
                "a median over 6 seeds measured on CPU)",
            )
        )

    goal = "a run compiled with reduce-overhead (CUDA graphs) completes without falling back to eager"
    compiled = next((r for r in parts["fit"].rows if r["variant"] == FIT_RUNS[2][0]), None)
    if compiled is None:
        skipped = any(s.status == "skipped" and "compile" in s.label for s in parts["fit"].steps)
        out.append((goal, "not measured", NO_COMPILE_IN_SMOKE if skipped else f"part fit: {parts['fit'].state}"))
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

    goal = f"the whole path on this node: {GRID_SEEDS} of {GRID_SEEDS} grid runs completed, then collected"
    grid = parts["grid"]
    if not grid.rows:
        out.append((goal, "not measured", f"part grid: {grid.state}" + (f" ({grid.note})" if grid.note else "")))
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

    pack = parts["pack"]
    goal = f"{PACK_GOAL:g}x the aggregate training images/s with runs packed onto one GPU (resnet20, batch 64)"
    packed = [r for r in pack.rows if r["what"] == "pack"]
    measured = [r for r in packed if r.get("ratio") is not None and r["pack"] > 1]  # beside one run alone
    top = max(measured, key=lambda r: r["ratio"]) if measured else None
    if top is None:
        out.append((goal, "not measured", f"part pack: {pack.state}" + (f": {pack.note}" if pack.note else "")))
    else:
        out.append(
            (
                goal,
                "met" if top["ratio"] >= PACK_GOAL and gpu else "not met",
                f"{top['ratio']:.2f}x with {top['pack']} runs at once ({top['variant']}): "
                f"{top['images_per_s']:,.0f} vs {packed[0]['images_per_s']:,.0f} images/s, each run "
                f"{top['slowdown']:.2f}x slower, on {top['device']}" + where,
            )
        )
    goal = f"a fused group of {FUSE_K} seeds >= {FUSE_GOAL:g}x one run's training images/s ({', '.join(FUSE_MODELS)})"
    groups = {model: fuse_rows(pack.rows, model, FUSE_K)[1] for model in FUSE_MODELS}
    if not any(groups.values()):
        out.append((goal, "not measured", f"part pack: {pack.state}" + (f": {pack.note}" if pack.note else "")))
    else:
        met = bool(gpu) and all(g is not None and g["ratio"] >= FUSE_GOAL for g in groups.values())
        figures = ", ".join(f"{m} {'-' if g is None else format(g['ratio'], '.2f')}x" for m, g in groups.items())
        device = next(g["device"] for g in groups.values() if g)
        out.append((goal, "met" if met else "not met", f"{figures} on {device}{where}"))
    _, group = fuse_rows(pack.rows, FUSE_MODELS[0], TABLE_SEEDS)
    if group is not None:
        hours = TABLE_GROUPS * group["minutes_200_epochs"] / 60
        out.append(
            (
                f"projected: the {TABLE_GROUPS * TABLE_SEEDS}-run {FUSE_MODELS[0]} table (200 epochs, "
                f"{TABLE_GROUPS} fused groups of {TABLE_SEEDS}, one after another on this device)",
                "measured",
                f"{hours:.2f} h on {group['device']} (synthetic CIFAR-100 sizes, bf16, batch {BATCH_SIZE})",
            )
        )
    return out


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
            f"--smoke (CPU-sized: {SMOKE.model}, small synthetic data, timing windows of a few batches, "
            "torch.compile skipped)"
            if smoke
            else f"full ({GPU.model}, synthetic100 {GPU.train_size:,} / {GPU.test_size:,} images)"
        ),
        f"- time: {used:.0f} s of a {budget:.0f} s budget",
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
    kinds = {"levers": "bench", "fit": "fit", "pack": "bench", "grid": "grid"}
    rows += [{"part": p.name, "table": kinds[p.name], **row} for p in parts.values() for row in p.rows]
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
        prog="python -m cifarbench.gpu_check",
        description="The GPU check: throughput levers, a short real fit, packing and fusion, and a grid through "
        "submit and collect, each part in subprocesses with a time cap. Writes summary.md, tables.parquet, "
        "env.json and log.txt directly under OUT_DIR.",
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
    scale = args.budget / DEFAULT_BUDGET_S
    parts = {name: Part(name, title, size.budgets[name] * scale) for name, (title, _) in PARTS.items()}
    facts = dict(smoke=args.smoke, budget=args.budget, setup=setup)
    work = Path(tempfile.mkdtemp(prefix="cifarbench-gpu-check-"))

    def stop(signum, frame):  # a kill from outside still leaves the files, saying what ran
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with open(out / "log.txt", "a", encoding="utf-8") as log:  # appending: the subprocesses write into it too
            check = Check(log=log, work=work, size=size, budget=args.budget, fail_part=args.fail_part)
            log.write(setup)
            check.say(f"cifarbench GPU check{' (--smoke)' if args.smoke else ''}: {args.budget:.0f} s, into {out}")
            env = environment(check, args.smoke)
            atomic.write_text(out / "env.json", json.dumps(env, indent=1) + "\n")
            try:
                for part in parts.values():
                    run_part(check, part, args.only or list(PARTS))
                    write_outputs(out, parts, env, used=time.monotonic() - check.started, **facts)
            except BaseException:  # stopped mid-part
                write_outputs(out, parts, env, used=time.monotonic() - check.started, **facts)
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
