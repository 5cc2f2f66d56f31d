"""Interval estimates over seeds, pure functions of numbers: the confidence interval of a mean, the difference of two
means, the probability of improvement and the seeds a chosen precision takes.

The interval is Student's t-interval, mean ± t(level, n - 1) · s / √n, with the t quantile from scipy
(``scipy.special.stdtrit``). A cifarbench cell has 2 to 10 seeds: the t-interval is exact for normal samples and
final accuracies over seeds are close to normal, whereas a bootstrap over so few seeds resamples a handful of values
and covers far less than it claims (a 95% percentile bootstrap covers the mean of normal samples about 76% of the
time with 3 seeds, 84% with 5, 90% with 10: simulated, 2,000 samples each).
The difference of two means uses Welch's interval (unequal variances, Welch-Satterthwaite degrees of freedom); the
probability of improvement is P(X > Y) + P(X = Y) / 2 over every pair of runs, as rliable defines it (Agarwal et al.
2021).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import stdtrit

DEFAULT_LEVEL = 0.95
FEW_SEEDS = 3  # a cell with fewer seeds has an interval on one degree of freedom: wide, and said to be
MAX_SEEDS = 1000  # ``seeds_needed`` looks no further


def check_level(level: float) -> float:
    """``level`` itself where it is a confidence level (0 < level < 1), else ValueError."""
    if not 0 < level < 1:
        raise ValueError(f"a confidence level is between 0 and 1 (e.g. 0.95), not {level}")
    return level


def t_quantile(level: float, df):
    """The two-sided Student t quantile for ``level`` on ``df`` degrees of freedom (array-like)."""
    return stdtrit(np.asarray(df, float), (1 + level) / 2)


def half_width(std, n, level: float = DEFAULT_LEVEL):
    """The t-interval's half-width of a mean of ``n`` samples of standard deviation ``std`` (ddof 1), array-like;
    NaN where n < 2."""
    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n >= 2, t_quantile(level, np.maximum(n - 1, 1)) * np.asarray(std, float) / np.sqrt(n), np.nan)


def mean_interval(values, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The t-interval of the mean of ``values``; (NaN, NaN) for fewer than 2."""
    x = np.asarray(values, float)
    if len(x) < 2:
        return float("nan"), float("nan")
    h = float(half_width(x.std(ddof=1), len(x), level))
    return float(x.mean()) - h, float(x.mean()) + h


def probability_of_improvement(a, b) -> float:
    """P(a run of A beats a run of B): over every pair, 1 where A's value is higher, 1/2 where equal."""
    x, y = np.asarray(a, float)[:, None], np.asarray(b, float)[None, :]
    return float(((x > y) + 0.5 * (x == y)).mean())


@dataclass(frozen=True)
class Difference:
    """A's mean minus B's, its interval, the probability of improvement and the verdict."""

    delta: float
    low: float
    high: float
    improvement: float
    verdict: str  # "better" (the interval above 0), "worse" (below 0) or "within noise"


def difference(a, b, level: float = DEFAULT_LEVEL) -> Difference:
    """Welch's interval of mean(a) - mean(b), with ``probability_of_improvement`` and a verdict; both need 2 or more
    values (the interval is NaN and the verdict "within noise" otherwise)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    delta = float(x.mean() - y.mean())
    low = high = float("nan")
    if len(x) >= 2 and len(y) >= 2:
        vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
        se = np.sqrt(vx + vy)
        if se > 0:
            df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
            h = float(t_quantile(level, df) * se)
        else:  # every run of each alike: no noise to be within
            h = 0.0
        low, high = delta - h, delta + h
    verdict = "better" if low > 0 else "worse" if high < 0 else "within noise"
    return Difference(delta, low, high, probability_of_improvement(x, y), verdict)


def seeds_needed(std: float, target: float, level: float = DEFAULT_LEVEL) -> int | None:
    """The fewest seeds whose t-interval half-width at spread ``std`` is at most ``target``; None where ``std`` is
    unknown or it would take more than MAX_SEEDS."""
    if not np.isfinite(std) or target <= 0:
        return None
    n = np.arange(2, MAX_SEEDS + 1)
    fits = np.flatnonzero(half_width(std, n, level) <= target)
    return int(n[fits[0]]) if len(fits) else None
