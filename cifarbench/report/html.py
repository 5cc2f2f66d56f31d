"""report.html: everything ``collect`` found, in one page that needs nothing else to be read (no network, no
scripts; CSS inline, plots as base64 PNG, curves as inline SVG), so that it can be mailed or opened from a shared
filesystem: the summary line, the tables with the published figures beside them, the plots, the failed and lost
runs with the tail of their logs, every configuration with its runs' mean curve and, folded beneath it, each run
with its environment, and the grid files submitted.

Every text that comes from records, logs or grid files is escaped."""

from __future__ import annotations

import base64
import collections
import functools
import itertools
import os
import re
from collections.abc import Callable, Sequence
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
.runs td.id{min-width:8em}.runs td.id,.runs td.env{overflow-wrap:anywhere}table.members{width:100%;margin:4px 0}
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


def curve_svg(curve, *, band=None, runs: int = 1, width: int = 120, height: int = 30) -> str:
    """Test accuracy per epoch as a small inline SVG line, on a fixed 0–1 scale so that runs compare: one run's
    curve, or (``runs`` > 1) the mean of a configuration's, with ``band`` (lowest, highest) shaded."""
    acc = np.asarray([np.nan if a is None else a for a in curve], float) if curve is not None else np.empty(0)
    keep = np.isfinite(acc)
    acc = acc[keep]
    if not len(acc):
        return "–"
    step = -(-len(acc) // (width // 2))  # a point every two pixels at most: many curves stay small
    shown = np.unique(np.r_[np.arange(0, len(acc), step), len(acc) - 1]) if len(acc) > 1 else np.zeros(2, int)
    x = np.linspace(1, width - 1, len(shown))
    y = lambda values: (height - 1) - np.clip(values[shown], 0, 1) * (height - 2)
    points = lambda ys: " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, ys))
    shade = ""
    if band is not None:
        low, high = (np.asarray(b, float)[keep] for b in band)
        back = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x[::-1], y(low)[::-1]))
        shade = f'<polygon fill="#0969da" fill-opacity="0.18" stroke="none" points="{points(y(high))} {back}"/>'
    d = ACC_DECIMALS
    what = f"mean of {runs} runs (band: lowest to highest)" if runs > 1 else "test accuracy"
    label = f"{what}, {plural(len(acc), 'epoch')}: last {acc[-1]:.{d}f}, best {acc.max():.{d}f}"
    return (
        f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"<title>{_e(label)}</title>"
        f'<rect width="{width}" height="{height}" fill="#f6f8fa"/>{shade}'
        f'<polyline fill="none" stroke="#0969da" stroke-width="1.3" points="{points(y(acc))}"/></svg>'
    )


def config_curve_svg(curves) -> str:
    """The mean test-accuracy curve of a configuration's runs (``curves``: their curves, None where a run has none),
    over the epochs all of them have, between the lowest and highest run's."""
    curves = [np.asarray(c, float) for c in curves if c is not None and len(c)]
    if len(curves) < 2:
        return curve_svg(curves[0] if curves else None)
    acc = np.stack([c[: min(map(len, curves))] for c in curves])  # an epoch NaN in any run is left out
    return curve_svg(acc.mean(axis=0), band=(acc.min(axis=0), acc.max(axis=0)), runs=len(acc))


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
        notes = "".join(f'<p class="foot">{_e(line)}</p>' for line in t.notes)
        out.append(f"<h3>{_e(t.title)}</h3>" + _table(t.header, t.body) + notes)
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


# The Runs section: one row per configuration, its runs folded away beneath it, so that 10,000 runs stay a page a
# browser opens (about 140 configurations of 70 runs: 11 MB, 6 of them plots) and a curve is drawn per configuration.
_CONFIG_COLUMNS = ["configuration", "runs", "test acc: final, best", "test accuracy per epoch", "its runs"]
_RUN_COLUMNS = [
    "run id",
    "status",
    "seed",
    "epochs",
    "test acc: final, best",
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


def _acc(value) -> str:
    return "–" if pd.isna(value) else f"{value:.{ACC_DECIMALS}f}"


# What the Runs section reads of each run, as plain values: pandas' itertuples costs a second per 10,000 runs.
_Run = collections.namedtuple(
    "_Run",
    "config seed run_id status epochs_done epochs final_test_acc best_test_acc way mps images_per_s device_name "
    "precision_used precision test_acc model dataset recipe_label batch_size schedule milestones gamma lr momentum "
    "weight_decay loader compile deterministic",
)


@functools.lru_cache(maxsize=4096)
def _environment(device, device_count, precision, host, versions: tuple, commit) -> tuple[str, str]:
    """The cells "device, precision, host" and "versions, commit": most runs share them, and escape each once."""
    device = (device if isinstance(device, str) else "–") + (f" ×{device_count}" if (device_count or 1) > 1 else "")
    where = "<br>".join(_e(v) for v in (device, precision, host) if v)
    software = [f"{name} {_e(v)}" for name, v in zip(_VERSIONS.values(), versions) if v]
    software += [f"commit <code>{_e(commit[:12])}</code>"] if commit else []
    return f'<td class="env">{where}</td>', f'<td class="env">{"<br>".join(software) or "–"}</td>'


def _run_row(r: _Run, d: dict) -> str:
    """One run of a configuration: what differs between its runs."""
    speed = "–" if pd.isna(r.images_per_s) else f"{r.images_per_s:.{VALUES['images_per_s']}f}"
    job = d.get("slurm_job_id")
    job = f"{job}_{d['slurm_array_task_id']}" if job and d.get("slurm_array_task_id") else job
    attempts = plural(d["attempts"], "attempt") if d.get("attempts") else None
    precision = r.precision_used if isinstance(r.precision_used, str) else r.precision
    versions = tuple(d.get(k) for k in _VERSIONS)
    where, software = _environment(
        r.device_name, d.get("device_count"), precision, d.get("hostname"), versions, d.get("git_commit")
    )
    cells = [
        f'<td class="id"><code>{_e(r.run_id)}</code></td>',
        *(f"<td>{_e(v)}</td>" for v in (r.status, r.seed, f"{r.epochs_done}/{r.epochs}")),
        f'<td class="num">{_acc(r.final_test_acc)}<br><span class="foot">best {_acc(r.best_test_acc)}</span></td>',
        f"<td>{_e(r.way)}" + (f"<br>MPS {_e(r.mps)}" if isinstance(r.mps, str) else "") + "</td>",
        f'<td class="num">{speed}</td>',
        where,
        f"<td>{'<br>'.join(_e(v) for v in (job or '–', attempts) if v)}</td>",
        software,
    ]
    cls = "" if r.status == "completed" else f' class="{_e(r.status)}"'
    return f"<tr{cls}>{''.join(cells)}</tr>"


def _config_row(c: dict, group: list[_Run], details: dict[str, dict]) -> str:
    """A configuration (``c``: its row of summarize's table) and its runs, folded away beneath it."""
    first = group[0]
    schedule = f"{first.schedule} {first.milestones} ×{first.gamma:g}" if first.schedule == "step" else first.schedule
    spec = (
        f"SGD lr {first.lr:g}, momentum {first.momentum:g}, wd {first.weight_decay:g}, {schedule}; loader "
        f"{first.loader}, {first.compile if first.compile != EAGER else 'eager'}"
        f"{', deterministic' if first.deterministic else ''}"
    )
    name = f"{first.model} {first.dataset} {first.recipe_label} bs={first.batch_size}"
    counts = collections.Counter(r.status for r in group)
    done = [r for r in group if r.status == "completed"]
    outcome = [f"{c['n']} of {c['n_expected']} completed"]
    outcome += [f"{counts[k]} {k}" for k in ("failed", "cancelled") if counts[k]]
    std = c["final_test_acc_std"]
    mean = _acc(c["final_test_acc_mean"]) + ("" if pd.isna(std) else f" ± {std:.{ACC_DECIMALS}f}")
    best = max((r.best_test_acc for r in done if not pd.isna(r.best_test_acc)), default=None)
    members = "".join(_run_row(r, details.get(r.run_id, {})) for r in group)
    inner_head = "".join(f"<th>{_e(h)}</th>" for h in _RUN_COLUMNS)
    cells = [
        f'<td class="cfg">{_e(name)}<br><span class="foot">{_e(spec)}</span></td>',
        f"<td>{'<br>'.join(map(_e, outcome))}</td>",
        f'<td class="num">{mean}<br><span class="foot">best {_acc(best)}</span></td>',
        f"<td>{config_curve_svg([r.test_acc for r in done or group])}</td>",
        f'<td><details><summary>{_e(plural(len(group), "run"))}</summary><table class="members"><thead><tr>'
        f"{inner_head}</tr></thead><tbody>{members}</tbody></table></details></td>",
    ]
    cls = "" if c["n"] else ' class="cancelled"' if counts["cancelled"] == len(group) else ' class="failed"'
    return f"<tr{cls}>{''.join(cells)}</tr>"


def _runs(runs: pd.DataFrame, configs: pd.DataFrame, details: dict[str, dict]) -> str:
    """``runs`` with ``config`` (its row of ``configs``, summarize's table) and ``test_acc`` (its curve)."""
    if runs.empty:
        return "<p>No records.</p>"
    runs = runs.assign(recipe_label=labels(runs, ["recipe"]), way=trained(runs))
    rows_of = sorted(
        (_Run(*values) for values in zip(*(runs[name].tolist() for name in _Run._fields))),
        key=lambda r: (r.config, r.seed, r.run_id),
    )
    config_rows = configs.to_dict("records")
    rows = [
        _config_row(config_rows[config], list(group), details)
        for config, group in itertools.groupby(rows_of, key=lambda r: r.config)
    ]
    head = "".join(f"<th>{_e(h)}</th>" for h in _CONFIG_COLUMNS)
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
    configs: pd.DataFrame,
    summary: str,
    tabs: list[Table],
    matches: list[pd.DataFrame | None],
    missing: list[str],
    no_record: list[str],
    details: dict[str, dict],
    images: Callable[[], list[Path]],
    value: str = "final_test_acc",
    hours: Part | None = None,
    timing: Sequence[Part] = (),
    packing: Part | None = None,
    compared: Part | None = None,
) -> str:
    """The page. ``runs``: the records collected, each with ``config``, its row of ``configs`` (``summarize``'s
    table), and ``test_acc``, its curve; ``summary``, ``tabs``, ``matches``, ``missing``, ``hours``
    (device-hours), ``timing`` (time estimates), ``packing`` (packing and fusion) and ``compared`` (--compare) as
    the Markdown report has them; ``details``: run id -> what the summary leaves out (``scan.DETAILS``);
    ``images``: waits for the plots' PNGs and returns them (called last, so that the page is made while they are
    drawn); ``value``: what the cells show, as ``collect --value`` says."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        ("comparison", "Comparison", _part(compared) if compared else ""),
        ("tables", "Tables", _tables(tabs, matches, value)),
        ("hours", "Device-hours", _part(hours) if hours else ""),
        ("timing", "Time estimates", "".join(map(_part, timing))),
        ("packing", "Packing and fusion", _part(packing) if packing else ""),
        ("plots", "Plots", ""),  # last: the figures are being drawn meanwhile
        (
            "missing",
            "Missing, failed and lost runs",
            ("<ul>" + "".join(f"<li>{_code(line.removeprefix('- '))}</li>" for line in missing) + "</ul>")
            + _failures(root, runs, details, no_record)
            if missing
            else "<p>None: every run has a completed record.</p>",
        ),
        (
            "runs",
            f"Runs ({_e(plural(len(runs), 'run'))} of {_e(plural(runs.config.nunique(), 'configuration'))})",
            _runs(runs, configs, details),
        ),
        ("grids", "Grid files submitted", _submissions(root)),
    ]
    sections = [(key, name, _plots(images()) if key == "plots" else part) for key, name, part in sections]
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
