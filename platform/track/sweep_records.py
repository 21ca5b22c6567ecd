"""A sweep's records in MLflow, as the sweep itself and every reading command see them: the trials, the
best config, the Pareto front, the differences from the baseline, the summary, and the best / Pareto files."""
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import specreg
import yaml

from . import connection
from ..base.errors import BadInput
from ..base.stats import bootstrap_interval

SEARCH_KEYS = "specreg.search_keys"   # parent-run tags written by the sweep
OBJECTIVES = "specreg.objectives"
SEEDS = "specreg.seeds"
# `specreg confirm`'s links: the parent sweep run lists its confirmations, the child sweep run names its
# parent, each child config run names the parent trial runs it re-ran.
CONFIRMED_BY = "specreg.confirmed_by"
CONFIRMS = "specreg.confirms"
CONFIRMS_RUN = "specreg.confirms_run"
# The metric names stores had before the short ones (`acc_0.5`, `kept_0.5`, `med_dist`): such a store still
# reads, under today's names.
LEGACY_METRICS = [(re.compile(r"adv_acc_correct_eps_([0-9.]+)$"), r"kept_\1"),
                  (re.compile(r"adv_acc_eps_([0-9.]+)$"), r"acc_\1"),
                  (re.compile(r"adv_dist_median_correct$"), "med_dist_correct"),
                  (re.compile(r"adv_dist_median$"), "med_dist"), (re.compile(r"adv_dist_mean$"), "mean_dist")]


def current_name(metric: str) -> str:
    """A metric's name as this version logs it (`iter40/adv_dist_median`, an old attack trace, keeps its
    `iter40/`)."""
    for old, new in LEGACY_METRICS:
        metric = old.sub(new, metric)
    return metric


def current_names(metrics: dict) -> dict:
    return {current_name(k): v for k, v in metrics.items()}


@dataclass
class TrialRecord:
    """One trial's MLflow run (an ablation's config run), as the listing and export commands read it."""
    sweep: str
    run_id: str
    trial_id: str
    status: str
    outcome: str
    params: dict
    searched: dict
    metrics: dict
    start_ms: int
    end_ms: int | None
    threat_model: str
    confirmed_by: str = ""   # the `specreg confirm` sweep whose seed means replaced these metrics

    @property
    def duration_s(self) -> float | None:
        return (self.end_ms - self.start_ms) / 1000 if self.end_ms else None


@dataclass
class Sweep:
    """A sweep's parent run and what it was searching for."""
    name: str
    experiment_id: str
    parent_run_id: str
    objectives: list[dict]
    search_keys: list[str]
    seeds: list[int]


def find_sweep(mlflow, name: str) -> Sweep:
    """The latest sweep run under that name; BadInput if there is none."""
    experiment = connection.retry(mlflow.get_experiment_by_name, name)
    runs = [] if experiment is None else connection.retry(
        mlflow.search_runs, [experiment.experiment_id], f"tags.`{connection.ROLE}` = 'sweep'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        raise BadInput(f"no sweep named {name!r} in the MLflow store {mlflow.tracking_uri}")
    tags = runs[0].data.tags
    objectives = [{**o, "metric": current_name(o["metric"])} for o in json.loads(tags.get(OBJECTIVES, "[]"))]
    return Sweep(name, experiment.experiment_id, runs[0].info.run_id, objectives,
                 json.loads(tags.get(SEARCH_KEYS, "[]")), json.loads(tags.get(SEEDS, "[]")))


def all_sweeps(mlflow) -> list[Sweep]:
    experiments = connection.retry(mlflow.search_experiments, filter_string=f"tags.`{connection.SWEEP}` != ''")
    sweeps = []
    for experiment in experiments:
        try:
            sweeps.append(find_sweep(mlflow, experiment.name))
        except BadInput:
            continue  # an experiment of `specreg train` runs, not a sweep
    return sweeps


def trials(mlflow, sweep: Sweep) -> list[TrialRecord]:
    """One record per trial (per config in an ablation) of the sweep, in start order."""
    return [trial_record(sweep.name, run) for run in trial_runs(mlflow, sweep)]


def trial_runs(mlflow, sweep: Sweep) -> list:
    """The MLflow runs behind `trials`, in start order."""
    query = f"tags.`{connection.PARENT}` = '{sweep.parent_run_id}' and tags.`{connection.ROLE}` = 'trial'"
    runs, token = [], None
    while True:
        page = connection.retry(mlflow.search_runs, [sweep.experiment_id], query, max_results=1000,
                              order_by=["attributes.start_time ASC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def trial_record(sweep_name: str, run) -> TrialRecord:
    """A trial's MLflow run as a TrialRecord."""
    return TrialRecord(sweep_name, run.info.run_id, run.data.tags.get(connection.TRIAL_ID, ""), run.info.status,
                       run.data.tags.get(connection.OUTCOME, ""), dict(run.data.params),
                       json.loads(run.data.tags.get(connection.SEARCHED, "{}")), current_names(run.data.metrics),
                       run.info.start_time, run.info.end_time, run.data.tags.get(connection.THREAT_MODEL, "none"))


def rankable(records: list[TrialRecord], metrics: list[str]) -> list[TrialRecord]:
    """Finished trials with a finite value for every metric; refuse to mix threat models."""
    ok = [r for r in records if r.status == "FINISHED"
          and all(math.isfinite(r.metrics.get(m, math.nan)) for m in metrics)]
    if any(specreg.is_attack_metric(m) for m in metrics):
        models = sorted({r.threat_model for r in ok})
        if len(models) > 1:
            raise BadInput(f"these trials were attacked under different threat models ({', '.join(models)}); "
                           "robust metrics of different threat models cannot be ranked together")
    return ok


def best(records: list[TrialRecord], metric: str, mode: str) -> TrialRecord:
    sign = 1 if mode == "max" else -1
    return max(records, key=lambda r: sign * r.metrics[metric])


def dominates(a: TrialRecord, b: TrialRecord, objectives: list[dict]) -> bool:
    """a is at least as good as b on every objective and better on one."""
    better = False
    for objective in objectives:
        sign = 1 if objective["mode"] == "max" else -1
        x, y = sign * a.metrics[objective["metric"]], sign * b.metrics[objective["metric"]]
        if x < y:
            return False
        better |= x > y
    return better


def pareto(records: list[TrialRecord], objectives: list[dict]) -> list[TrialRecord]:
    """The non-dominated trials."""
    return [r for r in records if not any(dominates(o, r, objectives) for o in records if o is not r)]


def yaml_artifact(mlflow, run_id: str, name: str):
    """A run's YAML artifact `name`, parsed."""
    with tempfile.TemporaryDirectory() as staging:
        path = connection.retry(mlflow.download_artifacts, run_id, name, staging)
        return yaml.safe_load(Path(path).read_text())


def run_config(mlflow, run_id: str) -> dict:
    """The resolved config a trial ran (its `config.yaml` artifact)."""
    return yaml_artifact(mlflow, run_id, "config.yaml")


def portable(value, out_dir: Path):
    """A config with no absolute path of this machine: home-relative as `~/…`, others relative to out_dir."""
    if isinstance(value, dict):
        return {k: portable(v, out_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, out_dir) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        home = Path.home()
        path = Path(value)
        if path.is_relative_to(home):
            return "~/" + path.relative_to(home).as_posix()
        return os.path.relpath(path, out_dir)
    return value


def _column(values: list) -> list:
    """Floats where every value of the column is a number, else text (lists as JSON)."""
    try:
        return [None if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        return [None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values]


def write_parquet(records: list[TrialRecord], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "trial_id": [r.trial_id for r in records], "mlflow_run_id": [r.run_id for r in records],
        "status": [r.status for r in records], "outcome": [r.outcome for r in records],
        "threat_model": [r.threat_model for r in records],
        "start_time": [r.start_ms / 1000 for r in records],
        "end_time": [r.end_ms / 1000 if r.end_ms else None for r in records],
        "duration_s": [r.duration_s for r in records],
        "confirmed_by": [r.confirmed_by for r in records],
    }
    for key in sorted({k for r in records for k in r.searched}):
        columns[f"search.{key}"] = _column([r.searched.get(key) for r in records])
    for key in sorted({k for r in records for k in r.params}):
        columns[f"param.{key}"] = _column([r.params.get(key) for r in records])
    for key in sorted({k for r in records for k in r.metrics}):
        columns[f"metric.{key}"] = [r.metrics.get(key) for r in records]
    pq.write_table(pa.table(columns), path)


# --- differences from the baseline --------------------------------------------------------------------

@dataclass
class Difference:
    """A trial's accuracy minus the baseline's over the same attacked points (and seeds): the mean and its
    95% bootstrap interval, paired point by point."""
    mean: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        return self.low <= 0 <= self.high

    def __str__(self) -> str:
        return (f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
                + (" ≈" if self.within_noise else ""))


DIFFERENCE_NOTE = ("Δ: the trial's accuracy minus the baseline's (the first trial of kind none) in percentage "
                   "points, on the attacked test points, paired point by point (clean: the attacked points "
                   "classified correctly), with a 95% bootstrap interval; ≈: within noise (the interval holds 0).")


def point_outcomes(distances: np.ndarray, metric: str) -> np.ndarray:
    """Per attacked point, 1 where it counts for the accuracy `metric`: classified correctly (clean_acc:
    distance > 0) or robust at ε (a finite distance > ε; inf means no start point, never robust)."""
    if metric == "clean_acc":
        return (distances > 0).astype(float)
    eps, _ = specreg.metric_radius(metric)
    return (np.isfinite(distances) & (distances > eps)).astype(float)


def compared(metrics) -> list[str]:
    """The metrics a difference from the baseline is given for: clean and robust accuracy."""
    return [m for m in metrics if m == "clean_acc" or is_robust_accuracy(m)]


def is_robust_accuracy(metric: str) -> bool:
    """Robust accuracy over all test points at a radius (`acc_<ε>`)."""
    radius = specreg.metric_radius(metric)
    return radius is not None and not radius[1]


def baseline(records: list[TrialRecord]) -> TrialRecord | None:
    """The first finished trial of kind `none` (the one the sweep enqueued), where other kinds ran too."""
    finished = [r for r in records if r.status == "FINISHED"]
    kinds = {r.params.get("regularizer.kind") for r in finished}
    if "none" not in kinds or len(kinds) < 2:
        return None
    return next(r for r in finished if r.params.get("regularizer.kind") == "none")


def _attacked(record: TrialRecord) -> dict:
    """What fixes the attacked points: the data and the attack (correct_only picks them per model)."""
    return {k: v for k, v in record.params.items() if k.startswith(("data.", "attack."))}


def seed_distances(mlflow, record: TrialRecord) -> dict[int, np.ndarray]:
    """{seed: the attacked points' distances} of a trial: its seed runs', or its own for one seed."""
    runs = connection.retry(mlflow.search_runs, [connection.retry(mlflow.get_run, record.run_id).info.experiment_id],
                          f"tags.`{connection.PARENT}` = '{record.run_id}' and tags.`{connection.ROLE}` = 'seed'")
    sources = {int(r.data.tags[connection.SEED]): r.info.run_id for r in runs} or {
        int(record.params.get("train.seed", 0)): record.run_id}
    out = {}
    with tempfile.TemporaryDirectory() as staging:
        for seed, run_id in sources.items():
            try:
                out[seed] = np.load(connection.retry(mlflow.download_artifacts, run_id, "distances.npy",
                                                   f"{staging}/{seed}"))
            except (connection.MlflowException, OSError):  # not attacked, or the artifact is missing
                continue
    return out


def differences(mlflow, records: list[TrialRecord], metrics) -> dict[str, dict[str, Difference]]:
    """{run id: {metric: Difference}} of every other finished trial against the baseline, for the clean and
    robust accuracies among metrics; empty without a baseline. Trials attacked on other points (another
    dataset, or correct_only) get none."""
    base, metrics = baseline(records), compared(metrics)
    if base is None or not metrics or _attacked(base).get("attack.correct_only") == "True":
        return {}
    base_points = seed_distances(mlflow, base)
    out = {}
    for record in records:
        if record is base or record.status != "FINISHED" or _attacked(record) != _attacked(base):
            continue
        mine = seed_distances(mlflow, record)
        seeds = sorted(set(mine) & set(base_points))
        if not seeds or any(len(mine[s]) != len(base_points[s]) for s in seeds):
            continue
        out[record.run_id] = {}
        for metric in metrics:
            paired = np.stack([point_outcomes(mine[s], metric) - point_outcomes(base_points[s], metric)
                               for s in seeds])
            out[record.run_id][metric] = Difference(*bootstrap_interval(paired))
    return out


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summary_markdown(sweep: Sweep, records: list[TrialRecord], ranked: list[TrialRecord],
                     objectives: list[dict], front: list[TrialRecord], versus: dict) -> str:
    """The sweep in Markdown: counts, the top configs (or the Pareto front), and with `versus` (from
    `differences`) every finished trial against the baseline."""
    metrics = [o["metric"] for o in objectives]
    outcomes = {}
    for record in records:
        outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
    lines = [f"# Sweep `{sweep.name}`", "",
             f"- trials: {len(records)} ({', '.join(f'{n} {k}' for k, n in sorted(outcomes.items()))})",
             "- objectives: " + ", ".join(f"{o['metric']} ({o['mode']})" for o in objectives),
             f"- threat model: {', '.join(sorted({r.threat_model for r in ranked})) or 'none'}"]
    if len(sweep.seeds) > 1:
        lines.append(f"- seeds: {sweep.seeds}; each value is the seed mean [95% interval]")
    top = sorted(ranked, key=lambda r: (1 if objectives[0]["mode"] == "max" else -1) * -r.metrics[metrics[0]])

    def table(shown: list[TrialRecord], compared_metrics: list[str]) -> list[str]:
        header = ["trial", *sweep.search_keys, *metrics, *(f"Δ {m} (pp)" for m in compared_metrics)]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for record in shown:
            cells = [record.trial_id + (" (confirmed)" if record.confirmed_by else "")]
            cells += [_fmt(record.searched.get(k, "—")) for k in sweep.search_keys]
            for metric in metrics:
                value = _fmt(record.metrics[metric])
                if f"{metric}_ci95_low" in record.metrics:
                    value += (f" [{_fmt(record.metrics[f'{metric}_ci95_low'])}, "
                              f"{_fmt(record.metrics[f'{metric}_ci95_high'])}]")
                cells.append(value)
            cells += [str(versus.get(record.run_id, {}).get(m, "—")) for m in compared_metrics]
            rows.append("| " + " | ".join(cells) + " |")
        return rows

    lines += ["", "## Top configs" if len(objectives) == 1 else "## Pareto front", ""]
    lines += table(top[:10] if len(objectives) == 1 else [r for r in top if r in front], [])
    if versus:
        base = baseline(records)
        lines += ["", f"## Every trial against the baseline ({base.trial_id})", "", DIFFERENCE_NOTE, ""]
        lines += table([r for r in ranked if r.run_id in versus], compared(metrics))
    return "\n".join(lines) + "\n"


def front_files(mlflow, top: TrialRecord, front: list[TrialRecord], metrics: list[str], out_dir=None) -> dict[str, str]:
    """The texts of best.yaml (the best trial's config, trainable with `specreg train`) and pareto.yaml (per
    trial of the front: its ids, objectives and config), the one writer of both: `export` writes them to its
    folder, the sweep logs them on its parent run. With out_dir, data paths are made portable against it."""
    def config(run_id):
        resolved = run_config(mlflow, run_id)
        return resolved if out_dir is None else portable(resolved, Path(out_dir))

    return {
        "best.yaml": yaml.safe_dump(config(top.run_id), sort_keys=False),
        "pareto.yaml": yaml.safe_dump([
            {"trial_id": r.trial_id, "mlflow_run_id": r.run_id, "confirmed_by": r.confirmed_by or None,
             "metrics": {m: r.metrics[m] for m in metrics}, "config": config(r.run_id)} for r in front],
            sort_keys=False),
    }
