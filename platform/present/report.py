"""`specreg report`: the figures and tables that answer a finished sweep's questions, read from MLflow.

The report is written as one self-contained HTML file (figures embedded as base64 PNGs) or as Markdown
with a `figures/` folder, and its figures are logged to the sweep's parent run under `report/`.
"Best trial of a kind" means best by the report metric: the sweep's first robust objective (else its
first objective). With seeds, every value is a config's seed mean; tables and bands show the platform's
95% t-interval over seeds (as MLflow and export do), while the seed-aware Pareto front and the paired
differences between arms use 95% percentile-bootstrap intervals. Every trial is listed against the
baseline (`sweep_records.differences`: paired over the attacked points), with a link to its MLflow run.
Accuracies are in percent, their differences in percentage points, other numbers to 3 significant figures.

This module holds the report's sections and writes it; what it reads from MLflow is `sweep_data`, its
statistics `stats`, and its blocks and their HTML / Markdown rendering `render`.
"""
import itertools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import specreg

from ..track import connection, sweep_records  # connection first: it configures MLflow before importing it
from ..base import figures
from ..results.confirm import parent_space
from ..base.errors import BadInput
from .render import Block, Link, fmt, fmt_difference, to_html, to_markdown, with_interval
from ..results.results import confirmations
from ..space.space import SweepSpec, encode, flatten
from ..base.stats import paired_differences, spearman
from .sweep_data import SweepData, eps_key

MAX_ALL_PAIRS = 6      # up to this many arms every pair is compared, beyond it every arm against the best
UI_SERVER = "http://127.0.0.1:5000"   # where `specreg ui` serves a SQLite store: the report's run links


# --- sections -------------------------------------------------------------------------------------------

def threat_model_text(tag: str) -> str:
    """`tangent/l2/2000/200` in words (the order of `tracking.threat_model`)."""
    parts = tag.split("/")
    if len(parts) != 4:
        return tag
    name, norm, queries, samples = parts
    return (f"{tag} (the {name} attack, {norm.upper()} distance, at most {queries} model queries per point, "
            f"on the first {samples} test points)")


def overview(data: SweepData) -> list[Block]:
    sweep, outcomes = data.sweep, {}
    for record in data.all:
        outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
    models = sorted({r.threat_model for r in data.records})
    text = (f"{len(data.all)} trials ({', '.join(f'{n} {k}' for k, n in sorted(outcomes.items()))}); objectives "
            + ", ".join(f"{o['metric']} ({o['mode']})" for o in data.objectives)
            + f"; threat model {', '.join(threat_model_text(m) for m in models) or 'none'}"
            + (f"; seeds {sweep.seeds}: values are seed means with 95% t-intervals, except the seed-aware Pareto "
               "front and the paired differences, which use 95% percentile-bootstrap intervals" if data.seeds else "")
            + f". Best trial of a kind: best by {data.rank['metric']} ({data.rank['mode']}). Accuracies are in "
            "percent and their differences in percentage points (pp); other numbers to 3 significant figures.")
    return [Block("heading", f"Sweep {sweep.name}"), Block("text", text)]


def run_link(data: SweepData, record) -> Link:
    """The trial's page in the MLflow UI: on the tracking server, or where `specreg ui` serves a store."""
    uri = data.mlflow.tracking_uri
    server = uri if uri.startswith(("http://", "https://")) else UI_SERVER
    return Link(record.trial_id, connection.ui_url(server, data.sweep.experiment_id, record.run_id))


def trials_table(data: SweepData) -> list[Block]:
    """Every trial with its searched values, outcome, accuracies and differences from the baseline."""
    metrics = ["clean_acc", *([data.robust] if data.robust else [])]
    compared = metrics if data.versus else []
    rows = []
    for record in data.all:
        searched = flatten(record.searched)
        deltas = ["baseline" if record is data.baseline else data.versus.get(record.run_id, {}).get(m, "—")
                  for m in compared]
        rows.append([run_link(data, record), *(fmt(searched.get(k, "—")) for k in data.sweep.search_keys),
                     record.outcome, *(fmt(record.metrics.get(m), m) for m in metrics), *deltas])
    server = "the tracking server" if data.mlflow.tracking_uri.startswith("http") else f"`specreg ui` ({UI_SERVER})"
    note = (sweep_records.DIFFERENCE_NOTE if data.versus else
            "No baseline: no trial of kind none finished beside other kinds, so no differences are shown.")
    return [Block("heading", "All trials"),
            Block("text", f"{note} A trial's name links to its MLflow run, served by {server}."),
            Block("table", columns=["trial", *data.sweep.search_keys, "outcome", *metrics,
                                    *(f"Δ {m} (pp)" for m in compared)], rows=rows, name="trials")]


def best_table(data: SweepData, best: dict) -> list[Block]:
    metrics = ["clean_acc", *(eps_key(data.records, e) for e in data.eps),
               *(m for m in ("med_dist", "alpha_hat", "sigma_sq_sum") if any(m in r.metrics for r in data.records))]
    rows = []
    for kind, record in best.items():
        settings = [fmt(record.params.get(f"regularizer.{key}", "—")) if kind != "none" else "—"
                    for key in ("strength", "placement")]
        rows.append([kind, record.trial_id, *settings, *(with_interval(*data.interval(record, m), m) for m in metrics)])
    return [Block("heading", "Best trial of each kind"),
            Block("table", columns=["kind", "trial", "strength", "placement", *metrics], rows=rows)]


def robust_curve_figure(data: SweepData, best: dict) -> list[Block]:
    curves = {}
    for kind, record in best.items():
        keys = [eps_key(data.records, e) for e in data.eps]
        stats = [data.interval(record, k) for k in keys]
        banded = all(s[1] is not None for s in stats)
        curves[kind] = {"eps": data.eps, "mean": [s[0] for s in stats],
                        "low": [s[1] for s in stats] if banded else None,
                        "high": [s[2] for s in stats] if banded else None}
    band = " The band is the 95% t-interval over seeds." if data.seeds else ""
    return [Block("figure", f"Robust accuracy against the L2 radius ε for the best trial of each kind.{band}",
                  png=figures.png(figures.robust_curves(curves)), name="robust_vs_eps")]


def tradeoff_section(data: SweepData) -> list[Block]:
    """Clean versus robust for every trial, the Pareto front of the two, and (with seeds) its table."""
    pair = [{"metric": "clean_acc", "mode": "max"}, {"metric": data.robust, "mode": "max"}]
    front = sweep_records.pareto(data.records, pair)
    points = []
    for record in data.records:
        point = {"kind": data.kind(record), "clean": record.metrics["clean_acc"], "robust": record.metrics[data.robust]}
        if data.seeds:
            for key, metric in (("clean", "clean_acc"), ("robust", data.robust)):
                mean, low, high = data.interval(record, metric, bootstrap=True)
                if low is not None:
                    point[f"{key}_err"] = (mean - low, high - mean)
        points.append(point)
    figure = figures.tradeoff(points, [(r.metrics["clean_acc"], r.metrics[data.robust]) for r in front], data.robust)
    caption = (f"Clean accuracy against {data.robust} for every finished trial, coloured by regularizer kind; "
               "the dashed line joins the Pareto front (circled). A lead of a few points may be within the "
               "attack's noise: All trials gives each trial's difference from the baseline with its interval." + (
                   " Points are seed means, bars 95% bootstrap intervals over seeds: a seed-aware front."
                   if data.seeds else ""))
    blocks = [Block("heading", "Clean versus robust accuracy"),
              Block("figure", caption, png=figures.png(figure), name="clean_vs_robust")]
    objectives = data.objectives if len(data.objectives) > 1 else pair
    members = sweep_records.pareto(data.records, objectives)
    labels = data.labels(data.records)
    rows = [[r.trial_id, labels[r.run_id], *(with_interval(*data.interval(r, o["metric"], True), o["metric"])
                                             for o in objectives)] for r in members]
    title = "Pareto front of the sweep's objectives" + (" (seed means, 95% bootstrap intervals)" if data.seeds else "")
    blocks += [Block("heading", title), Block("table", columns=["trial", "config", *(o["metric"] for o in objectives)],
                                              rows=rows)]
    return blocks


def settings_figure(data: SweepData) -> list[Block]:
    """Each objective against strength (log), placement and target exponent, where those varied."""
    objectives = [o["metric"] for o in data.objectives]
    regularized = [r for r in data.records if data.kind(r) != "none"]
    baseline = data.baseline
    base_values = {m: baseline.metrics[m] for m in objectives if m in baseline.metrics} if baseline else None

    def points(key, cast, records):
        return [(data.kind(r), cast(r.params[key]), {m: r.metrics.get(m, math.nan) for m in objectives})
                for r in records if key in r.params]

    def varies(found) -> bool:  # within one kind: across kinds it would be the kind that varies
        return any(len({x for k, x, _ in found if k == kind}) > 1 for kind in {k for k, _, _ in found})

    panels = []
    strengths = [p for p in points("regularizer.strength", float, regularized) if p[1] > 0]
    if varies(strengths):
        panels.append({"title": "strength", "xlabel": "regularizer strength λ (log scale)", "log": True,
                       "categorical": False, "points": strengths, "baseline": base_values})
    placements = points("regularizer.placement", str, regularized)
    if varies(placements):
        panels.append({"title": "placement", "xlabel": "layers regularized", "log": False, "categorical": True,
                       "points": placements, "baseline": base_values})
    shaped = [r for r in regularized if "target_exponent" in specreg.regularizer_options(data.kind(r))]
    exponents = points("regularizer.target_exponent", float, shaped)
    if varies(exponents):
        panels.append({"title": "target exponent", "xlabel": "target spectral exponent α",
                       "log": False, "categorical": False, "points": exponents, "baseline": base_values})
    if not panels:
        return [Block("text", "Strength, placement and target exponent did not vary: no settings figure.")]
    caption = "Each objective against the searched regularizer settings" + (
        f"; the dashed line is the baseline, trial {baseline.trial_id} (kind none)." if baseline else ".")
    return [Block("heading", "Objectives versus the regularizer settings"),
            Block("figure", caption, png=figures.png(figures.objective_panels(objectives, panels)),
                  name="objectives_vs_settings")]


def structure_section(data: SweepData) -> list[Block]:
    points = [{"kind": data.kind(r), "alpha_hat": r.metrics.get("alpha_hat"), "sigma_sq_sum": r.metrics.get("sigma_sq_sum"),
               "robust": r.metrics[data.robust]} for r in data.records]
    correlations = {key: spearman([p[key] for p in points], [p["robust"] for p in points])
                    for key in ("alpha_hat", "sigma_sq_sum")}
    rows = [[key, fmt(rho), fmt(p), n] for key, (rho, p, n) in correlations.items()]
    n = max(n for _, _, n in correlations.values())
    return [Block("heading", "Representational structure and robustness"),
            Block("figure", f"{data.robust} against the fitted spectral exponent α̂ of the feature covariance and "
                            "against Σσ²_max of the layers up to the features, every trial.",
                  png=figures.png(figures.structure(points, data.robust, correlations)), name="structure_vs_robustness"),
            Block("table", columns=["against", "Spearman ρ", "p", "trials (n)"], rows=rows),
            Block("text", f"Caveat: a rank correlation over n = {n} trials describes these trials only. The "
                          "sampler chose them from earlier results, so they are not independent draws and the "
                          "p-value is a rough guide; with fewer than about 10 trials even a large ρ can be "
                          "chance, and a correlation is no evidence that the structure causes the robustness.")]


def array_figures(data: SweepData, best: dict) -> list[Block]:
    """The feature spectrum and the adversarial distances of the best trial of each kind."""
    spectra, distances = {}, {}
    for kind, record in best.items():
        found = data.arrays(record, "spectrum.json")
        if found and len({len(s) for s in found}) == 1:
            spectra[kind] = np.mean(found, axis=0)
        found = data.arrays(record, "distances.npy")
        if found:
            distances[kind] = np.concatenate(found)
    pooled = " Over seeds the spectra are averaged and the distances pooled." if data.seeds else ""
    blocks = []
    if spectra:
        blocks.append(Block("figure", "Eigenvalues of the feature covariance on test inputs, best trial of each kind "
                                      f"(log–log).{pooled}", png=figures.png(figures.spectra(spectra)), name="spectra"))
    if distances:
        blocks.append(Block("figure", "Minimal adversarial L2 distances found by the attack, best trial of each kind "
                                      f"(0: misclassified).{pooled}",
                            png=figures.png(figures.distance_histograms(distances, data.eps)), name="distances"))
    return blocks


def fanova(data: SweepData) -> dict[str, float] | str:
    """fANOVA importances for the first objective from a study rebuilt from the trials; or why not."""
    import optuna

    objective = data.objectives[0]
    spec = SweepSpec.model_validate(parent_space(data.mlflow, data.sweep))
    space = {k: p.distribution() for k, p in spec.search.items()}
    trials = []
    for record in data.records:
        value = record.metrics.get(objective["metric"], math.nan)
        if math.isfinite(value):
            params = {k: encode(v) for k, v in record.searched.items() if k in space}
            trials.append(optuna.trial.create_trial(params=params, distributions={k: space[k] for k in params},
                                                    value=value))
    shared = set.intersection(*(set(t.params) for t in trials)) if trials else set()
    varied = [k for k in shared if len({json.dumps(t.params[k]) for t in trials}) > 1]
    if len(trials) < 3 or len(varied) < 2:
        return (f"fANOVA skipped: it needs at least 3 finished trials and 2 searched parameters that every trial "
                f"has and that vary (here {len(trials)} trials, {len(varied)} such parameters; conditional "
                "parameters are left out).")
    study = optuna.create_study(direction="maximize" if objective["mode"] == "max" else "minimize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.add_trials(trials)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return optuna.importance.get_param_importances(study, evaluator=evaluator, params=sorted(varied))


def importance_section(data: SweepData) -> list[Block]:
    found = fanova(data)
    blocks = [Block("heading", f"Parameter importance for {data.objectives[0]['metric']}")]
    if isinstance(found, str):
        return blocks + [Block("text", found)]
    n = sum(math.isfinite(r.metrics.get(data.objectives[0]["metric"], math.nan)) for r in data.records)
    return blocks + [Block("figure", "Share of the variance of the first objective explained by each searched "
                                     f"parameter (Optuna's fANOVA on a study rebuilt from the n = {n} finished trials; "
                                     "parameters that only some trials have are left out). Caveat: fANOVA fits a "
                                     "random forest to the trials; with a few dozen trials or fewer the shares are "
                                     "rough, and the differences between trials may be within noise (see All trials).",
                           png=figures.png(figures.importances(found, data.objectives[0]["metric"])),
                           name="importance")]


def paired_section(data: SweepData) -> list[Block]:
    """Paired differences between the configs (arms) that share seeds, for every objective and the median
    adversarial distance."""
    records = [r for r in data.records if len(data.seeds.get(r.run_id, {})) > 1]
    if len(records) < 2:
        return []
    labels = data.labels(records)
    first = data.objectives[0]
    ranked = sorted(records, key=lambda r: r.metrics[first["metric"]], reverse=first["mode"] == "max")
    names = [labels[r.run_id] for r in ranked]
    if len(names) <= MAX_ALL_PAIRS:
        pairs, how = list(itertools.combinations(names, 2)), "every pair of arms"
    else:
        pairs, how = [(names[0], n) for n in names[1:]], f"every arm against the best by {first['metric']}"
    by_metric = {}
    blocks = [Block("heading", "Paired differences between arms sharing seeds"),
              Block("text", f"Arms are ordered by {first['metric']}; compared: {how}. Difference a − b per shared seed; "
                            "mean, 95% percentile bootstrap interval, two-sided paired t-test p-value, "
                            "Holm-corrected within each metric.")]
    metrics = [o["metric"] for o in data.objectives]
    if data.robust and "med_dist" not in metrics:
        metrics.append("med_dist")  # the distance view of robustness, free of the choice of ε
    for metric in metrics:
        arms = {labels[r.run_id]: {s: m[metric] for s, (_, m) in data.seeds[r.run_id].items() if metric in m}
                for r in records}
        rows = paired_differences(arms, pairs)
        by_metric[metric] = rows
        blocks.append(Block("table", columns=[f"{metric}: a − b", "seeds", "mean", "95% interval", "p", "p (Holm)"],
                            rows=[[r["label"], len(r["seeds"]), fmt_difference(r["mean"], metric),
                                   f"[{fmt_difference(r['low'], metric)}, {fmt_difference(r['high'], metric)}]",
                                   fmt(r["p"]), fmt(r["p_holm"])] for r in rows]))
    if any(by_metric.values()):
        blocks.append(Block("figure", "Paired differences with 95% bootstrap intervals (black: Holm p < 0.05).",
                            png=figures.png(figures.paired_differences(by_metric)), name="paired_differences"))
    return blocks


def confirmation_section(data: SweepData) -> list[Block]:
    found = confirmations(data.mlflow, data.sweep)
    if not found:
        return []
    metrics = [o["metric"] for o in data.objectives]
    rows = []
    for record in data.all:
        if record.run_id in found:
            child, confirmed = found[record.run_id]
            rows.append([record.trial_id, data.kind(record), child, *(
                f"{fmt(record.metrics.get(m), m)} → " + with_interval(*data.interval(confirmed, m), m)
                for m in metrics)])
    return [Block("heading", "Confirmation with fresh seeds"),
            Block("text", "The sweep's value → the confirmed seed mean [95% t-interval]; `specreg export` ranks "
                          "these configs by their confirmed means."),
            Block("table", columns=["trial", "kind", "confirmed by", *metrics], rows=rows)]


def build(data: SweepData) -> list[Block]:
    blocks = overview(data) + trials_table(data)
    if not data.records:
        return blocks + [Block("text", "No finished trial: nothing to plot.")]
    if data.robust is None:
        blocks.append(Block("text", "The trials were not attacked: no robustness figures."))
    best = data.best_per_kind()
    blocks += best_table(data, best)
    if data.robust:
        blocks += robust_curve_figure(data, best) + tradeoff_section(data)
    blocks += settings_figure(data)
    if data.robust:
        blocks += structure_section(data)
    blocks += [Block("heading", "Spectra and distances of the best trials"), *array_figures(data, best)]
    blocks += importance_section(data) + paired_section(data) + confirmation_section(data)
    return blocks


def write_report(mlflow, name: str, out_dir, fmt: str = "html", eps: float | None = None) -> dict:
    """Build the report, write it to out_dir, log it to the sweep's parent run; return what was written.

    Everything is read and drawn before anything is written, so bad input leaves nothing behind.
    """
    if fmt not in ("html", "md"):
        raise BadInput(f"--format: must be html or md, got {fmt!r}")
    data = SweepData(mlflow, name, eps)
    blocks = build(data)
    figures_made = {b.name: b.png for b in blocks if b.kind == "figure"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        report = out / "report.html"
        report.write_text(to_html(blocks, f"Sweep {name}"))
        written = [report]
    else:
        (out / "figures").mkdir(exist_ok=True)
        written = []
        for figure_name, data_png in figures_made.items():
            path = out / "figures" / f"{figure_name}.png"
            path.write_bytes(data_png)
            written.append(path)
        report = out / "report.md"
        report.write_text(to_markdown(blocks, "figures"))
        written.insert(0, report)
    with tempfile.TemporaryDirectory() as staging:
        for figure_name, data_png in figures_made.items():
            (Path(staging) / f"{figure_name}.png").write_bytes(data_png)
        (Path(staging) / report.name).write_bytes(report.read_bytes())
        connection.retry(mlflow.log_artifacts, data.sweep.parent_run_id, staging, "report")
    return {"report": report, "files": written, "figures": list(figures_made)}
