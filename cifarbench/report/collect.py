"""``cifarbench collect``: read a results folder (``scan``), make the tables (``tables``), compare with published
figures (``reference``), write tables.md, summary.csv, runs.parquet, the plots and report.html (``html``). The
I/O edge of the report layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from cifarbench.errors import UsageError, check_name, plural
from cifarbench.report import compare as compared
from cifarbench.report import html, reference
from cifarbench.report.stats import DEFAULT_LEVEL, check_level
from cifarbench.report.tables import (
    CONFIG,
    VALUES,
    allocations,
    dedupe,
    default_tables,
    device_hours_part,
    incomplete,
    packing_part,
    parse_where,
    render,
    select,
    summarize,
    summary_line,
    tables,
    time_estimate_parts,
    to_frame,
)
from cifarbench.store import atomic, scan
from cifarbench.store.layout import Layout
from cifarbench.store.records import UNREADABLE


@dataclass(frozen=True)
class Report:
    markdown: str
    warnings: list[str]  # one line each, for stderr
    written: list[Path]


def collect(
    results,
    *,
    out=None,
    rows=(),
    cols=(),
    value="final_test_acc",
    where=(),
    source=None,
    expected=None,
    plots=True,
    report=True,
    ci: float | None = DEFAULT_LEVEL,
    compare: str | None = None,
    target_ci: float = 0.002,
) -> Report:
    """Read the records under ``results``, write tables.md, summary.csv, runs.parquet, report.html (and plots) to
    ``out``. ``ci``: the confidence level of the cells' intervals (None: none); ``compare``: ``FIELD=A,B``, A against B
    per configuration (``compare.compare``, its seeds needed for a half-width of ``target_ci``)."""
    root = Path(results)
    if not root.is_dir():
        why = "is not a folder" if root.exists() else "does not exist"
        raise UsageError(f"{root} {why}; give the results folder that holds runs/<run_id>/record.parquet")
    check_name(value, VALUES, "--value")
    for key in (*rows, *cols):
        check_name(key, CONFIG, "table field")
    published = reference.load_published()
    if source is not None:
        check_name(source, reference.sources(published), "--reference source")
    if ci is not None:
        try:
            check_level(ci)
        except ValueError as exc:
            raise UsageError(f"--ci {ci}: {exc}") from None
    versus = compared.parse_compare(compare) if compare is not None else None
    if target_ci <= 0:
        raise UsageError(f"--target-ci {target_ci}: give a half-width above 0, e.g. 0.002")
    filters = parse_where(where)
    folder = Path(out) if out is not None else root
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is not a folder; give a folder")

    out_layout = Layout(folder)
    found = scan.read_records(root, scan.load_runs(out_layout.runs_table, root))
    warnings = [
        f"warning: skipped {plural(len(paths), 'file')} ({why}): {', '.join(paths[:10])}"
        + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")
        for why, paths in found.skipped.items()
    ]
    all_runs, dropped = dedupe(to_frame(found.table.drop_columns(["test_acc", *scan.DETAILS, scan.DETAILS_READ])))
    if len(dropped):
        ids = sorted(set(dropped.run_id))
        warnings.append(
            f"note: ignored {plural(len(dropped), 'duplicate record')} of {plural(len(ids), 'run')} (kept the "
            f"latest completed record of each): {', '.join(ids[:10])}" + (" …" if len(ids) > 10 else "")
        )
    if all_runs.empty and not found.no_record and not expected:
        skipped = sum(map(len, found.skipped.values()))
        raise UsageError(
            f"{root}: no cifarbench records found (looked for runs/<run_id>/record.parquet"
            + (f"; skipped {plural(skipped, 'other Parquet file')})" if skipped else ")")
        )

    runs = select(all_runs, filters)
    fell_back = sorted(runs.run_id[runs.compile_fallback.notna()])
    if fell_back:
        warnings.append(
            f"note: {plural(len(fell_back), 'run')} asked for torch.compile but trained eagerly (see the report): "
            f"{', '.join(fell_back[:10])}" + (" …" if len(fell_back) > 10 else "")
        )
    summary, config = summarize(runs, expected or (), ci=ci)
    versus_part = compared.compare(runs, versus, value, level=ci or DEFAULT_LEVEL, target=target_ci) if versus else None
    if rows or cols:
        rows, cols = rows or ["model"], cols or ["dataset"]
        titled = [k for k in ("model", "dataset", "recipe", "batch_size") if k not in (*rows, *cols)]
        tabs = tables(summary, rows, cols, value=value, always=titled)
    else:
        tabs = default_tables(summary, value)
    matches: list[pd.DataFrame | None] = (
        list(reference.match(summary[summary.n > 0], [t.cells.index for t in tabs], published, source))
        if value in reference.COMPARED
        else [None] * len(tabs)
    )
    unreadable = [
        Path(p).parent.name
        for p in found.skipped.get(UNREADABLE, ())
        if Path(p).name == "record.parquet" and Path(p).parent.parent.name == "runs"
    ]
    missing = incomplete(runs, set(all_runs.run_id), found.no_record, unreadable, expected)
    # an allocation's time and device-hours are its runs' in the whole folder, also where --where selects some
    allocated = allocations(all_runs)
    hours = device_hours_part(runs, tabs, config, folder=all_runs, allocated=allocated)
    timing = time_estimate_parts(runs, folder=all_runs, allocated=allocated)
    packing = packing_part(runs)
    markdown = render(
        runs, tabs, matches, missing, value, hours=hours, timing=timing, packing=packing, compared=versus_part
    )

    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_layout.tables, markdown)
    atomic.write_text(out_layout.summary, summary.to_csv(index=False))
    table = found.table
    with contextlib.ExitStack() as stack:
        pngs: Callable[[], list[Path]] = list
        if plots:  # curves: read from the records' columns once, then kept in runs.parquet
            from cifarbench.report.plots import drawing  # matplotlib: only when plots are wanted

            table = scan.with_curves(root, table, runs.index[runs.status.eq("completed")])
            # drawn in the background while runs.parquet and report.html are written
            pngs = stack.enter_context(drawing(_curved(runs, config, table), summary, tabs, out_layout.plots))
        if report:  # every run's curve and details (environment, traceback): the same
            table = scan.with_details(root, table, runs.index)
        if found.changed or table is not found.table or not out_layout.runs_table.exists():
            kept = np.zeros(table.num_rows, bool)
            kept[all_runs.index.to_numpy()] = True  # a mask, not take(): much faster on the curve column
            scan.write_runs(table.filter(kept), out_layout.runs_table, root)
        written = [out_layout.tables, out_layout.summary, out_layout.runs_table]
        if report:
            page = html.write_report(
                out_layout.report,
                root,
                runs=_curved(runs, config, table),
                configs=summary,
                summary=summary_line(runs, value),
                tabs=tabs,
                matches=matches,
                missing=missing,
                hours=hours,
                timing=timing,
                packing=packing,
                compared=versus_part,
                no_record=found.no_record,
                details=dict(zip(runs.run_id, table.select(scan.DETAILS).take(runs.index.to_numpy()).to_pylist())),
                images=pngs,
                value=value,
            )
        written += [*pngs(), *([page] if report else [])]
    return Report(markdown, warnings, written)


def _curved(runs: pd.DataFrame, config, table: pa.Table) -> pd.DataFrame:
    """``runs`` with each run's configuration (its row in the summary) and its curve from the scan's ``table``."""
    curves = table.column("test_acc").take(runs.index.to_numpy()).to_numpy(zero_copy_only=False)
    return runs.assign(config=config, test_acc=curves)
