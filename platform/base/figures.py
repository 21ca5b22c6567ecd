"""Matplotlib figures (Agg backend) for sweep reports and per-trial artifacts: one figure per question.

Every function takes plain numbers (no MLflow), returns a `Figure`, and labels its axes with units:
accuracies in percent, distances and radii as L2 norms in pixel units (pixels scaled to [0, 1]).
"""
import io
import math

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import specreg  # noqa: E402

# The regularizer kinds in the library's registry order: a newly registered kind gets the next colour.
KINDS = tuple(specreg.REGULARIZERS)
# Okabe & Ito's colour-blind-safe palette, one colour and one marker per kind in order (the marker tells
# kinds apart in grey too); other labels are hashed onto the colours and markers the kinds leave.
PALETTE = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#CC79A7", "#D55E00", "#999999")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DPI = 144  # the report shows figures at 96 pixels per inch: 1.5 device pixels per CSS pixel
DISTANCE = "L2 distance (pixels in [0, 1])"
RADIUS = "ε, L2 radius (pixels in [0, 1])"
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9, "legend.frameon": False})


def _index(label: str) -> int:
    if label in KINDS:  # past the palette's end (more than 8 kinds) the colours repeat
        return KINDS.index(label) % len(PALETTE)
    spare = len(PALETTE) - len(KINDS)  # other labels share the colours the kinds leave (all, if none is left)
    return len(KINDS) + sum(map(ord, label)) % spare if spare > 0 else sum(map(ord, label)) % len(PALETTE)


def color(label: str) -> str:
    """A fixed colour per regularizer kind."""
    return PALETTE[_index(label)]


def marker(label: str) -> str:
    """A fixed marker per regularizer kind."""
    return MARKERS[_index(label)]


def png(figure: Figure, tight: bool = True, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes; the figure is closed. tight=False keeps the figure's own margins: the
    tight bounding box costs a second draw of the figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(figure)
    return buffer.getvalue()


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _log_axis(axis) -> None:
    """A log scale labelled at 1, 2 and 5 times the powers of ten, as plain numbers: values that span less
    than a decade still get labelled ticks, and labels do not crowd."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _percent_axis(ax, metric: str = "clean_acc") -> None:
    """An accuracy axis never reaches past 0-100% (autoscaling's margin would show 102%)."""
    if is_accuracy(metric):
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0), min(high, 100))


def robust_curves(curves: dict[str, dict]) -> Figure:
    """Robust accuracy versus ε, one curve per label: {"eps": [...], "mean": [...], "low"/"high": [...]}.

    low/high (optional) are drawn as a band: the spread over seeds.
    """
    figure, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        eps, mean = np.asarray(curve["eps"]), 100 * np.asarray(curve["mean"])
        ax.plot(eps, mean, marker=marker(label), color=color(label), label=label)
        if curve.get("low") is not None:
            ax.fill_between(eps, 100 * np.asarray(curve["low"]), 100 * np.asarray(curve["high"]),
                            color=color(label), alpha=0.2, linewidth=0)
    ax.set(xlabel=RADIUS, ylabel="robust accuracy (%)", ylim=(0, 100),
           title="Robust accuracy under the black-box attack, best trial per kind")
    ax.grid(alpha=0.3)
    _legend(ax)
    return figure


def tradeoff(points: list[dict], front: list[tuple[float, float]], robust_label: str) -> Figure:
    """Clean versus robust accuracy for every trial, coloured by kind, with the Pareto front.

    points: {"kind", "clean", "robust"} and optional {"clean_err", "robust_err"} (2×1 lower/upper half-widths).
    """
    figure, ax = plt.subplots(figsize=(6, 4.5))
    for kind in dict.fromkeys(p["kind"] for p in points):
        mine = [p for p in points if p["kind"] == kind]
        x = 100 * np.array([p["clean"] for p in mine])
        y = 100 * np.array([p["robust"] for p in mine])
        if all("clean_err" in p for p in mine):
            ax.errorbar(x, y, xerr=100 * np.array([p["clean_err"] for p in mine]).T,
                        yerr=100 * np.array([p["robust_err"] for p in mine]).T, fmt="none",
                        ecolor=color(kind), alpha=0.5, linewidth=1)
        ax.scatter(x, y, color=color(kind), marker=marker(kind), label=kind, s=36, zorder=3)
    if front:
        xs, ys = zip(*sorted(front))
        ax.step(100 * np.array(xs), 100 * np.array(ys), where="pre", color="black", linewidth=1,
                linestyle="--", label="Pareto front", zorder=2)
        ax.scatter(100 * np.array(xs), 100 * np.array(ys), facecolors="none", edgecolors="black", s=90, zorder=4)
    ax.set(xlabel="clean accuracy (%)", ylabel=f"{robust_label} (%)",
           title="Clean versus robust accuracy, every finished trial")
    ax.grid(alpha=0.3)
    _percent_axis(ax)
    ax.set_xlim(right=min(ax.get_xlim()[1], 100))
    _legend(ax)
    return figure


def objective_panels(objectives: list[str], panels: list[dict]) -> Figure:
    """Each objective (rows) against each searched setting (columns).

    panels: {"title", "xlabel", "log" (bool), "categorical" (bool), "points": [(kind, x, {objective: y})],
    "baseline": {objective: y} (the unregularized trial, drawn as a dashed line) or None}.
    """
    rows, cols = len(objectives), len(panels)
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for col, panel in enumerate(panels):
        categories = list(dict.fromkeys(str(x) for _, x, _ in panel["points"])) if panel["categorical"] else []
        for row, objective in enumerate(objectives):
            ax = axes[row][col]
            for kind in dict.fromkeys(k for k, _, _ in panel["points"]):
                mine = sorted((x, values[objective]) for k, x, values in panel["points"] if k == kind)
                ys = [percent(objective, y) for _, y in mine]
                if panel["categorical"]:
                    ax.scatter([categories.index(str(x)) for x, _ in mine], ys, color=color(kind),
                               marker=marker(kind), label=kind, s=30)
                else:
                    ax.plot([x for x, _ in mine], ys, marker=marker(kind), color=color(kind), label=kind)
            if panel.get("baseline") and objective in panel["baseline"]:
                ax.axhline(percent(objective, panel["baseline"][objective]), color=color("none"),
                           linestyle="--", linewidth=1, label="none")
            if panel["log"]:
                ax.set_xscale("log")
                _log_axis(ax.xaxis)
            if panel["categorical"]:
                ax.set_xticks(range(len(categories)), categories)
                ax.set_xlim(-0.5, len(categories) - 0.5)
            ax.set(xlabel=panel["xlabel"], ylabel=axis_label(objective))
            ax.grid(alpha=0.3)
            _percent_axis(ax, objective)
            if row == 0:
                ax.set_title(panel["title"])
                _legend(ax)
    figure.suptitle("Objectives versus the searched settings")
    figure.tight_layout()
    return figure


def structure(points: list[dict], robust_label: str, correlations: dict[str, tuple[float, float, int]]) -> Figure:
    """Robustness versus α̂ and versus Σσ² up to the feature layer, with Spearman's ρ in each title.

    points: {"kind", "alpha_hat", "sigma_sq_sum", "robust"}; correlations: {key: (rho, p, n)}.
    """
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, log in ((axes[0], "alpha_hat", "fitted spectral exponent α̂ (unitless)", False),
                                (axes[1], "sigma_sq_sum", "Σσ²_max up to the feature layer (unitless)", True)):
        for kind in dict.fromkeys(p["kind"] for p in points):
            mine = [p for p in points if p["kind"] == kind and _finite(p.get(key))]
            ax.scatter([p[key] for p in mine], [100 * p["robust"] for p in mine], color=color(kind),
                       marker=marker(kind), label=kind, s=30)
        rho, p, n = correlations.get(key, (math.nan, math.nan, 0))
        ax.set_title(f"Spearman ρ = {rho:.2f} (p = {p:.2g}, n = {n})" if n >= 3 else f"too few trials (n = {n})")
        if log:
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
        ax.set(xlabel=label, ylabel=f"{robust_label} (%)")
        ax.grid(alpha=0.3, which="both" if log else "major")
        _percent_axis(ax)
    _legend(axes[0])
    figure.suptitle("How the representation's structure relates to robustness, all trials")
    figure.tight_layout()
    return figure


def spectra(series: dict[str, list[float]], minor: bool = True) -> Figure:
    """Eigenvalues of the feature covariance against their rank, log–log, one line per label.

    minor=False leaves out the minor ticks and grid (most of the figure's drawing time).
    """
    figure, ax = plt.subplots(figsize=(6, 4))
    for label, eigenvalues in series.items():
        values = np.asarray(eigenvalues, dtype=float)
        values = values[values > values.max() * 1e-9]  # the numerically zero tail of a rank-deficient estimate
        ax.loglog(np.arange(1, len(values) + 1), values, color=color(label), label=label)
    ax.set(xlabel="rank n", ylabel="eigenvalue λ_n (feature units²)",
           title="Feature covariance eigenspectrum (test inputs)")
    if minor:
        ax.grid(alpha=0.3, which="both")
    else:
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    _legend(ax)
    return figure


def distance_histograms(series: dict[str, np.ndarray], eps: list[float]) -> Figure:
    """Minimal adversarial L2 distances per label (0 = misclassified, inf = no start point, left out)."""
    figure, ax = plt.subplots(figsize=(6, 4))
    finite = [np.asarray(d, dtype=float)[np.isfinite(d)] for d in series.values()]
    top = max([float(d.max()) for d in finite if len(d)] + [max(eps, default=1.0)])
    bins = np.linspace(0, top * 1.02, 31)
    for (label, distances), values in zip(series.items(), finite):
        missing = len(distances) - len(values)
        note = f" ({missing} without a start point)" if missing else ""
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, color=color(label), label=f"{label}{note}")
    for radius in eps:
        ax.axvline(radius, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=f"minimal adversarial {DISTANCE}", ylabel="attacked test points",
           title="Adversarial distances (dotted: the ε of the robust accuracies)")
    _legend(ax)
    return figure


def importances(values: dict[str, float], objective: str) -> Figure:
    """fANOVA importance of each searched parameter for one objective (fractions of the variance)."""
    figure, ax = plt.subplots(figsize=(6, 0.5 * len(values) + 1.5))
    names = list(values)[::-1]
    ax.barh(names, [100 * values[n] for n in names], color=PALETTE[4])
    ax.set(xlabel=f"share of the variance of {objective} (%)", xlim=(0, 100),
           title="Parameter importance (Optuna fANOVA)")
    ax.grid(alpha=0.3, axis="x")
    return figure


def paired_differences(by_metric: dict[str, list[dict]]) -> Figure:
    """Forest plots of paired differences between arms, one panel per metric.

    rows: {"label", "mean", "low", "high", "p_holm"}; black where the Holm-corrected p is below 0.05.
    """
    panels = {m: rows for m, rows in by_metric.items() if rows}
    heights = [0.35 * len(rows) + 0.9 for rows in panels.values()]
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6), squeeze=False,
                                gridspec_kw={"height_ratios": heights})
    for ax, (metric, rows) in zip(axes[:, 0], panels.items()):
        for y, row in enumerate(rows):
            significant = math.isfinite(row["p_holm"]) and row["p_holm"] < 0.05
            ax.errorbar([percent(metric, row["mean"])], [y],
                        xerr=[[percent(metric, row["mean"] - row["low"])], [percent(metric, row["high"] - row["mean"])]],
                        fmt="o", color="black" if significant else "grey", capsize=3)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(range(len(rows)), [f"{r['label']}  (p_Holm {r['p_holm']:.2g})" for r in rows])
        ax.invert_yaxis()
        unit = "percentage points" if is_accuracy(metric) else DISTANCE if "dist" in metric else "metric units"
        ax.set(xlabel=f"difference in {metric} ({unit})")
        ax.grid(alpha=0.3, axis="x")
    figure.suptitle("Paired differences between arms sharing seeds (mean, 95% bootstrap interval)")
    figure.tight_layout()
    return figure


def trial_figures(result: dict, eps: list[float]) -> dict[str, bytes]:
    """A finished trial's spectrum and distance-histogram figures as PNG artifacts (what it has of them).

    Every trial pays for these, so they are drawn once each (fixed margins, no tight bounding box) and
    the spectrum without minor ticks.
    """
    figures = {}
    if result.get("spectrum") is not None:
        figures["spectrum.png"] = spectra({"this trial": result["spectrum"]}, minor=False)
    if result.get("distances") is not None:
        figures["distances.png"] = distance_histograms({"this trial": np.asarray(result["distances"])}, eps)
    for figure in figures.values():
        figure.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.91)
    return {name: png(figure, tight=False, dpi=100) for name, figure in figures.items()}


def is_accuracy(metric: str) -> bool:
    return (metric.endswith("_acc") or "_acc_" in metric or metric == "adv_auc"
            or specreg.metric_radius(metric) is not None)


def percent(metric: str, value: float) -> float:
    return 100 * value if is_accuracy(metric) else value


def axis_label(metric: str) -> str:
    if is_accuracy(metric):
        return f"{metric} (%)"
    if "dist" in metric:
        return f"{metric} ({DISTANCE})"
    return metric


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
