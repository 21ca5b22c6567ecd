"""What a report reads from MLflow: a sweep's finished trials, their seeds, the report metric and the
robust accuracy's radii, with the queries that fetch seed runs and per-run arrays (`SweepData`)."""
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import specreg

from ..track import connection, sweep_records  # connection first: it configures MLflow before importing it
from ..base import figures
from ..base.errors import BadInput
from .render import fmt
from ..space.space import flatten
from ..base.stats import bootstrap_interval

def eps_values(records) -> list[float]:
    return sorted({specreg.metric_radius(k)[0] for r in records for k in r.metrics
                   if sweep_records.is_robust_accuracy(k)})


def eps_key(records, eps: float) -> str:
    keys = {specreg.metric_radius(k)[0]: k for r in records for k in r.metrics
            if sweep_records.is_robust_accuracy(k)}
    if eps not in keys:
        raise BadInput(f"--eps: the trials report robust accuracy at {sorted(keys)}, not at {eps}")
    return keys[eps]


class SweepData:
    """A sweep's finished trials with what the figures need: kinds, seeds, and the report metric."""

    def __init__(self, mlflow, name: str, eps: float | None = None):
        self.mlflow = mlflow
        self.sweep = sweep_records.find_sweep(mlflow, name)
        self.all = sweep_records.trials(mlflow, self.sweep)
        self.objectives = self.sweep.objectives
        self.records = sweep_records.rankable(self.all, ["clean_acc"])
        robust = [o for o in self.objectives if specreg.is_attack_metric(o["metric"])]
        self.eps = eps_values(self.records)
        if eps is not None:
            self.robust = eps_key(self.records, eps)
        elif robust and sweep_records.is_robust_accuracy(robust[0]["metric"]):
            self.robust = robust[0]["metric"]
        else:
            self.robust = eps_key(self.records, self.eps[len(self.eps) // 2]) if self.eps else None
        if self.robust:
            self.records = sweep_records.rankable(self.records, [self.robust])  # refuses mixed threat models
        self.rank = robust[0] if robust else self.objectives[0]
        self.seeds = self._seed_runs() if len(self.sweep.seeds) > 1 else {}
        self.baseline = sweep_records.baseline(self.all)
        self.versus = sweep_records.differences(mlflow, self.all, ["clean_acc", *([self.robust] if self.robust else [])])

    def _seed_runs(self) -> dict[str, dict[int, tuple[str, dict]]]:
        """{config run id: {seed: (seed run id, metrics)}} of the finished seed runs."""
        runs = connection.retry(self.mlflow.search_runs, [self.sweep.experiment_id],
                              f"tags.`{connection.ROLE}` = 'seed' and attributes.status = 'FINISHED'",
                              max_results=5000)
        out: dict[str, dict] = {}
        for run in runs:
            out.setdefault(run.data.tags[connection.PARENT], {})[int(run.data.tags[connection.SEED])] = (
                run.info.run_id, sweep_records.current_names(run.data.metrics))
        return out

    @staticmethod
    def kind(record) -> str:
        return record.params.get("regularizer.kind", "none")

    def kinds(self) -> list[str]:
        present = {self.kind(r) for r in self.records}
        return [k for k in figures.KINDS if k in present] + sorted(present - set(figures.KINDS))

    def seed_values(self, record, metric: str) -> list[float]:
        return [m[metric] for _, (_, m) in sorted(self.seeds.get(record.run_id, {}).items()) if metric in m]

    def interval(self, record, metric: str, bootstrap: bool = False):
        """(mean, low, high) over the config's seeds: the platform's t-interval (as MLflow and export show
        it), or with `bootstrap` the percentile bootstrap; (value, None, None) for a single seed."""
        if bootstrap:
            values = self.seed_values(record, metric)
            if len(values) > 1:
                return bootstrap_interval(values)
        elif f"{metric}_ci95_low" in record.metrics:
            return (record.metrics[metric], record.metrics[f"{metric}_ci95_low"],
                    record.metrics[f"{metric}_ci95_high"])
        return record.metrics.get(metric, math.nan), None, None

    def best_per_kind(self) -> dict[str, sweep_records.TrialRecord]:
        metric, mode = self.rank["metric"], self.rank["mode"]
        ranked = [r for r in self.records if math.isfinite(r.metrics.get(metric, math.nan))]
        return {k: sweep_records.best(mine, metric, mode) for k in self.kinds()
                if (mine := [r for r in ranked if self.kind(r) == k])}

    def artifact_runs(self, record) -> list[str]:
        """The runs holding a config's arrays: its seed runs, else the trial run itself."""
        seeds = self.seeds.get(record.run_id)
        return [run_id for _, (run_id, _) in sorted(seeds.items())] if seeds else [record.run_id]

    def arrays(self, record, path: str):
        """The artifact at `path` of every run of the config that has it (JSON list or .npy array)."""
        found = []
        with tempfile.TemporaryDirectory() as staging:
            for index, run_id in enumerate(self.artifact_runs(record)):
                try:
                    local = Path(connection.retry(self.mlflow.download_artifacts, run_id, path,
                                                f"{staging}/{index}"))
                except (connection.MlflowException, OSError):  # a run without the artifact: leave it out
                    continue
                found.append(np.load(local) if path.endswith(".npy") else np.asarray(json.loads(local.read_text())))
        return found

    def labels(self, records) -> dict[str, str]:
        """A short label per record: the searched values that differ between the records (for kind none,
        no other regularizer setting, which it ignores)."""
        flats = {r.run_id: flatten(r.searched) for r in records}
        keys = list(dict.fromkeys(k for f in flats.values() for k in f))
        varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats.values()}) > 1]
        labels = {}
        for record in records:
            flat = flats[record.run_id]
            shown = [k for k in varying if k in flat and not (
                self.kind(record) == "none" and k.startswith("regularizer.") and k != "regularizer.kind")]
            labels[record.run_id] = ", ".join(fmt(flat[k]) if k == "regularizer.kind" else f"{k.split('.')[-1]}={fmt(flat[k])}"
                                              for k in shown) or record.trial_id
        return labels
