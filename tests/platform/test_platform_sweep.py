"""Sweeps end to end on a local Ray instance with a real MLflow store: tracking, conditions, export,
retraining, ablations over seeds, the shared burn-in, ASHA, and the threat-model guard."""
import json
import os
import re
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient

from specreg_platform.track import sweep_records
from specreg_platform.base.stats import mean_interval
from specreg_platform.space.space import flatten

from platform_helpers import SPACES, TINY_BASE, cli, ensure_ray, tiny_space, write_yaml

pytestmark = pytest.mark.integration


def _sweep(tmp_path, space: dict, store: str, *args) -> dict:
    ensure_ray()
    path = write_yaml(tmp_path / f"{space['name']}.yaml", space)
    result = cli("sweep", path, "--mlflow", store, "--storage", tmp_path / "runs", *args)
    assert result.exit_code == 0, result.output
    mlflow = MlflowClient(store)
    sweep = sweep_records.find_sweep(mlflow, space["name"])
    return {"mlflow": mlflow, "sweep": sweep, "trials": sweep_records.trials(mlflow, sweep), "tmp": tmp_path,
            "output": result.output}


def _runs(mlflow, sweep, query=""):
    return mlflow.search_runs([sweep.experiment_id], query, max_results=1000)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, store):
    """The quickstart space on a tiny budget: 4 trials, 2 at a time, two objectives."""
    space = yaml.safe_load((SPACES / "quickstart.yaml").read_text())
    space["base"].update(model={"name": "mlp", "widths": [32]}, train={**TINY_BASE["train"], "batch_size": 64},
                         attack={**TINY_BASE["attack"], "eps": [0.25, 0.5, 1.0]})
    return _sweep(tmp_path_factory.mktemp("quick"), space, store, "--samples", "4", "--max-concurrent", "2")


def test_quickstart_sweep_tracks_four_finished_trials(quick):
    mlflow, sweep, trials = quick["mlflow"], quick["sweep"], quick["trials"]
    assert len(trials) == 4 and {t.status for t in trials} == {"FINISHED"}
    for trial in trials:
        assert {"regularizer.kind", "train.lr", "attack.name", "attack.max_queries", "attack.samples",
                "attack.norm"} <= set(trial.params)
        assert {"clean_acc", "acc_0.5", "med_dist", "adv_auc", "alpha_hat", "train_loss"} <= set(
            trial.metrics)
        assert [m.step for m in mlflow.get_metric_history(trial.run_id, "test_acc")] == [1, 2]
        artifacts = {a.path for a in mlflow.list_artifacts(trial.run_id)}
        assert {"config.yaml", "model.pt", "distances.npy"} <= artifacts
        tags = mlflow.get_run(trial.run_id).data.tags
        assert tags["mlflow.parentRunId"] == sweep.parent_run_id and tags["specreg.dataset"] == "digits"
        assert tags["specreg.trial_id"] and tags["specreg.git_commit"]
    parent = mlflow.get_run(sweep.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"space.yaml", "best.yaml", "pareto.yaml"} <= {a.path for a in mlflow.list_artifacts(sweep.parent_run_id)}
    assert parent.data.params["sampler.name"] == "tpe"
    assert not _runs(mlflow, sweep, "attributes.status = 'RUNNING'")
    assert "Pareto front" in quick["output"]


def test_conditional_keys_appear_only_where_their_condition_holds(quick):
    for trial in quick["trials"]:
        kind = trial.searched["regularizer.kind"]
        assert ("regularizer.strength" in trial.searched) == (kind != "none")
        assert ("regularizer.placement" in trial.searched) == (kind == "rep-spectral")
        assert trial.params["regularizer.kind"] == kind


def test_trials_run_concurrently(quick):
    """Optuna's ask step must not serialize the sweep (ray#46965): with 2 at a time, trials overlap."""
    spans = sorted((t.start_ms, t.end_ms) for t in quick["trials"])
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_export_writes_best_pareto_parquet_and_summary(quick, store):
    out = quick["tmp"] / "export"
    result = cli("export", "quickstart", "--out", out, "--mlflow", store)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(table) == 4 and {r["status"] for r in table} == {"FINISHED"}
    assert all(r["mlflow_run_id"] and r["duration_s"] > 0 for r in table)
    front = yaml.safe_load((out / "pareto.yaml").read_text())
    points = [(r["metric.clean_acc"], r["metric.acc_0.5"]) for r in table]
    for member in front:
        a, b = member["metrics"]["clean_acc"], member["metrics"]["acc_0.5"]
        assert not any(x >= a and y >= b and (x, y) != (a, b) for x, y in points)
    dominated = [p for p in points if any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    assert len(front) == len(points) - len(dominated)
    best = flatten(yaml.safe_load((out / "best.yaml").read_text()))
    assert best["data.name"] == "digits" and not any(isinstance(v, str) and os.path.isabs(v) for v in best.values())
    assert "Pareto front" in (out / "summary.md").read_text()


def test_best_yaml_trains_again(quick, store):
    out = quick["tmp"] / "export-best"
    assert cli("export", "quickstart", "--out", out, "--mlflow", store, "--objective", "clean_acc").exit_code == 0
    result = cli("train", out / "best.yaml", "--mlflow", store, "--storage", quick["tmp"] / "train-runs")
    assert result.exit_code == 0, result.output
    mlflow = quick["mlflow"]
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("best").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "clean_acc" in runs[0].data.metrics and runs[0].data.tags["specreg.role"] == "train"


def test_runs_lists_trials_as_table_csv_and_json(quick, store):
    result = cli("runs", "quickstart", "--sort", "clean_acc", "--format", "json", "--mlflow", store)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 4 and {"trial", "status", "regularizer.kind", "clean_acc", "acc_0.5"} <= set(rows[0])
    accs = [r["clean_acc"] for r in rows]
    assert accs == sorted(accs, reverse=True)
    result = cli("runs", "quickstart", "--limit", "2", "--format", "csv", "--mlflow", store)
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 3
    assert cli("runs", "quickstart", "--mlflow", store).exit_code == 0


def test_the_baseline_runs_once_and_runs_and_summary_compare_every_trial_with_it(quick, store):
    trials = quick["trials"]
    assert [t.searched for t in trials].count({"regularizer.kind": "none"}) == 1
    assert len({json.dumps(t.searched, sort_keys=True) for t in trials}) == len(trials)
    result = cli("runs", "quickstart", "--format", "json", "--mlflow", store)
    assert result.exit_code == 0, result.output
    rows = {r["trial"]: r for r in json.loads(result.output)}
    base = next(t for t in trials if t.searched == {"regularizer.kind": "none"})

    def robust(trial):  # robust at ε = 0.5 point by point: a finite distance beyond it (inf: no start point)
        with tempfile.TemporaryDirectory() as staging:
            distances = np.load(quick["mlflow"].download_artifacts(trial.run_id, "distances.npy", staging))
        return (np.isfinite(distances) & (distances > 0.5)).astype(float)

    for trial in trials:
        row = rows[trial.trial_id]
        delta = [row[f"Δ acc_0.5{end}"] for end in ("", " low", " high", " within noise")]
        if trial is base:
            assert delta == [None] * 4
            continue
        mean, low, high, noise = delta
        assert mean == pytest.approx(np.mean(robust(trial) - robust(base)))  # the same 20 points, paired
        assert low <= mean <= high and noise == (low <= 0 <= high)
        assert row["Δ clean_acc"] is not None
    table = cli("runs", "quickstart", "--mlflow", store).output
    assert "Δ acc_0.5 (pp)" in table and re.search(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", table)
    out = quick["tmp"] / "export-versus"
    assert cli("export", "quickstart", "--out", out, "--mlflow", store).exit_code == 0
    summary = (out / "summary.md").read_text()
    assert f"## Every trial against the baseline ({base.trial_id})" in summary and "within noise" in summary
    section = summary.split("## Every trial against the baseline")[1]
    assert len([line for line in section.splitlines() if re.search(r"\d \[[+-]\d", line)]) == len(trials) - 1


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, store):
    """Strength grid x 2 seeds, regularized after a shared 1-epoch burn-in; a different threat model."""
    space = tiny_space("ablation", sampler={"name": "grid"}, samples=None, seeds=[0, 1],
                       search={"regularizer.strength": {"grid": [0.01, 0.1]}},
                       objectives=[{"metric": "clean_acc", "mode": "max"}, {"metric": "adv_auc", "mode": "max"}])
    space["base"]["regularizer"] = {"kind": "rep-spectral", "burnin": 0.5}
    space["base"]["attack"]["max_queries"] = 100
    return _sweep(tmp_path_factory.mktemp("ablation"), space, store, "--max-concurrent", "2")


def test_ablation_holds_config_runs_with_seed_mean_and_interval(ablation):
    mlflow, sweep, configs = ablation["mlflow"], ablation["sweep"], ablation["trials"]
    assert len(configs) == 2 and {c.status for c in configs} == {"FINISHED"}
    for config in configs:
        seeds = _runs(mlflow, sweep, f"tags.`mlflow.parentRunId` = '{config.run_id}'")
        assert sorted(int(s.data.params["train.seed"]) for s in seeds) == [0, 1]
        assert {s.info.status for s in seeds} == {"FINISHED"}
        values = [s.data.metrics["clean_acc"] for s in seeds]
        mean, low, high = mean_interval(values)
        assert config.metrics["clean_acc"] == pytest.approx(mean)
        assert config.metrics["clean_acc_ci95_low"] == pytest.approx(low)
        assert config.metrics["clean_acc_ci95_high"] == pytest.approx(high)
        assert config.params["seeds"] == "[0, 1]"


def test_shared_burnin_trains_each_prefix_once_and_matches_training_from_scratch(ablation, store):
    mlflow, sweep = ablation["mlflow"], ablation["sweep"]
    seed_runs = _runs(mlflow, sweep, "tags.`specreg.role` = 'seed'")
    for seed in ("0", "1"):
        marks = sorted(r.data.tags["specreg.burnin"] for r in seed_runs if r.data.params["train.seed"] == seed)
        assert marks == ["cached", "trained"]
    cache = ablation["tmp"] / "runs" / "burnin-cache"  # one per storage folder, shared by its sweeps
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    cached = next(r for r in seed_runs if r.data.params["train.seed"] == "0"
                  and float(r.data.params["regularizer.strength"]) == 0.1)

    space = tiny_space("scratch", sampler={"name": "grid"}, samples=None, seeds=[0],
                       search={"regularizer.strength": {"grid": [0.1]}}, run={"shared_burnin": False})
    space["base"]["regularizer"] = {"kind": "rep-spectral", "burnin": 0.5}
    space["base"]["attack"]["max_queries"] = 100
    scratch = _sweep(ablation["tmp"], space, store)
    (trial,) = scratch["trials"]
    assert "specreg.burnin" not in mlflow.get_run(trial.run_id).data.tags
    for metric in ("train_loss", "train_acc", "clean_acc", "med_dist", "acc_0.5", "adv_auc"):
        assert trial.metrics[metric] == cached.data.metrics[metric], metric
    # The logged σ_max is iterated to a tolerance from a warm start that the prefix does not carry over.
    assert trial.metrics["sigma_sq_sum"] == pytest.approx(cached.data.metrics["sigma_sq_sum"], rel=1e-5)


def test_runs_refuses_to_rank_across_threat_models(quick, ablation, store):
    result = cli("runs", "--sort", "adv_auc", "--mlflow", store)
    assert result.exit_code == 2 and "threat model" in result.output
    assert cli("runs", "--sort", "clean_acc", "--mlflow", store).exit_code == 0


def test_asha_stops_trials_and_leaves_no_run_open(tmp_path, store):
    space = tiny_space("asha", samples=4, scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
                       search={"train.lr": {"loguniform": [0.001, 0.2]}})
    space["base"]["train"]["epochs"] = 3
    done = _sweep(tmp_path, space, store, "--max-concurrent", "2")
    runs = _runs(done["mlflow"], done["sweep"], "tags.`specreg.role` = 'trial'")
    assert len(runs) == 4 and {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    for run in runs:
        expected = "finished" if run.info.status == "FINISHED" else "early_stopped"
        assert run.data.tags["specreg.outcome"] == expected
