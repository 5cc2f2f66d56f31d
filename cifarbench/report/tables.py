"""Records -> tables, all pure functions of DataFrames: dedupe, select, aggregate over seeds, pivot, render
Markdown. ``cifarbench.report.collect`` reads and writes the files around them."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cifarbench.errors import UsageError, check_name, plural
from cifarbench.report.stats import DEFAULT_LEVEL, FEW_SEEDS, half_width, t_quantile
from cifarbench.store.records import STATES, run_state

# A configuration is the spec without the seed. The recipe's own fields come last, then epochs: a table is
# split by one of them only where the cell (recipe, batch size, ...) does not already decide it.
_DERIVED = (
    "recipe_epochs",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "milestones",
    "gamma",
    "epochs",
    "val_split",
    "data_fingerprint",
)
CONFIG = ("dataset", "model", "recipe", "batch_size", "precision", "loader", "deterministic", "compile", *_DERIVED)
EAGER = "eager"  # how a null compile (eager, as requested) reads in tables, labels and --where
RECIPE_RUN = ("recipe_epochs", "epochs", "milestones")  # how a recipe was run: what a shortened one's name adds
ACC_DECIMALS = 4  # every accuracy in tables.md and report.html: the tables, the published figures, the runs
VALUES = {  # -> its decimals, the same in every table
    "final_test_acc": ACC_DECIMALS,
    "test_acc_at_best_val": ACC_DECIMALS,
    "best_test_acc": ACC_DECIMALS,
    "images_per_s": 0,
    "train_minutes": 1,
}
# What each value is, as a report's headings and columns say it; the best test epoch is chosen on the test set.
VALUE_NAMES = {
    "final_test_acc": "final test acc",
    "test_acc_at_best_val": "test acc at best val epoch",
    "best_test_acc": "best test epoch acc (selected on the test set)",
    "images_per_s": "training images/s",
    "train_minutes": "training minutes",
}


def to_frame(table: pa.Table) -> pd.DataFrame:
    """Records as a DataFrame; milestones joined to a string ("60,120,160") so that it can be a group key, a null
    compile as "eager", and the status as the word status uses for what became of the run (``run_state``:
    completed, failed or cancelled)."""
    i = table.schema.get_field_index("milestones")
    joined = pc.binary_join(pc.cast(table.column(i), pa.list_(pa.string())), ",")
    table = table.set_column(i, "milestones", joined)
    i = table.schema.get_field_index("compile")
    frame = table.set_column(i, "compile", pc.fill_null(table.column(i), EAGER)).to_pandas()
    frame["status"] = [run_state(status, error) for status, error in zip(frame.status, frame.error)]
    return frame


def dedupe(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per run id, the latest completed record (else the latest one); returns (kept, dropped)."""
    order = (
        runs.assign(_done=runs.status.eq("completed"))
        .sort_values(["_done", "ended_at"], ascending=False, na_position="last", kind="stable")
        .drop(columns="_done")
    )
    first = ~order.run_id.duplicated()
    return order[first].sort_index(), order[~first]


def parse_where(items) -> dict[str, list[str]]:
    """``key=value`` filters; values of one key are alternatives, different keys must all hold."""
    where: dict[str, list[str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--where {item!r}: write key=value, e.g. --where dataset=cifar100")
        where.setdefault(check_name(key.strip(), (*CONFIG, "seed", "status", "run_id"), "--where key"), []).append(
            value.strip()
        )
    return where


def select(runs: pd.DataFrame, where: dict[str, list[str]]) -> pd.DataFrame:
    mask = pd.Series(True, index=runs.index)
    for key, values in where.items():
        col = runs[key]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            try:
                mask &= col.isin([float(v) for v in values])
            except ValueError:
                raise UsageError(f"--where {key}: {', '.join(values)} is not a number") from None
        else:
            mask &= col.astype(str).str.lower().isin([v.lower() for v in values])
    return runs[mask]


def model_depth(name: str) -> int:
    """The depth in a ResNet's name (resnet56 -> 56): the notebook orders models by it."""
    digits = re.search(r"(\d+)$", str(name))
    return int(digits.group(1)) if digits else 1 << 30


def sorted_configs(df: pd.DataFrame, keys) -> pd.DataFrame:
    return (
        df.sort_values(
            list(keys), key=lambda c: c.map(lambda m: (model_depth(m), m)) if c.name == "model" else c, kind="stable"
        )
        if keys
        else df
    )


def grid_seeds(runs: pd.DataFrame, specs=()) -> pd.Series:
    """How many runs (seeds) a grid gives each run's configuration: ``specs``, the grid's run specs, grouped by
    everything that makes the run id but the seed; 0 for a run the grid does not name."""
    seedless = lambda spec: json.dumps({k: v for k, v in spec.identity().items() if k != "seed"}, sort_keys=True)
    key_of = {spec.run_id: seedless(spec) for spec in specs}
    seeds = Counter(key_of.values())
    return pd.Series([seeds[key_of[i]] if i in key_of else 0 for i in runs.run_id], index=runs.index, dtype=int)


def summarize(runs: pd.DataFrame, expected=(), ci: float | None = DEFAULT_LEVEL) -> tuple[pd.DataFrame, pd.Series]:
    """One row per configuration: completed seeds (n), failed and cancelled runs, the seeds it should have
    (``n_expected``: its records, or the grid's runs of it where ``expected``, the grid's run specs, has more), mean
    and std over seeds of every value and, at confidence level ``ci`` (None: none), the t-interval of the mean
    (``<value>_ci_low``, ``<value>_ci_high``, ``ci_level``; NaN with fewer than 2 seeds); and, for every run, the
    row of its configuration."""
    done = runs.status.eq("completed")
    r = runs.assign(
        train_minutes=runs.train_seconds / 60,
        done=done,
        cancelled=runs.status.eq("cancelled"),
        grid=grid_seeds(runs, expected),
    )
    for m in VALUES:
        r[m] = r[m].where(done)
    stats = {f"{m}_{f}": (m, f) for m in VALUES for f in ("mean", "std", "count")}
    groups = r.groupby(list(CONFIG), dropna=False, sort=False)
    s = groups.agg(
        n=("done", "sum"),
        n_cancelled=("cancelled", "sum"),
        records=("run_id", "size"),
        grid=("grid", "max"),
        params=("params", "max"),
        **stats,
    ).reset_index()
    records = s.pop("records")
    s.insert(len(CONFIG) + 1, "n_failed", records - s.n - s.n_cancelled)
    s.insert(len(CONFIG) + 2, "n_cancelled", s.pop("n_cancelled"))
    s.insert(len(CONFIG) + 3, "n_expected", np.maximum(records, s.pop("grid")))
    for m in VALUES:
        count = s.pop(f"{m}_count")
        if ci is not None:
            h = half_width(s[f"{m}_std"], count, ci)
            s.insert(s.columns.get_loc(f"{m}_std") + 1, f"{m}_ci_low", s[f"{m}_mean"] - h)
            s.insert(s.columns.get_loc(f"{m}_ci_low") + 1, f"{m}_ci_high", s[f"{m}_mean"] + h)
    if ci is not None:
        s["ci_level"] = ci
    order = sorted_configs(s, CONFIG).index.to_numpy()  # s follows groups.ngroup() numbering: both are unsorted
    row = np.empty(len(s), int)
    row[order] = np.arange(len(s))
    return s.loc[order].reset_index(drop=True), pd.Series(row[groups.ngroup().to_numpy()], index=runs.index)


def _group_keys(summary: pd.DataFrame, cell: list[str], always) -> list[str]:
    varying = [k for k in CONFIG if k not in cell and summary[k].nunique(dropna=False) > 1]
    keys = list(dict.fromkeys([*always, *varying]))
    for k in _DERIVED:
        rest = [x for x in keys if x != k]
        if k not in keys or k in always:
            continue
        if summary.groupby(cell + rest, dropna=False)[k].nunique(dropna=False).max() <= 1:
            keys = rest
    return keys


def _shortened(config: Mapping) -> bool:
    epochs, own = config.get("epochs"), config.get("recipe_epochs")
    return epochs is not None and own is not None and epochs != own


def recipe_label(config: Mapping) -> str:
    """A configuration's recipe as titles and labels name it: "step-200" where it ran the recipe's own length;
    where ``--epochs`` changed that, "step-200, 2 of 200 epochs, milestones 1,1,2" (the milestones as run), so
    that a smoke run never reads as the real recipe. ``config``: ``recipe`` and, where known, the RECIPE_RUN
    fields (milestones joined, as ``to_frame`` makes them)."""
    name = str(config["recipe"])
    if not _shortened(config):
        return name
    epochs, own, milestones = config["epochs"], config["recipe_epochs"], config.get("milestones")
    length = f"{epochs} of {own} epochs" if epochs < own else f"{epochs} epochs instead of {own}"
    return f"{name}, {length}" + (f", milestones {milestones}" if milestones else "")


def labels(frame: pd.DataFrame, keys) -> pd.Series:
    """Each row's values of ``keys``, joined by spaces, its recipe as ``recipe_label`` names it: the labels of a
    table's rows and columns and of a plot's panels and lines."""
    parts = []
    for k in keys:
        if k == "recipe":
            fields = ["recipe", *RECIPE_RUN]
            configs = list(zip(*(frame[f] for f in fields)))
            named = {c: recipe_label(dict(zip(fields, c))) for c in set(configs)}  # a few recipes, many rows
            parts.append(pd.Series([named[c] for c in configs], index=frame.index, dtype=object))
        else:
            parts.append(frame[k].astype(str))
    return functools.reduce(lambda a, b: a.str.cat(b, sep=" "), parts)


def title(keys: Mapping, run: Mapping | None = None) -> str:
    """ "step-200 bs=64", "ResNet56 CIFAR100": the notebook's headings, then any other key=value. The recipe is
    named as ``recipe_label`` says, from ``keys`` and ``run`` (the RECIPE_RUN fields every cell shares)."""
    keys = dict(keys)
    parts = [str(keys.pop("model")).replace("resnet", "ResNet")] if "model" in keys else []
    parts += [str(keys.pop("dataset")).upper()] if "dataset" in keys else []
    if "recipe" in keys:
        config = {**(run or {}), **keys}
        parts.append(recipe_label(config))
        for k in ("recipe", *RECIPE_RUN) if _shortened(config) else ("recipe",):  # said by the label
            keys.pop(k, None)
    parts += [f"bs={keys.pop('batch_size')}"] if "batch_size" in keys else []
    return " ".join(parts + [f"{k}={v}" for k, v in keys.items()]) or "all runs"


FEW = "‡"  # a cell's interval rests on fewer than FEW_SEEDS seeds


def cell_text(row, value: str) -> str:
    """A configuration's cell (``row``: its summary row): the mean ± std of ``value`` over its completed seeds, the
    confidence interval of the mean where ``summarize`` made one and 2 or more seeds completed ([low, high]), and
    how many (``(3)``; ``(2‡)`` with fewer than FEW_SEEDS), "n of N seeds" where only n of the N it should have
    completed; "failed" or "cancelled" where none did."""
    n, d = row.n, VALUES[value]
    if n == 0:
        return "failed" if row.n_failed else "cancelled" if row.n_cancelled else "–"
    mean, std = row[f"{value}_mean"], row[f"{value}_std"]
    if pd.isna(mean):  # completed, without this value (a run without a validation split has no test acc at best val)
        return "–"
    text = f"{mean:.{d}f}" + ("" if n == 1 else f" ± {std:.{d}f}")
    low, high = row.get(f"{value}_ci_low"), row.get(f"{value}_ci_high")
    interval = low is not None and not pd.isna(low)
    if interval:
        text += f" [{low:.{d}f}, {high:.{d}f}]"
    few = FEW if interval and n < FEW_SEEDS else ""
    if n < row.n_expected:
        return f"{text} ({n} of {row.n_expected} seeds{few})"
    return text if n == 1 else f"{text} ({n}{few})"


def interval_note(summary: pd.DataFrame, value: str) -> str | None:
    """The footnote of a table whose cells (``summary``'s rows) carry intervals of ``value``: the level, the method
    and, where a cell is marked FEW, what that means; None where no cell carries one."""
    low = summary.get(f"{value}_ci_low")
    if low is None or low.isna().all():
        return None
    level = float(summary.ci_level.iloc[0])
    note = (
        f"[low, high]: the {level:.0%} confidence interval of the mean over seeds, a Student t-interval (mean ± "
        f"t·std/√n, n − 1 degrees of freedom: exact for normal samples, where a 95% bootstrap over 3-10 seeds covers "
        f"only 76-90%)."
    )
    if summary.n.between(2, FEW_SEEDS - 1).any():
        two = float(t_quantile(level, 1))
        note += f" {FEW}: fewer than {FEW_SEEDS} seeds, an interval on one degree of freedom (t = {two:.1f}), wide."
    return note


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


@dataclass(frozen=True)
class Table:
    title: str
    rows: list[str]
    cols: list[str]
    cells: pd.DataFrame  # the summary rows shown
    markdown: str
    header: list[str] = field(default_factory=list)  # the markdown's cells, for other renderings (HTML)
    body: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # footnotes, below the table in every rendering


def tables(summary, rows, cols, *, value="final_test_acc", always=(), corner=None) -> list[Table]:
    """A rows x cols pivot of ``value`` for every combination of the other configuration fields that vary."""
    rows, cols = list(rows), list(cols)
    keys = _group_keys(summary, rows + cols, always)
    out = []
    groups = sorted_configs(summary, keys).groupby(keys, dropna=False, sort=False) if keys else [((), summary)]
    for group, cells in groups:
        if cells.empty:
            continue
        row_of, col_of = labels(cells, rows), labels(cells, cols)
        row_labels = list(dict.fromkeys(row_of[sorted_configs(cells, rows).index]))
        col_labels = list(dict.fromkeys(col_of[sorted_configs(cells, cols).index]))
        text = {(rl, cl): cell_text(r, value) for rl, cl, (_, r) in zip(row_of, col_of, cells.iterrows())}
        header = [corner or f"{' '.join(cols)} / {' '.join(rows)}", *col_labels]
        body = [[rl, *(text.get((rl, cl), "–") for cl in col_labels)] for rl in row_labels]
        fixed = dict(zip(keys, group if isinstance(group, tuple) else (group,)))  # shared by every cell
        run = {k: cells[k].iloc[0] for k in RECIPE_RUN if cells[k].nunique(dropna=False) == 1}
        notes = [note] if (note := interval_note(cells, value)) else []
        markdown = "\n\n".join([markdown_table(header, body), *notes])
        out.append(Table(title(fixed, run), rows, cols, cells, markdown, header, body, notes))
    return out


def default_tables(summary: pd.DataFrame, value: str = "final_test_acc") -> list[Table]:
    """The notebook's two kinds: model x dataset per (recipe, batch size), and recipe x batch size per (model,
    dataset) run with more than one of either; both with VALUES' decimals (the notebook rounded the first to 2)."""
    sweeps = [
        t
        for t in tables(
            summary, ["recipe"], ["batch_size"], value=value, always=("model", "dataset"), corner="bs / opt"
        )
        if len(t.cells) > 1
    ]
    covered = {i for t in sweeps for i in t.cells.index}
    grids = [
        t
        for t in tables(
            summary,
            ["model"],
            ["dataset"],
            value=value,
            always=("recipe", "batch_size"),
            corner="ds/model",
        )
        if len(t.cells) > 1 or not covered.issuperset(t.cells.index)
    ]
    return grids + sweeps


def comparison(table: Table, matches: pd.DataFrame, value: str = "final_test_acc") -> str:
    """The table's cells that have a published figure: ours, the reference, the difference, footnotes."""
    header, body, foot = comparison_parts(table, matches, value)
    return markdown_table(header, body) + "\n\n" + "  \n".join(foot)


def comparison_parts(
    table: Table, matches: pd.DataFrame, value: str = "final_test_acc"
) -> tuple[list[str], list[list[str]], list[str]]:
    """``comparison``'s header, rows and footnotes. Ours: final test accuracy; the test accuracy at the best
    validation epoch where runs held a validation split out; the best test epoch's only where ``value`` asks for
    it, marked as chosen on the test set. The difference is ``value``'s from the reference."""
    notes: dict[str, int] = {}
    shown_values = ["final_test_acc"]
    if matches.test_acc_at_best_val_mean.notna().any() or value == "test_acc_at_best_val":
        shown_values.append("test_acc_at_best_val")
    if value == "best_test_acc":
        shown_values.append("best_test_acc")
    body = []
    shown = zip(*(labels(matches, [c]) for c in table.rows + table.cols))
    for named, (_, m) in zip(shown, matches.iterrows()):
        note = f"{m.source}: {m.protocol_note}"
        if m.exact:
            note += " (the same protocol: recipe, batch size and epochs as published)"
        else:
            note += f" (a different protocol: {m.ref_recipe}, batch size {m.ref_batch_size}, {m.ref_epochs} epochs)"
        k = notes.setdefault(note, len(notes) + 1)
        ours = [cell_text(m, v) for v in shown_values]
        diff, d = m[f"{value}_mean"] - m.ref_acc, ACC_DECIMALS
        low, high = m.get(f"{value}_ci_low"), m.get(f"{value}_ci_high")
        seeds = plural(int(m.n), "seed")
        inside = (
            f"– ({seeds})"
            if low is None or pd.isna(low)
            else f"{'yes' if low <= m.ref_acc <= high else 'no'} ({seeds})"
        )
        body.append([*named, *ours, f"{m.ref_acc:.{d}f} [{k}]", "–" if pd.isna(diff) else f"{diff:+.{d}f}", inside])
    header = [
        *table.rows,
        *table.cols,
        *(VALUE_NAMES[v] + ("†" if v == "best_test_acc" else "") for v in shown_values),
        "published",
        f"Δ {VALUE_NAMES[value]} − published",
        "published inside our interval",
    ]
    foot = [f"[{k}] {note}" for note, k in notes.items()]
    if value == "best_test_acc":
        foot.append("† the epoch of highest test accuracy: selected on the test set, so optimistic.")
    return header, body, foot


def _first_line(error) -> str:
    lines = error.strip().splitlines() if isinstance(error, str) else []
    return lines[0] if lines else "no error recorded"


def _describe(r) -> str:
    """A run in a list: its id and spec, and the mode it asked torch.compile for."""
    compiled = f" compile={r.compile}" if r.compile != EAGER else ""
    return f"`{r.run_id}` ({r.model} {r.dataset} {r.recipe} bs={r.batch_size} seed={r.seed}{compiled})"


def incomplete(
    runs: pd.DataFrame, known_ids: set, no_record: list[str], unreadable: list[str], expected=None, limit: int = 50
) -> list[str]:
    """Markdown lines listing failed and cancelled runs (with their error), runs that asked for torch.compile but
    trained eagerly (with the reason), runs without a record or with an unreadable one and, given the grid's run
    specs, runs not submitted."""
    specs, lost = {s.run_id: s for s in expected or ()}, set(no_record)
    desc = lambda s: f"{s.model} {s.dataset} {s.recipe.name} bs={s.batch_size} seed={s.seed}"
    fell_back = runs[runs.compile_fallback.notna()]
    ended = lambda state: [f"{_describe(r)}: {_first_line(r.error)}" for r in runs[runs.status.eq(state)].itertuples()]
    kinds = {
        "failed": ended("failed"),
        "cancelled": ended("cancelled"),
        "trained eagerly, torch.compile failed": [
            f"{_describe(r)}: {_first_line(r.compile_fallback)}" for r in fell_back.itertuples()
        ],
        "no record (still running, or lost)": [
            f"`{i}`" + (f" ({desc(specs[i])})" if i in specs else "") for i in no_record if i not in known_ids
        ],
        "unreadable record (see the warning)": [f"`{i}`" for i in unreadable if i not in known_ids],
        "not submitted": [f"`{i}` ({desc(s)})" for i, s in specs.items() if i not in known_ids and i not in lost],
    }
    lines = []
    for kind, items in kinds.items():
        lines += [f"- {kind}: {item}" for item in items[:limit]]
        lines += [f"- {kind}: … and {len(items) - limit} more (see runs.parquet)"] if len(items) > limit else []
    return lines


def summary_line(runs: pd.DataFrame, value: str) -> str:
    """The report's first line: how many runs, how many completed, failed (and cancelled), what the cells hold."""
    counts = runs.status.value_counts()
    shown = [state for state in STATES if state in ("completed", "failed") or counts.get(state)]
    what = {
        "final_test_acc": "final-epoch test accuracy",
        "test_acc_at_best_val": "test accuracy at the epoch of best validation accuracy (runs without a validation "
        "split: –)",
        "best_test_acc": "best-epoch test accuracy (the epoch selected on the test set, so optimistic)",
        "images_per_s": "training images/s",
        "train_minutes": "training minutes",
    }[value]
    return (
        f"{plural(len(runs), 'run')}: {', '.join(f'{counts.get(state, 0)} {state}' for state in shown)}. Cells: "
        f"{what}; mean ± std [the interval of the mean, unless --no-ci] (n seeds) where a configuration has more "
        "than one seed; (n of N seeds) where only n of the N seeds its records or the grid (--grid) give it "
        "completed; – no record; failed, cancelled: none of its runs completed."
    )


@dataclass(frozen=True)
class Part:
    """A table of a report's section and the notes below it, as tables.md and report.html both show it."""

    header: list[str]
    body: list[list[str]]
    notes: list[str]
    numeric_from: int  # the first column of numbers (right-aligned in HTML)

    @property
    def markdown(self) -> str:
        return "\n\n".join([markdown_table(self.header, self.body), *(["  \n".join(self.notes)] if self.notes else [])])


def render(
    runs,
    tabs: list[Table],
    matches: list[pd.DataFrame | None],
    missing: list[str],
    value: str,
    *,
    hours: Part | None = None,
    timing: Sequence[Part] = (),
    packing: Part | None = None,
    compared: Part | None = None,
) -> str:
    """tables.md. ``hours``: ``device_hours_part``; ``timing``: ``time_estimate_parts``; ``packing``:
    ``packing_part``; ``compared``: ``compare.compare``'s."""
    out = ["# cifarbench results", "", summary_line(runs, value)]
    out += ["", "## Comparison", "", compared.markdown] if compared else []
    for t, m in zip(tabs, matches):
        out += ["", f"## {t.title}", "", t.markdown]
        out += ["", comparison(t, m, value)] if m is not None and len(m) else []
    out += ["", "## Device-hours", "", hours.markdown] if hours else []
    out += ["", "## Time estimates", "", "\n\n".join(p.markdown for p in timing)] if timing else []
    out += ["", "## Packing and fusion", "", packing.markdown] if packing else []
    out += ["", "## Missing, failed and lost runs", ""] + (missing or ["None: every run has a completed record."])
    return "\n".join(out) + "\n"


GPU_H, CPU_H = "GPU-h", "CPU-core-h"  # device-hours on GPUs, or on CPU cores where an allocation had none
HOURS = {"used": "wall_s", "estimated": "estimated_s", "reserved": "time_limit_s"}  # -> the task's seconds of it
SOURCES = ("records", "bench", "prior")  # the kinds of estimate, as ``estimate_source`` begins


def _ids(value) -> list[str]:
    return [] if value is None or isinstance(value, float) else list(value)  # a null list reads as None (or NaN)


def allocations(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The array tasks (allocations) ``runs`` trained in, and each run's task. A task is named by its sorted run
    ids: the run's own and those it was packed or fused with. One row per task: ``runs`` (its runs here), ``unit``
    (GPU_H, CPU_H; None where the allocation is not recorded), ``devices`` (its GPUs, or its CPU cores where it had
    no GPU), ``wall_s`` (the longest wall-clock time of its runs: the allocation lasted as long as its longest run),
    ``done_wall_s`` (the same over its completed runs), ``estimated_s`` and ``time_limit_s`` (as submitted, shared
    by its runs) and ``source`` (the kind of estimate, one of SOURCES)."""
    keys = [
        " ".join(sorted({i, *_ids(p), *_ids(f)})) for i, p, f in zip(runs.run_id, runs.packed_with, runs.fused_with)
    ]
    task_of = pd.Series(keys, index=runs.index, dtype=object)
    r = runs.assign(
        task=task_of,
        done_wall=runs.wall_seconds.where(runs.status.eq("completed")),
        source=[s.split(":", 1)[0].strip() if isinstance(s, str) else None for s in runs.estimate_source],
    )
    tasks = r.groupby("task", sort=False).agg(
        runs=("run_id", "size"),
        gpus=("alloc_gpus", "max"),
        cpus=("alloc_cpus", "max"),
        wall_s=("wall_seconds", "max"),
        done_wall_s=("done_wall", "max"),
        estimated_s=("estimated_s", "max"),
        time_limit_s=("time_limit_s", "max"),
        source=("source", "first"),
    )
    on_gpu, on_cpus = tasks.gpus.gt(0), tasks.gpus.eq(0) & tasks.cpus.notna()
    tasks["devices"] = tasks.gpus.where(on_gpu, tasks.cpus.where(on_cpus)).astype(float)
    tasks["unit"] = pd.Series(None, index=tasks.index, dtype=object).mask(on_gpu, GPU_H).mask(on_cpus, CPU_H)
    return tasks, task_of


@dataclass(frozen=True)
class DeviceHours:
    runs: int
    hours: dict[tuple[str, str], float]  # (a key of HOURS, GPU_H or CPU_H) -> device-hours
    left_out: dict[str, int]  # a key of HOURS -> runs without the data for it


def device_hours(tasks: pd.DataFrame, task_of: pd.Series) -> DeviceHours:
    """The device-hours used, estimated and reserved of the runs ``task_of`` names (run -> its row of ``tasks``,
    as ``allocations`` gives them): each task's hours once where all its runs are among them, else their share
    (the task's hours times the part of its runs that are)."""
    here = np.bincount(tasks.index.get_indexer(task_of), minlength=len(tasks))  # each task's runs among them
    share = here / tasks.runs.to_numpy()
    units = tasks.unit.to_numpy()
    hours, left_out = {}, {}
    for what, seconds in HOURS.items():
        h = tasks[seconds].to_numpy(float) * tasks.devices.to_numpy(float) / 3600 * share
        left_out[what] = int(here[np.isnan(h)].sum())
        for unit in (GPU_H, CPU_H):
            counted = (here > 0) & (units == unit) & ~np.isnan(h)
            if counted.any():
                hours[what, unit] = float(h[counted].sum())
    return DeviceHours(runs=len(task_of), hours=hours, left_out=left_out)


def device_hours_part(
    runs: pd.DataFrame,
    tabs: list[Table],
    config: pd.Series,
    folder: pd.DataFrame | None = None,
    allocated: tuple[pd.DataFrame, pd.Series] | None = None,
) -> Part | None:
    """``device_hours`` of the results folder (``folder``: all its records; default ``runs``), of the runs selected
    from it (``runs``) where they are fewer, and of each table's runs (``config``: each run's row of the summary,
    as ``summarize`` gives it). None when no run's allocation is recorded. ``allocated``: ``allocations(folder)``
    where the caller has it already."""
    folder = runs if folder is None else folder
    tasks, task_of = allocations(folder) if allocated is None else allocated
    units = [u for u in (GPU_H, CPU_H) if tasks.unit.eq(u).any()]
    if not units:
        return None
    scopes = [("the results folder", folder.index)]
    scopes += [("the runs selected (--where)", runs.index)] if len(runs) < len(folder) else []
    scopes += [(t.title, config.index[config.isin(t.cells.index)]) for t in tabs]
    figures = [(name, device_hours(tasks, task_of.loc[index])) for name, index in scopes]

    def cell(f: DeviceHours, what: str) -> str:
        text = "; ".join(f"{f.hours[what, u]:.2f} {u}" for u in units if (what, u) in f.hours) or "–"
        return text + (f" ({plural(f.left_out[what], 'run')} left out)" if f.left_out[what] else "")

    header = ["runs of", "runs", *HOURS]
    body = [[name, str(f.runs), *(cell(f, what) for what in HOURS)] for name, f in figures]
    notes = [
        "The allocations (array tasks) the runs trained in, in GPUs × hours, or CPU cores × hours where an "
        "allocation had no GPU (the two are never added). Used: the allocation's wall-clock time, the longest of its "
        "runs' (all attempts); estimated and reserved: the estimate and the time limit `submit` gave it. An "
        "allocation shared by a pack or a fused group counts once for the folder; a table counts each of its runs' "
        "share (the allocation's hours over its runs with a record), so that tables add up, but a run shown in two "
        "tables counts in both."
    ]
    if any(any(f.left_out.values()) for _, f in figures):
        notes.append(
            "Left out of a figure: runs without its data. Used needs the allocation and the wall-clock time (not in "
            "records before record/5, nor in a killed process's); estimated and reserved need the allocation, the "
            "estimate and the time limit (not in runs started by `cifarbench run`, nor in records before record/3)."
        )
    return Part(header, body, notes, numeric_from=1)


def trained(runs: pd.DataFrame) -> pd.Series:
    """How each run shared its allocation: "alone", "pack of K" or "fused K"."""
    fused, packed = runs.fuse_size.fillna(1), runs.pack_size.fillna(1)
    text = np.where(fused > 1, "fused " + fused.astype(int).astype(str), "alone")
    text = np.where((fused <= 1) & (packed > 1), "pack of " + packed.astype(int).astype(str), text)
    return pd.Series(text, index=runs.index, dtype=object)


def packing_part(runs: pd.DataFrame) -> Part | None:
    """What packing and fusion gave: the completed runs' training images/s per model, batch size, device and way of
    training (``trained``, and MPS where packed runs shared a GPU), per run and per allocation (per run times the
    runs the allocation trained at once), and the allocation's against a run's alone. None when no completed run
    was packed or fused."""
    done = runs[runs.status.eq("completed") & runs.images_per_s.notna()]
    ways = trained(done)
    if ways.eq("alone").all():
        return None
    fused = done.fuse_size.fillna(1)
    r = done.assign(
        trained=ways,
        mps=done.mps.fillna("–"),
        device=done.device_name.fillna("–"),
        at_once=fused.where(fused > 1, done.pack_size.fillna(1)),
    )
    keys = ["model", "batch_size", "device", "at_once", "trained", "mps"]
    cells = sorted_configs(
        r.groupby(keys, sort=False).agg(runs=("run_id", "size"), per_run=("images_per_s", "mean")).reset_index(),
        keys,
    )
    alone = cells[cells.trained.eq("alone")].set_index(["model", "batch_size", "device"]).per_run
    body, d = [], VALUES["images_per_s"]
    for c in cells.itertuples():
        allocation = c.per_run * c.at_once
        base = alone.get((c.model, c.batch_size, c.device))
        body.append(
            [str(c.model), str(c.batch_size), str(c.device), c.trained, c.mps, str(c.runs), f"{c.per_run:.{d}f}",
             f"{allocation:.{d}f}", "–" if base is None else f"{allocation / base:.2f}×"]
        )  # fmt: skip
    header = ["model", "batch_size", "device", "trained", "MPS", "runs", "images/s per run", "images/s per allocation",
              "allocation / alone"]  # fmt: skip
    notes = [
        "Completed runs' training images/s (each epoch's training images over its training-pass seconds, the mean "
        "over epochs), by how they shared their allocation: alone, a pack of K (K runs side by side, sharing its GPU "
        "through CUDA MPS where MPS is on, time-sliced where off, or splitting its CPUs) or a fused group of K (K "
        "seeds stacked into one vectorised model). Per allocation: per run times K, the runs that trained at once; "
        "allocation / alone: that over a run alone of the same model and batch size on the same device (– where "
        "none trained alone)."
    ]
    return Part(header, body, notes, numeric_from=5)


def time_estimate_parts(
    runs: pd.DataFrame, folder: pd.DataFrame | None = None, allocated: tuple[pd.DataFrame, pd.Series] | None = None
) -> list[Part]:
    """How good ``submit``'s estimates were, over array tasks (a pack or a fused group is one task) with a completed
    run and an estimate: per kind of estimate (SOURCES), measured / estimated time, its median, 25th–75th percentile
    and range; and per configuration and way of training (alone, packed, fused), its tasks' mean estimated and
    measured minutes and time limit. Measured: the task's wall-clock time, the longest of its completed runs'. A
    task is taken whole from ``folder`` (every record of the results folder; default ``runs``), also where ``runs``
    selects only some of its runs. Empty when no task has both an estimate and a measured time. ``allocated``:
    ``allocations(folder)`` where the caller has it already."""
    folder = runs if folder is None else folder
    done = runs[runs.status.eq("completed") & runs.estimated_s.notna()]
    if done.empty:
        return []
    tasks, task_of = allocations(folder) if allocated is None else allocated
    estimated = tasks.loc[task_of.loc[done.index].unique()]
    timed = estimated[estimated.done_wall_s.notna()]
    if timed.empty:
        return []
    ratio = timed.done_wall_s / timed.estimated_s
    by_source = {kind: r for kind, r in ratio.groupby(timed.source.fillna("not recorded"))}
    order = lambda kind: (SOURCES.index(kind) if kind in SOURCES else len(SOURCES), kind)
    body = []
    for kind in sorted(by_source, key=order):
        r = by_source[kind]
        q1, median, q3 = r.quantile([0.25, 0.5, 0.75])
        body.append([kind, str(len(r)), f"{median:.2f}", f"{q1:.2f}–{q3:.2f}", f"{r.min():.2f}–{r.max():.2f}"])
    notes = [
        "Over array tasks (a pack or a fused group is one task) with a completed run: measured is the task's "
        "wall-clock time, the longest of its completed runs' (all attempts, start-up included), estimated is the "
        "estimate `submit` gave the task; the spread is the 25th–75th percentile (interpolated) and the range."
    ]
    if len(timed) < len(estimated):
        notes.append(
            f"Left out: {plural(len(estimated) - len(timed), 'task')} with an estimate but no wall-clock time "
            "(records before record/5)."
        )
    sources = Part(
        ["estimate from", "tasks", "median measured / estimated", "25th–75th percentile", "min–max"],
        body,
        notes,
        numeric_from=1,
    )

    keys = ["model", "dataset", "recipe", "batch_size"]
    # a run shortened by --epochs takes less than its recipe's time: a row of its own
    pairs = done.assign(task=task_of.loc[done.index], trained=trained(done))
    pairs = pairs[pairs.task.isin(timed.index)].drop_duplicates(["task", *keys, *RECIPE_RUN])
    t = timed.loc[pairs.task]
    per_task = pairs.assign(
        estimated=t.estimated_s.to_numpy() / 60,
        measured=t.done_wall_s.to_numpy() / 60,
        limit=t.time_limit_s.to_numpy() / 60,
    )
    g = per_task.groupby([*keys, *RECIPE_RUN, "trained"], sort=False, dropna=False)
    cells = sorted_configs(g.agg(tasks=("task", "size"), estimated=("estimated", "mean"), measured=("measured", "mean"),
                          limit=("limit", "mean")).reset_index(), [*keys, *RECIPE_RUN, "trained"])  # fmt: skip
    shown = zip(*(labels(cells, [k]) for k in keys))
    body = [
        [*named, r.trained, str(r.tasks), f"{r.estimated:.1f}", f"{r.measured:.1f}", f"{r.measured / r.estimated:.2f}",
         "–" if pd.isna(r.limit) else f"{r.limit:.0f}"]
        for named, (_, r) in zip(shown, cells.iterrows())
    ]  # fmt: skip
    header = [*keys, "trained", "tasks", "estimated min", "measured min", "measured / estimated", "limit min"]
    note = "Per configuration, the mean over its tasks; a task that trained several configurations counts in each."
    return [sources, Part(header, body, [note], numeric_from=5)]
