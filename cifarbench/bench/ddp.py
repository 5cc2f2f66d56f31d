"""One run's training steps on W processes (DDP, one device each: NCCL on GPUs, gloo on CPUs) against the same
global batch on one process: images/s of each and the scaling efficiency, images/s with W / (W x images/s with 1).

The W processes train as a multi-device run does (``train.ddp``): each rank its slice of every global batch of the
device loader, BatchNorm over the global batch, the loss scaled so that DDP's averaged gradient is the global
batch's. On a CPU a "device" is a share of the cores: one process with cores / W threads against W processes with
as many each, so the efficiency says what the processes cost, not what more cores give. On a machine with fewer
GPUs than W there is nothing to measure, and the row says so instead of giving a figure."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from cifarbench.bench import rows, timing
from cifarbench.bench.timing import Rate
from cifarbench.bench.train import model_and_optimiser
from cifarbench.config.spec import DATASETS
from cifarbench.errors import plural
from cifarbench.system import usable_cores
from cifarbench.train import data
from cifarbench.train.ddp import global_batchnorm, rank_loss
from cifarbench.train.fit import FastPath
from cifarbench.train.module import AUTOCAST


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(task: dict, rank: int, out) -> None:
    """Rank ``rank`` of ``task["world"]``: warm up, then time ``repeats`` windows of ``steps`` steps, each window
    started together (a barrier); report the windows' (start, end) and the global images they took."""
    world = task["world"]
    torch.set_num_threads(task["threads"])
    device = torch.device(task["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(task["port"]))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    fast = FastPath.for_device(device, task["precision"])
    if device.type == "cuda":  # as a run sets them
        torch.backends.cudnn.benchmark = fast.cudnn_benchmark
        torch.set_float32_matmul_precision("high")
    images, labels = data.load_arrays(task["dataset"], task["root"], train=True)
    loader = data.DeviceLoader(
        images,
        labels,
        num_classes=DATASETS[task["dataset"]].num_classes,
        batch_size=task["batch_size"],
        train=True,
        device=device,
        memory_format=fast.memory_format,
        rank=rank,
        world_size=world,
    )
    classes = DATASETS[task["dataset"]].num_classes
    net, opt = model_and_optimiser(task["model"], classes, device, channels_last=fast.channels_last, fused=False)
    model: Any = net
    if world > 1:
        model = DistributedDataParallel(
            global_batchnorm(net), device_ids=[device.index] if device.type == "cuda" else None
        )
    dtype = AUTOCAST[fast.precision]
    scaler = torch.amp.GradScaler(device.type) if fast.precision == "16-mixed" else None

    def step(x: torch.Tensor, y: torch.Tensor, global_n: int) -> None:
        """A training step as ``bench.train.training_step``'s, with a rank's loss (``train.ddp.rank_loss``)."""
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = rank_loss(F.cross_entropy(model(x), y, reduction="sum"), global_n=global_n, world_size=world)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        # full global batches only, on every rank alike: an epoch's short last batch would tune cudnn again
        # inside a timed window (timing.batches)
        epoch, full = 0, loader.global_batch(0)
        while True:
            loader.set_epoch(epoch)
            for i, (x, y) in enumerate(loader):
                if loader.global_batch(i) == full:
                    yield x, y, full
            epoch += 1

    stream = batches()
    for _ in range(task["warmup"]):
        step(*next(stream))
    windows = []
    for _ in range(task["repeats"]):
        timing.sync(device)
        if world > 1:
            dist.barrier()
        start, taken = time.monotonic(), 0
        for _ in range(task["steps"]):
            x, y, n = next(stream)
            step(x, y, n)
            taken += n
        timing.sync(device)
        windows.append((start, time.monotonic(), taken))
    out.put({"index": rank, "windows": windows, "precision": fast.precision})
    if world > 1:
        dist.destroy_process_group()


def _run(task: dict) -> list[dict]:
    """Start the ranks of ``task`` and gather their reports (``timing.gather``)."""
    spawn = multiprocessing.get_context("spawn")  # a CUDA context does not survive fork
    out = spawn.Queue()
    task = {**task, "port": _free_port()}
    procs = [spawn.Process(target=_rank, args=(task, r, out)) for r in range(task["world"])]
    for proc in procs:
        proc.start()
    return timing.gather(procs, out, "a rank of the DDP benchmark")


def _rate(reports: list[dict]) -> Rate:
    """Global images/s of each window: its images over the time from the first rank's start to the last's end."""
    return Rate.of(
        window[0][2] / (max(w[1] for w in window) - min(w[0] for w in window))
        for window in zip(*(r["windows"] for r in reports))
    )


def bench_ddp(
    *,
    model: str,
    dataset: str,
    root: str | Path,
    batch_size: int,
    device: torch.device,
    processes: int = 2,
    precision: str = "auto",
    steps: int = 20,
    warmup: int = 5,
    repeats: int = 3,
) -> Iterator[dict]:
    """Rows as they are measured: one process (the baseline), then ``processes`` processes, each training the same
    global batch of ``batch_size``; the second row's ``efficiency`` is its images/s over ``processes`` x the
    baseline's. Where ``device`` is a GPU and this machine has fewer than ``processes`` of them, the second row
    measured nothing and says why."""
    if batch_size % processes:
        raise ValueError(f"batch_size {batch_size} does not divide among {plural(processes, 'process')}")
    threads = max(usable_cores() // processes, 1) if device.type == "cpu" else 1
    common: dict[str, Any] = dict(
        device=device, model=model, dataset=dataset, batch_size=batch_size, loader="device", workers=0
    )
    common |= dict(steps=steps, warmup=warmup, repeats=repeats)
    task = dict(model=model, dataset=dataset, root=str(root), batch_size=batch_size, precision=precision)
    task |= dict(device=device.type, threads=threads, warmup=warmup, steps=steps, repeats=repeats)
    each = f"{plural(threads, 'thread')} each" if device.type == "cpu" else "one GPU each"
    alone = _run({**task, "world": 1})
    base = _rate(alone)
    first = {**base.columns(), "what": "ddp", "variant": "1 process", "baseline": True, "processes": 1}
    first["torch_threads"] = threads
    first |= {"precision": alone[0]["precision"], "note": f"global batch {batch_size}, {each}"}
    yield rows.finish(first, base=base.median, **common)
    row: dict[str, Any] = {"what": "ddp", "variant": f"{processes} processes", "baseline": False}
    row |= {"processes": processes, "precision": alone[0]["precision"], "torch_threads": threads}
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        gpus = plural(torch.cuda.device_count(), "GPU")
        row["note"] = f"measured nothing: this machine has {gpus}, and {processes} processes need one each"
        yield rows.finish(row, base=base.median, **common)
        return
    ranks = _run({**task, "world": processes})
    rate = _rate(ranks)
    row |= {**rate.columns(), "efficiency": rate.median / (processes * base.median)}
    row["note"] = f"global batch {batch_size} ({batch_size // processes} per rank), {each}"
    yield rows.finish(row, base=base.median, **common)
