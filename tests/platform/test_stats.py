"""The platform's statistics (`specreg_platform.stats`) against independent references: scipy's
t-interval and tests, the normal closed form of the bootstrap interval, Holm's and Spearman's formulas."""
import math

import numpy as np
import pytest
from scipy import stats

from specreg_platform.base.stats import (bootstrap_interval, detectable_difference, holm, mean_interval,
                                         paired_differences, paired_t_pvalue, spearman)


@pytest.mark.parametrize("values", [[0.81, 0.84, 0.8], [1.0, 3.0], list(np.linspace(-1, 2, 11))])
def test_mean_interval_is_scipys_t_interval(values):
    mean, low, high = mean_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx(expected)
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)


def test_mean_interval_closed_form_for_two_values():
    # n = 2: half-width = t(0.975, 1) · s / √2 with s = |a − b| / √2, i.e. 12.706 · |a − b| / 2
    mean, low, high = mean_interval([1.0, 3.0])
    assert (high - low) / 2 == pytest.approx(12.7062047 * 2.0 / 2, rel=1e-6)


def test_paired_differences_match_a_direct_computation():
    rng = np.random.default_rng(3)
    seeds = range(6)
    arms = {"a": {s: 0.8 + 0.02 * rng.standard_normal() for s in seeds},
            "b": {s: 0.7 + 0.02 * rng.standard_normal() for s in seeds},
            "c": {s: 0.7 + 0.02 * rng.standard_normal() for s in seeds if s != 5}}
    rows = paired_differences(arms, [("a", "b"), ("a", "c"), ("b", "c")])
    raw = []
    for row, (x, y) in zip(rows, [("a", "b"), ("a", "c"), ("b", "c")]):
        shared = sorted(set(arms[x]) & set(arms[y]))
        d = np.array([arms[x][s] - arms[y][s] for s in shared])
        assert row["seeds"] == shared and row["mean"] == pytest.approx(d.mean())
        t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        raw.append(2 * stats.t.sf(abs(t), len(d) - 1))
        assert row["p"] == pytest.approx(raw[-1])
        assert d.min() <= row["low"] <= row["mean"] <= row["high"] <= d.max()
    order = np.argsort(raw)
    expected = np.minimum(1, np.maximum.accumulate(np.array(raw)[order] * (len(raw) - np.arange(len(raw)))))
    assert [rows[i]["p_holm"] for i in order] == pytest.approx(list(expected))


def test_holm_leaves_undefined_tests_out():
    assert holm([0.01, math.nan, 0.04]) == pytest.approx([0.02, math.nan, 0.04], nan_ok=True)
    # closed form: sorted p times (m − rank), made monotone and capped at 1
    assert holm([0.03, 0.01, 0.02, 0.5]) == pytest.approx([0.06, 0.04, 0.06, 0.5])


def test_bootstrap_matches_the_normal_interval():
    values = np.random.default_rng(0).normal(1.0, 2.0, 400)
    mean, low, high = bootstrap_interval(values)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert mean == pytest.approx(values.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_interval([0.5]) == (0.5, 0.5, 0.5)


def test_bootstrap_resamples_seeds_and_points():
    # a seeds × points array: the interval of the grand mean is about as wide as the normal one of a
    # seed-and-point design (variance of the seed means plus that of the points within a seed)
    rng = np.random.default_rng(1)
    grid = rng.normal(0.0, 1.0, (30, 1)) + rng.normal(0.0, 1.0, (30, 40))
    mean, low, high = bootstrap_interval(grid)
    assert mean == pytest.approx(grid.mean())
    se = math.sqrt(grid.mean(axis=1).var(ddof=1) / 30 + grid.var(ddof=1) / (30 * 40))
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.25)


def test_paired_t_and_spearman_match_scipy_and_closed_forms():
    d = np.array([0.1, 0.3, -0.05, 0.2, 0.15])
    assert paired_t_pvalue(d) == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert math.isnan(paired_t_pvalue([0.2, 0.2, 0.2])) and math.isnan(paired_t_pvalue([0.1]))
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    rho, p, n = spearman(x, y)
    d2 = sum((a - b) ** 2 for a, b in zip([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]))
    assert n == 5 and rho == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))  # no ties: 1 − 6Σd² / n(n²−1)
    assert spearman([1.0, None, 2.0], [1.0, 2.0, math.nan])[2] == 1


@pytest.mark.parametrize("n", [3, 5])
def test_detectable_difference_has_the_power_it_claims_in_simulation(n):
    """Simulated paired studies whose true difference is the detectable one: a t-test written out with numpy
    rejects in 80% of them (200,000 studies: ±0.3 points at 3 standard errors); the textbook
    (t_{0.975} + t_{0.8})·sd/√n falls short of it for 3 seeds."""
    sd = 0.7
    effect = detectable_difference(sd, n)
    rng = np.random.default_rng(n)
    diffs = effect + sd * rng.standard_normal((200_000, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.003)
    textbook = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n)
    assert effect > textbook if n == 3 else effect == pytest.approx(textbook, rel=0.02)
    assert math.isnan(detectable_difference(sd, 1)) and math.isnan(detectable_difference(0.0, n))

