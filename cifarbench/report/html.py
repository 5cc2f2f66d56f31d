"""report.html: everything ``collect`` found, in one page that needs nothing else to be read (no network, no
scripts; CSS inline, plots as base64 PNG, curves as inline SVG), so that it can be mailed or opened from a shared
filesystem: the summary line, the tables with the published figures beside them, the plots, every run with its
curve and environment, the failed and lost runs with the tail of their logs, and the grid files submitted.

Every text that comes from records, logs or grid files is escaped."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from cifarbench.errors import plural
from cifarbench.report.tables import ACC_DECIMALS, EAGER, VALUES, Part, Table, comparison_parts, labels, trained
from cifarbench.store import atomic
from cifarbench.store.manifests import list_manifests, read_manifests

DETAILS_LIMIT = 50  # failed and lost runs shown with their logs; the rest are listed
LOG_LINES = 40
_LOG_BYTES = 16_384

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1400px;
padding:0 16px;color:#1b1f24;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#57606a}
table{border-collapse:collapse;margin:6px 0 10px}th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{background:#fff1f0}code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:8px;overflow-x:auto;max-height:420px}
.foot{color:#57606a;font-size:12px}img{max-width:100%;border:1px solid #d0d7de;margin:6px 0}
nav a{margin-right:14px}details{margin:6px 0}summary{cursor:pointer}section{overflow-x:auto}
tr.cancelled td{background:#fff8e5}svg.curve{display:block}
table.runs{width:100%}.runs th,.runs td{font-size:12px;padding:3px 5px}.runs td.cfg{min-width:12em}
.runs td.id{min-width:8em}.runs td.id,.runs td.env{overflow-wrap:anywhere}
"""


def _e(value) -> str:
    return escape("" if value is None else str(value))


def _code(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>: the lines the Markdown report lists."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", escape(text))


def _table(header: list[str], body: list[list[str]], *, numeric_from: int = 1) -> str:
    """A table of escaped cells; those from column ``numeric_from`` on right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in body
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def curve_svg(curve, *, width: int = 120, height: int = 30) -> str:
    """A run's test accuracy per epoch as a small inline SVG line, on a fixed 0–1 scale so that runs compare."""
    acc = np.asarray([np.nan if a is None else a for a in curve], float) if curve is not None else np.empty(0)
    acc = acc[np.isfinite(acc)]
    if not len(acc):
        return "–"
    step = -(-len(acc) // (width // 2))  # a point every two pixels at most: 1,000 runs' curves stay small
    shown = acc[np.unique(np.r_[np.arange(0, len(acc), step), len(acc) - 1])] if len(acc) > 1 else np.repeat(acc, 2)
    x = np.linspace(1, width - 1, len(shown))
    y = (height - 1) - np.clip(shown, 0, 1) * (height - 2)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y))
    d = ACC_DECIMALS
    label = f"test accuracy, {plural(len(acc), 'epoch')}: last {acc[-1]:.{d}f}, best {acc.max():.{d}f}"
    return (
        f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"<title>{_e(label)}</title>"
        f'<rect width="{width}" height="{height}" fill="#f6f8fa"/>'
        f'<polyline fill="none" stroke="#0969da" stroke-width="1.3" points="{points}"/></svg>'
    )


def log_tail(path: str | os.PathLike, lines: int = LOG_LINES) -> str | None:
    """The last ``lines`` lines of a log file, or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:])


def _log_path(root: Path, entry: dict, which: str) -> Path | None:
    """A manifest entry's log, where it is now: as written, or under ``root`` where the results folder moved."""
    written = Path(entry[which])
    if written.exists():
        return written
    try:
        moved = root / written.relative_to(entry.get("results") or "")
    except ValueError:
        return None
    return moved if moved.exists() else None


def _plots(images: list[Path]) -> str:
    out = []
    for path in images:
        try:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        except OSError:
            continue
        out.append(f'<figure><img alt="{_e(Path(path).name)}" src="data:image/png;base64,{data}"></figure>')
    return "".join(out) or "<p>No plots (no completed run, or collect ran with --no-plots).</p>"


def _part(part: Part) -> str:
    notes = "".join(f'<p class="foot">{_code(note)}</p>' for note in part.notes)
    return _table(part.header, part.body, numeric_from=part.numeric_from) + notes


def _tables(tabs: list[Table], matches: list[pd.DataFrame | None], value: str) -> str:
    out = []
    for t, m in zip(tabs, matches):
        out.append(f"<h3>{_e(t.title)}</h3>" + _table(t.header, t.body))
        if m is not None and len(m):
            header, body, foot = comparison_parts(t, m, value)
            first = len(t.rows) + len(t.cols)
            out.append(
                "<p>Beside published figures:</p>"
                + _table(header, body, numeric_from=first)
                + "".join(f'<p class="foot">{_e(line)}</p>' for line in foot)
            )
    return "".join(out) or "<p>No table: no run to show.</p>"


def _failures(root: Path, runs: pd.DataFrame, details: dict[str, dict], no_record: list[str]) -> str:
    """Each failed or cancelled run's error, traceback and log tail, and each lost run's log tail (the first
    DETAILS_LIMIT)."""
    entries = read_manifests(root)
    state = dict(zip(runs.run_id, runs.status))
    failed, known = set(runs.run_id[runs.status.ne("completed")]), set(state)
    errors = dict(zip(runs.run_id, runs.error))  # the first line; the traceback has the rest
    shown = [*sorted(failed), *(i for i in no_record if i not in known)]
    out = []
    for run_id in shown[:DETAILS_LIMIT]:
        record = details.get(run_id, {})
        entry = entries.get(run_id)
        kind = state[run_id] if run_id in failed else "no record (still running, or lost)"
        parts = [f"<summary><code>{_e(run_id)}</code>: {_e(kind)}</summary>"]
        if isinstance(errors.get(run_id), str):
            parts.append(f"<p>{_e(errors[run_id])}</p>")
        if record.get("traceback"):
            parts.append(f"<p>Traceback (from the record):</p><pre>{_e(record['traceback'])}</pre>")
        if entry is None:
            parts.append("<p>No submission manifest names this run: no job log.</p>")
        for which in ("stderr", "stdout"):
            path = _log_path(root, entry, which) if entry else None
            tail = log_tail(path) if path else None
            if tail is not None:
                parts.append(f"<p>Last lines of {_e(path)}:</p><pre>{_e(tail)}</pre>")
            elif entry:
                parts.append(f"<p>No log at {_e(entry[which])}.</p>")
        out.append(f"<details open>{''.join(parts)}</details>")
    if len(shown) > DETAILS_LIMIT:
        out.append(f"<p>… and {len(shown) - DETAILS_LIMIT} more (see the list above and runs.parquet).</p>")
    return "".join(out)


_RUN_COLUMNS = [
    "run id",
    "status",
    "configuration",
    "seed",
    "epochs",
    "test acc: final, best",
    "test accuracy per epoch",
    "trained",
    "images/s",
    "device, precision, host",
    "SLURM job, attempts",
    "versions, commit",
]
_VERSIONS = {
    "torch_version": "torch",
    "torchvision_version": "torchvision",
    "lightning_version": "Lightning",
    "cuda_version": "CUDA",
    "cifarbench_version": "cifarbench",
}


def _runs(runs: pd.DataFrame, details: dict[str, dict]) -> str:
    if runs.empty:
        return "<p>No records.</p>"
    named = labels(runs, ["recipe"])
    acc = lambda v: "–" if pd.isna(v) else f"{v:.{ACC_DECIMALS}f}"
    speed = lambda v: "–" if pd.isna(v) else f"{v:.{VALUES['images_per_s']}f}"
    rows = []
    for r, recipe, way in zip(runs.itertuples(index=False), named, trained(runs)):
        d = details.get(r.run_id, {})
        job = d.get("slurm_job_id")
        job = f"{job}_{d['slurm_array_task_id']}" if job and d.get("slurm_array_task_id") else job
        attempts = plural(d["attempts"], "attempt") if d.get("attempts") else None
        software = [f"{name} {_e(d[k])}" for k, name in _VERSIONS.items() if d.get(k)]
        software += [f"commit <code>{_e(d['git_commit'][:12])}</code>"] if d.get("git_commit") else []
        device = r.device_name if isinstance(r.device_name, str) else "–"
        device += f" ×{d['device_count']}" if (d.get("device_count") or 1) > 1 else ""
        config = f"{r.model} {r.dataset} {recipe} bs={r.batch_size}"
        schedule = f"{r.schedule} {r.milestones} ×{r.gamma:g}" if r.schedule == "step" else r.schedule
        spec = (
            f"SGD lr {r.lr:g}, momentum {r.momentum:g}, wd {r.weight_decay:g}, {schedule}; loader {r.loader}, "
            f"{r.compile if r.compile != EAGER else 'eager'}{', deterministic' if r.deterministic else ''}"
        )
        where = "<br>".join(
            _e(v)
            for v in (device, r.precision_used if isinstance(r.precision_used, str) else r.precision, d.get("hostname"))
            if v
        )
        cells = [
            f'<td class="id"><code>{_e(r.run_id)}</code></td>',
            f"<td>{_e(r.status)}</td>",
            f'<td class="cfg">{_e(config)}<br><span class="foot">{_e(spec)}</span></td>',
            *(f"<td>{_e(v)}</td>" for v in (r.seed, f"{r.epochs_done}/{r.epochs}")),
            f'<td class="num">{acc(r.final_test_acc)}<br><span class="foot">best {acc(r.best_test_acc)}</span></td>',
            f"<td>{curve_svg(d.get('test_acc'))}</td>",
            f"<td>{_e(way)}" + (f"<br>MPS {_e(r.mps)}" if isinstance(r.mps, str) else "") + "</td>",
            f'<td class="num">{speed(r.images_per_s)}</td>',
            f'<td class="env">{where}</td>',
            f"<td>{'<br>'.join(_e(v) for v in (job or '–', attempts) if v)}</td>",
            f'<td class="env">{"<br>".join(software) or "–"}</td>',
        ]
        cls = "" if r.status == "completed" else f' class="{_e(r.status)}"'
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in _RUN_COLUMNS)
    return f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _submissions(root: Path) -> str:
    out = []
    for m in list_manifests(root):
        jobs = sorted({str(e.get("array_job_id")) for e in m["runs"] if isinstance(e, dict)})
        head = (
            f"{_e(m.get('submitted_at'))}: {_e(plural(len(m['runs']), 'run'))} ({_e(m.get('executor'))}) from "
            f"<code>{_e(m.get('grid') or 'no grid file')}</code>, "
            f"{'job' if len(jobs) == 1 else 'jobs'} {_e(', '.join(jobs[:20]))}{' …' if len(jobs) > 20 else ''}"
        )
        text = m.get("grid_text")
        if text is None and m.get("grid"):
            try:
                text = Path(m["grid"]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                text = None
        body = f"<pre>{_e(text)}</pre>" if text is not None else "<p>The grid file's text was not kept.</p>"
        out.append(f"<details><summary>{head}</summary><p>Manifest: <code>{_e(m['path'])}</code></p>{body}</details>")
    return "".join(out) or "<p>No submission manifests (runs started with <code>cifarbench run</code>).</p>"


def render(
    root: Path,
    *,
    runs: pd.DataFrame,
    summary: str,
    tabs: list[Table],
    matches: list[pd.DataFrame | None],
    missing: list[str],
    no_record: list[str],
    details: dict[str, dict],
    images: list[Path],
    value: str = "final_test_acc",
    hours: Part | None = None,
    timing: Sequence[Part] = (),
    packing: Part | None = None,
) -> str:
    """The page. ``runs``: the records collected; ``summary``, ``tabs``, ``matches``, ``missing``, ``hours``
    (device-hours), ``timing`` (time estimates) and ``packing`` (packing and fusion) as the Markdown report has
    them; ``details``: run id -> what the summary leaves out (``scan.DETAILS`` and the curve, ``test_acc``);
    ``images``: the plots' PNGs; ``value``: what the cells show, as ``collect --value`` says."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        ("tables", "Tables", _tables(tabs, matches, value)),
        ("hours", "Device-hours", _part(hours) if hours else ""),
        ("timing", "Time estimates", "".join(map(_part, timing))),
        ("packing", "Packing and fusion", _part(packing) if packing else ""),
        ("plots", "Plots", _plots(images)),
        (
            "missing",
            "Missing, failed and lost runs",
            ("<ul>" + "".join(f"<li>{_code(line.removeprefix('- '))}</li>" for line in missing) + "</ul>")
            + _failures(root, runs, details, no_record)
            if missing
            else "<p>None: every run has a completed record.</p>",
        ),
        ("runs", f"Runs ({_e(plural(len(runs), 'run'))})", _runs(runs, details)),
        ("grids", "Grid files submitted", _submissions(root)),
    ]
    sections = [s for s in sections if s[2]]
    nav = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{name}</h2>{html}</section>' for key, name, html in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>cifarbench results: {_e(root.name)}</title><style>{_CSS}</style></head><body>"
        f'<h1>cifarbench results</h1><p class="meta"><code>{_e(root)}</code>, collected {now}</p>'
        f'<p id="summary">{_e(summary)}</p><nav>{nav}</nav>{body}</body></html>\n'
    )


def write_report(path: str | os.PathLike, root: str | os.PathLike, **parts) -> Path:
    """``render`` written atomically to ``path``."""
    atomic.write_text(path, render(Path(root), **parts))
    return Path(path)
