"""The bench table: its schema, the columns every row carries, the file each row is added to as soon as it is
measured, and the plain-text tables ``cifarbench bench`` prints.

Rows go to ``<results>/bench/<UTC time>-<host>.parquet`` with their own schema tag, which the collector does not
read as run records. The file is rewritten (atomically) after every row, so a benchmark killed half-way, as the
GPU check kills a part at its cap, leaves every row it had finished.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch

from cifarbench.store import records
from cifarbench.store.layout import Layout
from cifarbench.system import usable_cores

BENCH_TAG = b"bench/4"  # bench/3: the spread of the repeats (images_per_s_min/_max) and failed_runs; bench/4: ddp
_str, _int, _float = pa.string(), pa.int32(), pa.float64()
SCHEMA = pa.schema(
    [
        ("what", _str),  # pipeline | train | pack | isolation | fuse | ddp
        ("variant", _str),
        ("baseline", pa.bool_()),
        ("images_per_s", _float),  # the median of the repeated windows; null: the variant could not run (see note)
        ("images_per_s_min", _float),  # the slowest window
        ("images_per_s_max", _float),  # the fastest window
        ("ratio", _float),  # images_per_s / the baseline's of the same `what`
        # a lever or compile row: images_per_s / the fast path row's ("lightning fit"'s for a compiled fit)
        ("ratio_to_fast_path", _float),
        ("eval_images_per_s", _float),  # test-set images/s of the fast path (the `lightning fit` rows)
        ("minutes_200_epochs", _float),  # a 200-epoch run of 50,000 + 10,000 images/epoch, projected
        ("model", _str),
        ("dataset", _str),
        ("batch_size", _int),
        ("precision", _str),
        ("loader", _str),
        ("workers", _int),
        ("steps", _int),
        ("warmup", _int),
        ("repeats", _int),
        ("note", _str),
        ("device", _str),
        ("torch_version", _str),
        ("cuda_version", _str),
        ("hostname", _str),
        ("cpu_cores", _int),
        ("torch_threads", _int),
        ("load_avg", _float),  # 1-minute load average when the row was measured, ours included
        # what: pack. images_per_s is the aggregate of `pack` concurrent runs; ratio: over one run alone
        ("pack", _int),
        ("per_run_images_per_s", _float),  # the median run's own images/s
        ("slowdown", _float),  # one run alone's images/s over the median packed run's
        ("peak_memory_mb", _float),  # summed over the runs; the note says which memory
        ("failed_runs", _int),  # what: isolation. the runs of the pack that failed (on purpose: see the note)
        # what: ddp. images_per_s of one run's global batch on `processes` processes (one device each)
        ("processes", _int),
        ("efficiency", _float),  # images_per_s / (processes x the one-process row's)
        ("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={records.SCHEMA_KEY: BENCH_TAG},
)


def finish(row: dict, *, base: float | None, device: torch.device, **common) -> dict:
    """A measured row with its ratio to the baseline's images/s and the columns every row shares; the row's own
    value of one of them wins (the runs of the packing benchmark have their own thread count)."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "hostname": socket.gethostname(),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "created_at": datetime.now(timezone.utc),
    }
    rate = row.get("images_per_s")
    return {**common, **env, **row, "ratio": None if rate is None or not base else rate / base}


class Table:
    """A bench table on disk, named when the benchmark starts and rewritten whole with each row added."""

    def __init__(self, results: str | Path):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.path = Layout(results).bench / f"{stamp}-{socket.gethostname()}.parquet"
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        table = pa.Table.from_pylist([{name: r.get(name) for name in SCHEMA.names} for r in self.rows], schema=SCHEMA)
        records.write_table(table, self.path)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_pack(rows: list[dict]) -> str:
    """A plain-text table of the packing benchmark's rows."""
    lines = [
        f"{'runs at once':>12} {'images/s':>10} {'min-max':>15} {'x one run':>9} {'per run':>9} {'slowdown':>8} "
        f"{'peak MB':>9}  device / torch, threads per run"
    ]
    for r in rows:
        spread = f"{_number(r.get('images_per_s_min'), ',.0f')}-{_number(r.get('images_per_s_max'), ',.0f')}"
        lines.append(
            f"{r['pack']:>12} {_number(r['images_per_s'], ',.0f'):>10} {spread:>15} {_number(r['ratio'], '.2f'):>9} "
            f"{_number(r['per_run_images_per_s'], ',.0f'):>9} {_number(r.get('slowdown'), '.2f'):>8} "
            f"{_number(r['peak_memory_mb'], ',.0f'):>9}  {r['device']} / {r['torch_version']}, {r['torch_threads']}"
            + (f"  ({r['variant']})" if "MPS" in r["variant"] or r["what"] != "pack" else "")
        )
    notes = [r["note"] for r in rows if r["what"] != "pack" and r.get("note")]
    return "\n".join(lines + notes + [f"peak: {rows[0]['note'].partition('peak: ')[2]}"])


def render(rows: list[dict]) -> str:
    """A plain-text table: what, variant, images/s, ratio to the baseline, ratio to the fast path (lever and
    compile rows), projected 200-epoch minutes (where measured), device, torch version."""
    width = max(len(r["variant"]) for r in rows)
    lines = [
        f"{'what':<9} {'variant':<{width}} {'images/s':>10} {'x baseline':>10} {'x fast':>6} {'200 ep min':>10}"
        "  device / torch"
    ]
    for r in rows:
        lever, minutes = r.get("ratio_to_fast_path"), r.get("minutes_200_epochs")
        lines.append(
            f"{r['what']:<9} {r['variant']:<{width}} {_number(r.get('images_per_s'), ',.0f'):>10} "
            f"{_number(r.get('ratio'), '.2f'):>10} {'' if lever is None else f'{lever:.2f}':>6} "
            f"{'' if minutes is None else f'{minutes:,.1f}':>10}  {r['device']} / {r['torch_version']}"
            + (f"  scaling efficiency {r['efficiency']:.2f}" if r.get("efficiency") is not None else "")
            + (f"  ({r['note']})" if r.get("note") else "")
        )
    return "\n".join(lines)
