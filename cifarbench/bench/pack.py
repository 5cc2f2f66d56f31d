"""K runs packed onto one device, each in a process of its own as a packed job trains them, against one run
alone; and the isolation of a packed run that fails: one of K runs given a batch too big for the device's
memory must fail alone while the others complete."""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cifarbench.bench import rows, timing
from cifarbench.bench.timing import Rate
from cifarbench.bench.train import model_and_optimiser, training_step
from cifarbench.config.spec import DATASETS
from cifarbench.errors import plural
from cifarbench.system import allowed_cores, usable_cores
from cifarbench.train import data
from cifarbench.train.fit import FastPath
from cifarbench.train.pack import mps_server, shares

# On a CPU no batch can be made to fail safely: it would take the machine's memory, not a device's, so a labelled
# error stands in for the out-of-memory error there, and the isolation around it is what is tested.
CPU_STAND_IN = "stand-in for out of memory on a CPU (no huge batch is allocated there)"


def _huge_batch(device: torch.device) -> int:
    """Images in a batch whose input alone takes an eighth of the device's memory: the activations of its first
    layers outgrow the rest, whatever the device's size."""
    total = torch.cuda.get_device_properties(device).total_memory
    return total // (8 * 3 * 32 * 32 * 4)


def _out_of_memory(step, device: torch.device) -> str | None:
    """Train one step on a deliberately huge batch; what it failed with, None if it did not fail."""
    if device.type != "cuda":
        return f"RuntimeError: {CPU_STAND_IN}"
    huge = _huge_batch(device)
    try:
        x = torch.randn(huge, 3, 32, 32, device=device)
        step(x, torch.zeros(huge, dtype=torch.long, device=device))
    except torch.OutOfMemoryError as exc:
        return f"OutOfMemoryError with a batch of {huge:,}: {exc}".splitlines()[0]
    except Exception as exc:  # cuDNN may refuse a batch this size before memory runs out: a failure, said as such
        return f"not out of memory but {type(exc).__name__} with a batch of {huge:,}: {exc}".splitlines()[0]
    return None


def _packed_run(task: dict, warmed, barrier, out) -> None:
    """One of the concurrent runs, in a process of its own: warm up, wait for every run to be warm (``warmed``),
    then time ``repeats`` windows of ``steps`` fast-path training steps, each window started together with the
    other runs' (``barrier``). The run with ``oom``, once the others are warm, trains one step on a huge batch
    instead, reports how it failed and exits 1, as a run that runs out of memory does. It goes only after the
    others' warm-up because by then their memory is allocated: what is checked is that its failure stays its own,
    not whether they could have started beside it."""
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
    net, opt = model_and_optimiser(
        task["model"], classes, device, channels_last=fast.channels_last, fused=fast.fused_sgd
    )
    step, batches = training_step(net, opt, fast.precision, device), timing.batches(loader)
    if task["oom"]:
        warmed.wait()
        failed = _out_of_memory(step, device)
        out.put({"index": task["index"], "failed": failed or "did not fail: the huge batch fitted in memory"})
        if failed:
            raise SystemExit(1)
        return
    for _ in range(task["warmup"]):
        step(*next(batches))
    timing.sync(device)
    warmed.wait()
    windows = []
    for _ in range(task["repeats"]):
        timing.sync(device)
        barrier.wait()
        start, images = time.monotonic(), 0
        for _ in range(task["steps"]):
            x, y = next(batches)
            step(x, y)
            images += len(y)
        timing.sync(device)
        windows.append((start, time.monotonic(), images))
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "device memory allocated by torch"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "resident memory (RSS)"
    out.put({"index": task["index"], "windows": windows, "peak": peak, "kind": kind, "precision": fast.precision})


def _pack(task: dict, k: int, *, oom: bool) -> list[dict]:
    """Start K runs (the first one made to run out of memory with ``oom``) and gather their reports."""
    spawn = multiprocessing.get_context("spawn")  # a CUDA context does not survive fork
    threads, cores = shares(k, usable_cores(), allowed_cores())
    # every run waits for `warmed` once; the failing run never reaches `barrier`, which starts each timed window
    warmed, barrier, out = spawn.Barrier(k), spawn.Barrier(k - oom), spawn.Queue()
    procs = [
        spawn.Process(
            target=_packed_run,
            args=(
                {**task, "index": i, "threads": threads, "cores": cores[i] if cores else None, "oom": oom and i == 0},
                warmed,
                barrier,
                out,
            ),
        )
        for i in range(k)
    ]
    for proc in procs:
        proc.start()
    runs = timing.gather(procs, out, "a run of the packing benchmark")
    for run, proc in zip(runs, procs):
        run |= {"exitcode": proc.exitcode, "threads": threads}
    return runs


def _row(runs: list[dict]) -> dict:
    """The figures of the runs that trained: the aggregate images/s of each window (all their images over the
    time from the first start to the last end), each run's own images/s, their peaks summed."""
    done = [r for r in runs if "windows" in r]
    aggregate = Rate.of(
        sum(w[2] for w in window) / (max(w[1] for w in window) - min(w[0] for w in window))
        for window in zip(*(r["windows"] for r in done))
    )
    own = [sum(w[2] for w in r["windows"]) / sum(w[1] - w[0] for w in r["windows"]) for r in done]
    return {
        **aggregate.columns(),
        "per_run_images_per_s": statistics.median(own),
        "peak_memory_mb": sum(r["peak"] for r in done) / 2**20,
        "precision": done[0]["precision"],
        "torch_threads": done[0]["threads"],
        "note": f"{done[0]['threads']} threads per run; peak: {done[0]['kind']}, summed over the runs",
    }


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
    isolation: bool = False,
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 3,
) -> Iterator[dict]:
    """Rows as they are measured: the aggregate training images/s of K fast-path runs at once on ``device`` (on a
    CPU each with its share of the cores), against one run alone (K = 1, always measured first). All runs warm up,
    then time ``repeats`` windows of ``steps`` steps, each window started together; images/s is the median window's
    aggregate. Also each run's own images/s (the median run's), its slowdown against the run alone, and the peak
    memory of the runs together. ``isolation`` adds a row of the largest K with one run out of memory (on a GPU a
    deliberately huge batch; on a CPU a labelled error stands in), which says which runs failed."""
    packs = sorted({1, *packs})
    common: dict[str, Any] = dict(
        device=device, model=model, dataset=dataset, batch_size=batch_size, loader="device", workers=0
    )
    common |= dict(steps=steps, warmup=warmup, repeats=repeats)
    task = dict(model=model, dataset=dataset, root=str(root), batch_size=batch_size, precision=precision)
    task |= dict(device=str(device), warmup=warmup, steps=steps, repeats=repeats)
    alone: dict = {}
    with tempfile.TemporaryDirectory(prefix="cifarbench-bench-pack-") as tmp, mps_server(mps, Path(tmp)) as shared:
        label, env = shared
        os.environ.update(env)  # the spawned runs are clients of the MPS server
        sharing = f", MPS {label}" if label else ""
        for k in packs:
            row = _row(_pack(task, k, oom=False))
            alone = alone or row
            variant = f"{plural(k, 'run')} at once" + (sharing if k > 1 else "")
            row |= {"variant": variant, "baseline": k == 1, "pack": k, "what": "pack"}
            row["slowdown"] = alone["per_run_images_per_s"] / row["per_run_images_per_s"]
            yield rows.finish(row, base=alone["images_per_s"], **common)
        if isolation and packs[-1] > 1:
            k = packs[-1]
            runs = _pack(task, k, oom=True)
            failed = [r for r in runs if r["exitcode"] != 0]
            row = _row(runs) | {"what": "isolation", "pack": k, "baseline": False, "failed_runs": len(failed)}
            row["variant"] = f"{plural(k, 'run')} at once{sharing}, run 0 out of memory"
            which = ", ".join(f"run {r['index']}" for r in failed) or "none"
            row["note"] = (
                f"run 0: {runs[0]['failed']}; failed: {which}; "
                f"{sum('windows' in r for r in runs[1:])} of {k - 1} others completed; " + row["note"]
            )
            yield rows.finish(row, base=alone["images_per_s"], **common)
