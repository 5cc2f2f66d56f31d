"""Figures of collected runs: test-accuracy curves per table, final accuracy against model size.

Only ``cifarbench.report.collect`` imports this module, and only when plots are wanted: matplotlib stays out of
every other command. ``Figure`` is used without pyplot, so there is no global backend or figure state; PNGs go
through Agg.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import re
import textwrap
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from cifarbench.report.tables import CONFIG, RECIPE_RUN, Table, labels, model_depth, recipe_label, title
from cifarbench.system import usable_cores

# What each worker draws: set before the pool forks, so that the runs are not pickled to it.
_FIGURES: list[Callable[[], tuple[str, Figure] | None]] = []


@contextlib.contextmanager
def drawing(runs: pd.DataFrame, summary: pd.DataFrame, tabs: list[Table], folder) -> Iterator[Callable[[], list[Path]]]:
    """Draw one curves figure per table and one size figure per (dataset, recipe as run) in the background, one
    process per core, while the caller goes on (writing runs.parquet and report.html); yields a function that waits
    for the figures and returns the PNGs' paths. Every figure is drawn by the time the block ends; an error in the
    block stops the drawing.

    ``runs`` has a ``config`` column: the row in ``summary`` (and in each table's cells) of the run's
    configuration, and ``test_acc``, its curve."""
    global _FIGURES
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = runs[runs.status.eq("completed")]
    sized = summary[summary.n > 0]
    _FIGURES = [functools.partial(curves, done, t) for t in tabs]
    _FIGURES += [functools.partial(size_figure, key, group) for key, group in _size_groups(sized)]
    # Drawing a figure costs a few tenths of a second of matplotlib's Python, whatever the runs: 31 of them are most
    # of a collect of 10,000 runs, so each core draws its share in a forked process (the runs are there already),
    # and the caller's own work overlaps them.
    cores = min(usable_cores(), len(_FIGURES))
    pool = None
    drawn: Callable[[], Iterable[str | None]]
    if cores > 1 and "fork" in multiprocessing.get_all_start_methods():
        pool = multiprocessing.get_context("fork").Pool(cores)
        drawn = pool.map_async(functools.partial(_draw, folder), range(len(_FIGURES)), chunksize=1).get
    else:
        drawn = functools.partial(map, functools.partial(_draw, folder), range(len(_FIGURES)))
    try:
        paths = functools.cache(lambda: [folder / name for name in drawn() if name])
        yield paths
        paths()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _FIGURES = []


def _draw(folder: Path, index: int) -> str | None:
    """Draw and save figure ``index`` of _FIGURES; its file name, or None where it has nothing to show."""
    made = _FIGURES[index]()
    if made is None:
        return None
    name, fig = made
    # zlib's fastest level: a seventh of a figure's time at the default level, for files a sixth larger
    fig.savefig(folder / name, dpi=100, pil_kwargs={"compress_level": 1})
    return name


def _margins(fig: Figure, *, title_lines: int) -> None:
    """Fixed margins, in inches, for axes labelled on their left and bottom and titled above, under a title of
    ``title_lines``: constrained layout would fit them to the labels, at a third of a figure's drawing time."""
    width, height = fig.get_size_inches()
    top = 0.12 + 0.24 * title_lines + 0.3  # the title's lines, then the panels' titles
    fig.subplots_adjust(
        left=0.7 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - top / height, wspace=0.12
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.-]+", "_", text).strip("_")


def _ordered(df: pd.DataFrame, keys: list[str]) -> list[str]:
    order = df.sort_values(keys, key=lambda c: c.map(lambda m: (model_depth(m), m)) if c.name == "model" else c)
    return list(dict.fromkeys(labels(order, keys)))


def curves(done: pd.DataFrame, table: Table) -> tuple[str, Figure] | None:
    """The test-accuracy curves of a table's completed runs (``done``), one panel per column, and the PNG's name;
    None when none of its runs completed."""
    runs = done[done.config.isin(table.cells.index)]
    if runs.empty:
        return None
    panels, lines = _ordered(runs, table.cols), _ordered(runs, table.rows)
    panel_of, line_of = labels(runs, table.cols), labels(runs, table.rows)
    fig = Figure(figsize=(1 + 5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    axes[0].set_ylabel("test accuracy")  # the panels share it
    for ax, panel in zip(axes, panels):
        for line in lines:
            curves = [
                np.asarray(c, float)
                for c in runs.test_acc[(panel_of == panel) & (line_of == line)]
                if c is not None and len(c)
            ]
            if not curves:
                continue
            # A run cut short by a shortened recipe has fewer epochs; the band covers the epochs all share.
            acc = np.stack([c[: min(map(len, curves))] for c in curves])
            epochs, mean = np.arange(1, acc.shape[1] + 1), acc.mean(axis=0)
            ax.plot(epochs, mean, label=line if len(acc) == 1 else f"{line} (n={len(acc)})", linewidth=1.2)
            if len(acc) > 1:
                std = acc.std(axis=0, ddof=1)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set(title=f"{' '.join(table.cols)} {panel}", xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        ax.grid(alpha=0.3)
        # accuracy rises over the epochs, so the lower right is free; "best" would cost a quarter of the figure
        ax.legend(title=" ".join(table.rows), fontsize="small", loc="lower right")
    # two lines: one narrow panel cannot hold the whole title on one
    # as many lines as the panels' width needs: a shortened recipe's title is long, one panel is narrow
    heading = textwrap.wrap(f"Test accuracy per epoch: {table.title}", width=11 * (1 + 5 * len(panels)))
    fig.suptitle("\n".join([*heading, "(mean, band ± 1 std over seeds)"]))
    _margins(fig, title_lines=len(heading) + 1)
    return f"curves_{_slug(table.title)}.png", fig


def sizes(summary: pd.DataFrame) -> Iterator[tuple[str, Figure]]:
    """Final accuracy against depth and parameters, one figure per dataset and recipe as run (a shortened one
    apart from the full length), each with its PNG's name."""
    return (size_figure(key, group) for key, group in _size_groups(summary))


def _size_groups(summary: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    return list(summary.groupby(["dataset", "recipe", *RECIPE_RUN], sort=True))


def _error_bars(configs: pd.DataFrame) -> np.ndarray:
    """The error bars of each configuration's mean: below and above, its interval where ``summarize`` made one (else
    ± its std); none with one seed."""
    mean = configs.final_test_acc_mean.to_numpy(float)
    if "final_test_acc_ci_low" in configs:
        bars = [
            mean - configs.final_test_acc_ci_low.to_numpy(float),
            configs.final_test_acc_ci_high.to_numpy(float) - mean,
        ]
    else:
        std = configs.final_test_acc_std.to_numpy(float)
        bars = [std, std]
    return np.nan_to_num(np.array(bars))


def size_figure(dataset_recipe: tuple, group: pd.DataFrame) -> tuple[str, Figure]:
    """The size figure of one dataset and recipe as run (``dataset_recipe``) and its configurations (``group``)."""
    dataset, *recipe = dataset_recipe
    run = recipe_label(dict(zip(["recipe", *RECIPE_RUN], recipe)))
    varying = [k for k in CONFIG if k not in ("dataset", "recipe", "model") and group[k].nunique(dropna=False) > 1]
    series = ["batch_size", *(k for k in varying if k != "batch_size")]
    fig = Figure(figsize=(12, 4.5))
    ax_depth, ax_params = fig.subplots(1, 2, sharey=True)
    for i, (key, s) in enumerate(group.groupby(series, dropna=False, sort=True)):
        s = s.sort_values("model", key=lambda c: c.map(model_depth))
        label = title(dict(zip(series, key if isinstance(key, tuple) else (key,))))
        for ax, x in ((ax_depth, s.model.map(model_depth)), (ax_params, s.params)):
            ax.errorbar(
                x,
                s.final_test_acc_mean,
                yerr=_error_bars(s),
                marker="o",
                linestyle="none",
                capsize=3,
                label=label,
            )
            for xi, yi, name in zip(x, s.final_test_acc_mean, s.model) if i == 0 else ():  # once is enough
                ax.annotate(name, (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=7)
    depths = sorted(set(group.model.map(model_depth)))
    ax_depth.set(xscale="log", xlabel="depth (layers)", ylabel="final test accuracy")
    ax_depth.set_xticks(depths, [str(d) for d in depths])
    ax_params.set(xscale="log", xlabel="parameters")
    for ax in (ax_depth, ax_params):
        ax.xaxis.set_minor_locator(NullLocator())  # a log axis' minor ticks: dozens of artists that say little
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    bars = "± std" if "ci_level" not in group else f"{group.ci_level.iloc[0]:.0%} confidence interval"
    fig.suptitle(f"Final test accuracy against model size: {dataset}, {run} (mean and {bars} over seeds)")
    _margins(fig, title_lines=1)
    # groupby keys are typed Hashable; the dataset column holds names
    return f"size_{_slug(cast(str, dataset))}_{_slug(run)}.png", fig
