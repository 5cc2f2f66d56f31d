"""``collect --compare FIELD=A,B``: A against B in every configuration that has completed runs of both, every other
field held equal. Pure functions of the runs' DataFrame; the statistics are ``cifarbench.report.stats``'."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cifarbench.errors import UsageError, check_name
from cifarbench.report import stats
from cifarbench.report.tables import CONFIG, VALUES, Part, labels, sorted_configs

# Fields that follow from another: comparing two recipes compares their schedules, learning rates and lengths too.
_FOLLOWS = {
    "recipe": ("recipe_epochs", "lr", "momentum", "weight_decay", "schedule", "milestones", "gamma", "epochs"),
    "epochs": ("milestones",),
}


@dataclass(frozen=True)
class Compare:
    field: str
    a: str
    b: str


def parse_compare(text: str) -> Compare:
    """``FIELD=A,B`` (a configuration field, two different values), else UsageError."""
    key, eq, values = text.partition("=")
    pair = [v.strip() for v in values.split(",")]
    if not eq or len(pair) != 2 or not all(pair) or pair[0] == pair[1]:
        raise UsageError(f"--compare {text!r}: write FIELD=A,B with two different values, e.g. recipe=cos-200,step-200")
    return Compare(check_name(key.strip(), CONFIG, "--compare field"), *pair)


def compare(
    runs: pd.DataFrame,
    what: Compare,
    value: str = "final_test_acc",
    level: float = stats.DEFAULT_LEVEL,
    target: float = 0.002,
) -> Part:
    """Per configuration with completed runs of both A and B (``what``), every field but ``what.field`` (and those
    that follow from it) equal: each side's seeds, mean and interval, the difference A - B with Welch's interval,
    the probability that a run of A beats a run of B, a verdict, and the seeds each side needs for an interval of
    half-width ``target`` at its observed spread. UsageError where no configuration has both."""
    done = runs[runs.status.eq("completed") & runs[value].notna()]
    side = done[what.field].astype(str).str.lower()
    a, b = done[side.eq(what.a.lower())], done[side.eq(what.b.lower())]
    held = [k for k in CONFIG if k != what.field and k not in _FOLLOWS.get(what.field, ())]
    if a.empty or b.empty:
        have = sorted(set(done[what.field].astype(str)))
        missing = " and ".join(v for v, s in ((what.a, a), (what.b, b)) if s.empty)
        raise UsageError(
            f"--compare {what.field}={what.a},{what.b}: no completed run has {what.field}={missing}; "
            f"the completed runs have {what.field} {', '.join(have[:20]) or 'none'}"
        )
    # a configuration's key: its held fields as text, nulls included, so that both sides group alike
    key_of = lambda frame: functools.reduce(
        lambda x, y: x.str.cat(y, sep="\x1f"), (frame[k].astype(str).fillna("\x00") for k in held)
    )
    a_groups, b_groups = a.groupby(key_of(a), sort=False), b.groupby(key_of(b), sort=False)
    shared = [k for k in a_groups.groups if k in b_groups.groups]
    if not shared:
        raise UsageError(
            f"--compare {what.field}={what.a},{what.b}: no configuration has completed runs of both with every other "
            f"field equal ({', '.join(held[:4])}, ...)"
        )
    firsts = sorted_configs(pd.DataFrame([a_groups.get_group(k).iloc[0] for k in shared]).assign(_key=shared), held)
    varying = [k for k in held if firsts[k].astype(str).nunique() > 1] or ["model"]
    d = VALUES[value]
    body = []
    for key, named in zip(firsts._key, labels(firsts, varying)):
        x, y = a_groups.get_group(key)[value].to_numpy(float), b_groups.get_group(key)[value].to_numpy(float)
        diff = stats.difference(x, y, level)
        need = [
            stats.seeds_needed(float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), target, level) for v in (x, y)
        ]
        body.append(
            [
                named,
                f"{len(x)} / {len(y)}",
                _mean(x, level, d),
                _mean(y, level, d),
                f"{diff.delta:+.{d}f}" + ("" if np.isnan(diff.low) else f" [{diff.low:+.{d}f}, {diff.high:+.{d}f}]"),
                f"{diff.improvement:.2f}",
                diff.verdict,
                " / ".join("–" if n is None else str(n) for n in need),
            ]
        )
    header = [
        " ".join(varying),
        "seeds A / B",
        f"A: {what.a}",
        f"B: {what.b}",
        "A − B [interval]",
        "P(A > B)",
        "verdict",
        f"seeds for ±{target:g} A / B",
    ]
    notes = [
        f"{what.field} {what.a} (A) against {what.b} (B), {value}: each configuration's completed runs, every other "
        "field equal. Each side: mean [its "
        f"{level:.0%} t-interval]. A − B: the difference of means with Welch's {level:.0%} interval. P(A > B): the "
        "probability that a run of A beats a run of B, over every pair of runs (ties count half). Verdict: better "
        "or worse where the interval of A − B excludes 0, else within noise (always with fewer than 2 seeds a "
        f"side). Seeds for ±{target:g}: the seeds each side would need for a t-interval that narrow at its observed "
        "spread (–: unknown with 1 seed); add them with `seeds:` in the grid before a claim rests on the difference."
    ]
    return Part(header, body, notes, numeric_from=1)


def _mean(values: np.ndarray, level: float, decimals: int) -> str:
    low, high = stats.mean_interval(values, level)
    text = f"{values.mean():.{decimals}f}"
    return text if np.isnan(low) else f"{text} [{low:.{decimals}f}, {high:.{decimals}f}]"
