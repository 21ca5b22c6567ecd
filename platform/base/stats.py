"""The platform's statistics, shared by tracking (seed aggregates logged to MLflow), `specreg runs` /
export (differences from the baseline) and the report: the t-interval over seeds, the percentile bootstrap
(over seeds, and over attacked points when given a seeds × points array), the paired t-test, the smallest
difference it can detect, Holm's correction and Spearman's ρ. numpy only at import; scipy is loaded where a function needs it."""
import math
import warnings

import numpy as np

BOOTSTRAP = 10_000     # bootstrap resamples


def mean_interval(values) -> tuple[float, float, float]:
    """Mean and the 95% t-interval of the mean (the mean itself for a single value)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def bootstrap_interval(values, level: float = 0.95, resamples: int = BOOTSTRAP, seed: int = 0):
    """Mean and percentile-bootstrap interval of the mean (the mean itself for fewer than 2 values). A
    seeds × points array is resampled along both: seeds, then the points attacked in every seed."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if values.size < 2:
        return mean, mean, mean
    grid = values.reshape(len(values), -1)  # 1-D values: one point per seed
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, grid.shape[0], (resamples, grid.shape[0]))
    points = rng.integers(0, grid.shape[1], (resamples, grid.shape[1]))
    means = np.concatenate([grid[s[:, :, None], p[:, None, :]].mean(axis=(1, 2))  # in chunks, for memory
                            for s, p in zip(np.array_split(seeds, 10), np.array_split(points, 10))])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values; NaN (an undefined test) stays NaN and is not counted."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, index) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[index] = running
    return adjusted


def paired_t_pvalue(differences) -> float:
    """Two-sided paired t-test p-value; NaN when the differences have no spread (the test is undefined)."""
    from scipy import stats

    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2 or np.ptp(differences) == 0:
        return math.nan
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test over n pairs (their differences' standard
    deviation sd) detects with the given power: solved on the noncentral t distribution, since the usual
    (t_{1-α/2} + t_power)·sd/√n understates it for few seeds (3 seeds: 3.10 sd has power 0.77)."""
    from scipy import optimize, stats

    if n < 2 or not sd > 0:
        return math.nan
    df, critical = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

    def shortfall(effect):  # power at effect/sd, less the target; the lower tail as the mirrored upper one
        shift = effect * math.sqrt(n)  # (scipy's nct.cdf far in the tail returns nan, its sf does not)
        return stats.nct.sf(critical, df, shift) + stats.nct.sf(critical, df, -shift) - power

    # The approximation is a lower bound; twice it, and a few sd more for tiny n, brackets the root.
    guess = (critical + stats.t.ppf(power, df)) / math.sqrt(n)
    return float(sd * optimize.brentq(shortfall, 0.0, 2 * guess + 1.0, xtol=1e-6))


def paired_differences(arms: dict[str, dict[int, float]], pairs: list[tuple[str, str]]) -> list[dict]:
    """For each pair (a, b): a − b over their shared seeds, its bootstrap interval, paired-t and Holm p."""
    rows = []
    for a, b in pairs:
        shared = sorted(set(arms[a]) & set(arms[b]))
        if len(shared) < 2:
            continue
        differences = [arms[a][s] - arms[b][s] for s in shared]
        mean, low, high = bootstrap_interval(differences)
        rows.append({"label": f"{a} − {b}", "a": a, "b": b, "seeds": shared, "mean": mean, "low": low,
                     "high": high, "p": paired_t_pvalue(differences)})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def spearman(x, y) -> tuple[float, float, int]:
    """Spearman's ρ, its p-value and n over the pairs where both are finite (NaN below 3 pairs)."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan, math.nan, len(pairs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant column gives NaN, which is the honest answer
        result = stats.spearmanr(*zip(*pairs))
    return float(result.statistic), float(result.pvalue), len(pairs)
