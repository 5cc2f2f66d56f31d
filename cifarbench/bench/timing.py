"""How every benchmark times: warm up, synchronise the device before each clock read, time ``repeats`` windows,
keep the median window and the spread of all of them (a verdict needs both: the best window is biased upward)."""

from __future__ import annotations

import queue
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rate:
    """Images/s over repeated windows: the median, and the slowest and fastest window."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, rates: Iterable[float]) -> Rate:
        rates = list(rates)
        return cls(statistics.median(rates), min(rates), max(rates))

    def columns(self) -> dict[str, float]:
        """The row columns of this rate (see ``rows.SCHEMA``)."""
        return {"images_per_s": self.median, "images_per_s_min": self.low, "images_per_s_max": self.high}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(loader) -> Iterator:
    """Batches over successive epochs, with ``set_epoch`` called as Lightning does, each of the first batch's
    size: an epoch's last, short batch is left out. Its new shape would make cudnn.benchmark tune again inside a
    timed window, once per run in training but once in a few windows here (on an H200, one window of five ran
    at 187 images/s beside the others' 9,000)."""
    epoch, shape = 0, None
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for x, y in loader:
            shape = shape or y.shape
            if y.shape == shape:
                yield x, y
        epoch += 1


def images_per_s(batches: Iterator, consume: Callable, *, device, steps: int, warmup: int, repeats: int) -> Rate:
    """Feed ``warmup`` batches to ``consume``, then time ``repeats`` windows of ``steps`` batches each."""
    for _ in range(warmup):
        consume(*next(batches))
    rates = []
    for _ in range(repeats):
        sync(device)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            x, y = next(batches)
            consume(x, y)
            images += y.numel()  # a fused group's [K, B] labels: all members' images
        sync(device)
        rates.append(images / (time.perf_counter() - start))
    return Rate.of(rates)


def passes_per_s(one_pass: Callable[[], int], *, device, repeats: int) -> Rate:
    """Images/s of whole passes (``one_pass`` returns the images it saw); the first pass warms up (and compiles)."""
    rates = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        images = one_pass()
        sync(device)
        rates.append(images / (time.perf_counter() - start))
    return Rate.of(rates[1:])


def gather(procs: list, out, what: str) -> list[dict]:
    """The reports (dicts with the ``index`` of their process) that ``procs`` put on the queue ``out``, in order;
    one whose process died without a report stops the others (they would wait for it) and raises, naming ``what``."""
    reports: list[dict] = []
    try:
        while len(reports) < len(procs):
            try:
                reports.append(out.get(timeout=5))
            except queue.Empty:
                reported = {r["index"] for r in reports}
                dead = [p.exitcode for i, p in enumerate(procs) if i not in reported and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{what} died (exit {dead[0]})") from None
    finally:
        for proc in procs:
            if len(reports) < len(procs):
                proc.terminate()
            proc.join()
    return sorted(reports, key=lambda r: r["index"])
