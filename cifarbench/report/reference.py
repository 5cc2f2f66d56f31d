"""Published CIFAR ResNet figures (package data) and which collected configurations they describe."""

from __future__ import annotations

from importlib import resources

import pandas as pd

DEFAULT_SOURCE = "seed-notebook"
COMPARED = ("final_test_acc", "test_acc_at_best_val", "best_test_acc")  # the values a published figure is set against
# Everything is compared as accuracy; the papers publish test error.
_AS_ACCURACY = {"final_test_acc": lambda v: v, "test_error": lambda v: 1 - v}


def load_published() -> pd.DataFrame:
    """published.csv with an ``ref_acc`` column (accuracy, whatever the published metric)."""
    with resources.files("cifarbench.report").joinpath("published.csv").open(encoding="utf-8") as fh:
        ref = pd.read_csv(fh)
    unknown = set(ref.metric) - set(_AS_ACCURACY)
    if unknown:
        raise ValueError(f"published.csv: unknown metric {sorted(unknown)}; known: {sorted(_AS_ACCURACY)}")
    ref["ref_acc"] = [_AS_ACCURACY[m](v) for m, v in zip(ref.metric, ref.value)]
    return ref


def sources(published: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(published.source))


def match(
    cells: pd.DataFrame, shown: list[pd.Index], published: pd.DataFrame, source: str | None = None
) -> list[pd.DataFrame]:
    """Per table, its cells (configurations) that have a published figure, one row each, with the figure beside
    them. ``cells`` holds every table's cells (the summary's rows), ``shown`` the labels in ``cells`` of each
    table's: they are matched once, and a cell matches alike in every table that shows it.

    A match is exact when dataset, model, recipe, batch size and epochs all agree. With the default source
    only exact matches count. A source named explicitly (the papers use recipes cifarbench does not run) is
    also compared where it publishes a single figure for the (dataset, model) pair; ``exact`` is then False
    and the footnote must say how the protocols differ."""
    ref = published[published.source == (source or DEFAULT_SOURCE)].rename(
        columns={"recipe": "ref_recipe", "batch_size": "ref_batch_size", "epochs": "ref_epochs"}
    )
    m = cells.rename_axis("cell").reset_index().merge(ref, on=["dataset", "model"])
    m["exact"] = (m.recipe == m.ref_recipe) & (m.batch_size == m.ref_batch_size) & (m.epochs == m.ref_epochs)
    by_cell = m.groupby("cell").exact
    loose = (source is not None) & ~by_cell.transform("any") & (by_cell.transform("size") == 1)
    m = m[m.exact | loose]
    return [m[m.cell.isin(labels)].drop(columns="cell").reset_index(drop=True) for labels in shown]
