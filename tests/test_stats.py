"""Interval estimates over seeds: known answers, coverage, comparisons and what collect shows of them."""

import numpy as np
import pandas as pd
import pytest

from cifarbench import cli
from cifarbench.errors import UsageError
from cifarbench.report import stats
from cifarbench.report.collect import collect
from cifarbench.report.compare import compare, parse_compare
from cifarbench.report.tables import summarize, to_frame
from cifarbench.store.scan import read_records


def test_the_interval_of_normal_samples_is_the_analytic_t_interval():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    # mean 3, std sqrt(2.5), t(0.975, 4) = 2.776445 (tables of Student's t)
    h = 2.776445 * 2.5**0.5 / 5**0.5
    assert stats.mean_interval(values) == pytest.approx((3 - h, 3 + h), abs=1e-6)
    # t(0.95, 4) = 2.131847
    h90 = 2.131847 * 2.5**0.5 / 5**0.5
    assert stats.mean_interval(values, 0.9) == pytest.approx((3 - h90, 3 + h90), abs=1e-6)
    assert np.isnan(stats.mean_interval([0.9])).all()  # one seed: no interval
    with pytest.raises(ValueError, match="between 0 and 1"):
        stats.check_level(1.5)


def _runs(write_records, means: np.ndarray, seeds: np.ndarray, rng) -> pd.DataFrame:
    """Completed runs of len(means) configurations (batch sizes 1, 2, ...), seeds[i] of configuration i, final
    accuracies drawn around means[i] with std 0.01: one real record, read as collect reads it, repeated."""
    base = to_frame(read_records(write_records([{"model": "resnet20"}])).table)
    config = np.repeat(np.arange(len(means)), seeds)
    frame = base.iloc[np.zeros(len(config), int)].reset_index(drop=True)
    return frame.assign(batch_size=config + 1, final_test_acc=rng.normal(means[config], 0.01))


def test_the_95_interval_covers_the_true_mean_95_percent_of_the_time(write_records):
    rng = np.random.default_rng(0)
    folders = 2000  # a configuration each, 2 to 10 seeds
    means, seeds = rng.uniform(0.6, 0.95, folders), 2 + np.arange(folders) % 9
    summary, _ = summarize(_runs(write_records, means, seeds, rng), ci=0.95)
    truth = means[summary.batch_size.to_numpy() - 1]
    covered = (summary.final_test_acc_ci_low <= truth) & (truth <= summary.final_test_acc_ci_high)
    print(f"coverage {covered.mean():.3f} over {folders} configurations")
    assert 0.93 <= covered.mean() <= 0.97
    assert (summary.n >= 2).all() and summary.final_test_acc_ci_low.notna().all()


def test_the_verdict_is_within_noise_for_one_distribution_and_better_for_a_clear_difference():
    rng = np.random.default_rng(1)
    same = stats.difference(rng.normal(0.9, 0.01, 5), rng.normal(0.9, 0.01, 5))
    assert same.verdict == "within noise" and same.low < 0 < same.high
    clear = stats.difference(rng.normal(0.93, 0.002, 5), rng.normal(0.90, 0.002, 5))
    assert clear.verdict == "better" and clear.low > 0 and clear.improvement == 1.0
    assert stats.difference([0.90, 0.905], [0.93, 0.935]).verdict == "worse"
    assert stats.difference([0.9], [0.8]).verdict == "within noise"  # one seed a side: no interval
    # P(A > B) over the 4 pairs: 0.2 > 0.1 (1), 0.2 = 0.2 (1/2), 0.1 < 0.2 (0), 0.1 = 0.1 (1/2)
    assert stats.probability_of_improvement([0.2, 0.1], [0.1, 0.2]) == 0.5
    # std 0.01, half-width 0.002: t(0.975, 98) 0.01 / sqrt(99) = 0.001995, and 98 seeds give 0.002005
    assert stats.seeds_needed(0.01, 0.002) == 99
    assert stats.seeds_needed(float("nan"), 0.002) is None and stats.seeds_needed(1.0, 1e-6) is None


def _two_recipes(write_records, cos: list[float], step: list[float]):
    return write_records(
        [
            {"model": "resnet20", "recipe": recipe, "seed": s, "final_test_acc": a}
            for recipe, accs in (("cos-200", cos), ("step-200", step))
            for s, a in enumerate(accs)
        ]
    )


def test_collect_compares_two_recipes_per_configuration(write_records, tmp_path, capsys):
    results = _two_recipes(write_records, [0.930, 0.932, 0.931], [0.910, 0.912, 0.911])
    out = tmp_path / "out"
    code = cli.main(["collect", str(results), "--out", str(out), "--no-plots", "--compare", "recipe=cos-200,step-200"])
    assert code == 0
    markdown = capsys.readouterr().out
    part = markdown.split("## Comparison\n\n", 1)[1].split("\n## ", 1)[0]
    header, _, row = part.splitlines()[:3]
    assert "A − B [interval]" in header and "P(A > B)" in header and "seeds for ±0.002 A / B" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    # std 0.001 each side: Welch's df = 4, t = 2.776; the difference 0.02 ± 2.776 * sqrt(2 * 0.001² / 3) = 0.0023
    assert cells[1:] == [
        "3 / 3",
        "0.9310 [0.9285, 0.9335]",
        "0.9110 [0.9085, 0.9135]",
        "+0.0200 [+0.0177, +0.0223]",
        "1.00",
        "better",
        "4 / 4",  # 3 seeds: 4.303 * 0.001 / sqrt(3) = 0.0025; 4: 3.182 * 0.001 / 2 = 0.0016
    ]
    assert "probability that a run of A beats a run of B" in part
    assert '<section id="comparison">' in (out / "report.html").read_text()


def test_a_comparison_within_noise_says_so(write_records):
    results = _two_recipes(write_records, [0.930, 0.910, 0.920], [0.925, 0.905, 0.918])
    report = collect(results, plots=False, report=False, compare="recipe=cos-200,step-200")
    assert "within noise" in report.markdown.split("## Comparison", 1)[1].split("\n## ", 1)[0]


def test_compare_refuses_what_it_cannot_compare(write_records, capsys):
    results = _two_recipes(write_records, [0.93, 0.92], [0.91, 0.90])
    for text in ("recipe", "recipe=cos-200", "recipe=cos-200,cos-200"):
        with pytest.raises(UsageError, match="write FIELD=A,B"):
            parse_compare(text)
    with pytest.raises(UsageError, match="did you mean 'recipe'"):
        parse_compare("recipes=cos-200,step-200")
    assert cli.main(["collect", str(results), "--no-plots", "--compare", "recipe=cos-200,step-160"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "cifarbench: error: --compare recipe=cos-200,step-160: no completed run has recipe=step-160; the completed "
        "runs have recipe cos-200, step-200"
    ]
    assert cli.main(["collect", str(results), "--no-plots", "--ci", "1.5"]) == 2


def test_the_published_figure_inside_or_outside_our_interval(write_records, tmp_path):
    # the seed notebook publishes resnet56 on CIFAR-100, step-160, batch size 256: 0.6740
    near = [0.672, 0.676, 0.674]
    rows = [{"model": "resnet56", "dataset": "cifar100", "recipe": "step-160", "batch_size": 256, "seed": s,
             "final_test_acc": a} for s, a in enumerate(near)]  # fmt: skip
    inside = collect(write_records(rows), plots=False, report=False).markdown
    assert "yes (3 seeds)" in inside
    assert "95% confidence interval of the mean" in inside and "‡" not in inside  # no cell of fewer than 3 seeds
    far = [{**r, "final_test_acc": r["final_test_acc"] + 0.05} for r in rows]
    outside = collect(write_records(far, results=tmp_path / "far"), plots=False, report=False).markdown
    assert "no (3 seeds)" in outside and "yes (" not in outside


def test_compare_holds_every_other_field_equal(write_records):
    rng = np.random.default_rng(2)
    runs = _runs(write_records, np.array([0.9, 0.9]), np.array([6, 6]), rng)
    runs["recipe"] = np.where(np.arange(len(runs)) % 2 == 0, "cos-200", "step-200")
    part = compare(runs, parse_compare("recipe=cos-200,step-200"))
    assert [row[0] for row in part.body] == ["1", "2"]  # per batch size, never across
