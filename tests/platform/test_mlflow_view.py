"""What a user sees of a sweep in MLflow and on the terminal (issue 15, items 4 and 5): a quiet start, an
experiment of MLflow's training kind, readable run names, only the params a trial used, the sweep's
description, metric names a narrow column tells apart, an attack's trace as its metrics' history, and a
store that still works after it was copied or moved, or was written before today's metric names."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest
from mlflow import MlflowClient

import specreg
from specreg_platform.track import connection, sweep_records, tracking

from platform_helpers import TINY_BASE, cli, tiny_space, write_yaml

pytestmark = pytest.mark.integration

DESCRIPTION = "Which regularizer, and where, on digits."


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 3-trial grid sweep (none, rep-spectral on upto:1, spectral-decay), run as the real command in its
    own process, so that it starts its own local Ray instance as a user's does (about 40 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("store")
    space = tiny_space("view", description=DESCRIPTION, sampler={"name": "grid"}, search={
        "regularizer.kind": {"choice": ["none", "rep-spectral", "spectral-decay"]},
        "regularizer.strength": {"choice": [0.01], "when": {"regularizer.kind": ["rep-spectral", "spectral-decay"]}},
        "regularizer.target_exponent": {"choice": [1.5], "when": {"regularizer.kind": ["spectral-decay"]}},
        "regularizer.placement": {"choice": ["upto:1"], "when": {"regularizer.kind": ["rep-spectral"]}}})
    space["base"] = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 1},
                     "attack": {**TINY_BASE["attack"], "max_queries": None, "iterations": 3, "trace": [1, 2]}}
    space.pop("samples")
    write_yaml(folder / "space.yaml", space)
    done = subprocess.run([sys.executable, "-c", "from specreg_platform.cli import main; main()", "sweep",
                           "space.yaml"], cwd=folder, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
                              "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    mlflow = MlflowClient(f"sqlite:///{folder / 'mlruns.db'}")
    sweep = sweep_records.find_sweep(mlflow, "view")
    runs = {r.info.run_id: r for r in mlflow.search_runs([sweep.experiment_id])}
    trials = {json.loads(r.data.tags[connection.SEARCHED])["regularizer.kind"]: r for r in runs.values()
              if r.data.tags[connection.ROLE] == "trial"}
    return {"folder": folder, "output": done.stdout + done.stderr, "mlflow": mlflow, "sweep": sweep,
            "trials": trials, "parent": runs[sweep.parent_run_id]}


def test_the_sweep_starts_without_ray_noise(swept):
    """No token-auth warning for the local instance Ray starts, no Tune settings table or TensorBoard hint."""
    for noise in ("Token authentication", "TensorBoard", "View detailed results", "Configuration for experiment"):
        assert noise not in swept["output"], swept["output"]
    assert "sweep view done" in swept["output"]


def test_the_experiment_is_of_the_training_kind_and_trials_have_readable_names(swept):
    experiment = swept["mlflow"].get_experiment(swept["sweep"].experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    names = {kind: run.info.run_name for kind, run in swept["trials"].items()}
    assert names == {"none": "none", "rep-spectral": "rep-spectral λ=0.01 upto:1",
                     "spectral-decay": "spectral-decay λ=0.01 feature α=1.5"}


def test_a_trial_logs_only_the_params_its_regularizer_uses_as_runs_shows_them(swept):
    params = {kind: run.data.params for kind, run in swept["trials"].items()}
    assert [k for k in params["none"] if k.startswith("regularizer.")] == ["regularizer.kind"]
    assert "regularizer.target_exponent" not in params["rep-spectral"]
    assert params["rep-spectral"]["regularizer.placement"] == "upto:1"
    assert params["spectral-decay"]["regularizer.target_exponent"] == "1.5"
    listed = cli("runs", "view", "--format", "json", "--mlflow", swept["folder"] / "mlruns.db")
    assert listed.exit_code == 0, listed.output
    shown = {row["regularizer.kind"]: row for row in json.loads(listed.output)}
    for kind, row in shown.items():  # runs shows a placement exactly where MLflow has one, the same one
        assert row["regularizer.placement"] == params[kind].get("regularizer.placement"), kind


def test_the_sweep_run_describes_the_space_and_its_result(swept):
    note = swept["parent"].data.tags["mlflow.note.content"]
    assert note.startswith(DESCRIPTION)
    assert "trials: 3 (3 finished)" in note and "clean_acc" in note


def shown(name: str, width: int = 9) -> str:
    """A metric name as a narrow MLflow column or chart title shows it: MLflow 3.17's charts, three to a row
    in a 1600-pixel window, show about nine characters and an ellipsis (docs/screenshots/mlflow-charts.png)."""
    return name if len(name) <= width else name[:width] + "…"


def test_metric_names_stay_distinct_in_a_narrow_column(swept):
    for kind, run in swept["trials"].items():
        names = sorted(run.data.metrics)
        assert {"acc_0.5", "kept_0.5", "acc_1.0", "kept_1.0", "med_dist", "med_dist_correct", "mean_dist",
                "adv_auc", "clean_acc", "attack_queries_mean", "attack_samples"} <= set(names), names
        seen = {}
        for name in names:
            assert shown(name) not in seen, f"{kind}: {name!r} and {seen[shown(name)]!r} show as {shown(name)!r}"
            seen[shown(name)] = name


def test_every_layer_and_radius_of_a_deeper_model_stays_distinct_too():
    """All three weight layers of an MLP logged (all-layer-spectral) and six radii: what MLflow would show."""
    result = specreg.run_experiment({
        **TINY_BASE, "model": {"name": "mlp", "widths": [32, 32]}, "train": {**TINY_BASE["train"], "epochs": 1},
        "regularizer": {"kind": "all-layer-spectral", "strength": 1e-3},
        "attack": {"name": "tangent", "samples": 10, "max_queries": 100, "eps": [0.25, 0.5, 1.0, 1.25, 1.5, 2.0]}})
    names = sorted(tracking.scalars(result))
    assert {"sigma_1", "sigma_2", "sigma_3", "acc_1.25", "kept_1.25", "acc_1.5"} <= set(names), names
    assert len({shown(name) for name in names}) == len(names), [shown(name) for name in names]


def test_the_attack_trace_is_each_metrics_history_ending_with_the_full_attack(swept, tmp_path):
    """The attack traced iterations 1 and 2 of 3: each distance metric has steps 1, 2, 3, MLflow's value is
    the last (checked against the trial's own distances.npy), and distances only shrink as it goes on."""
    mlflow = swept["mlflow"]
    for kind, run in swept["trials"].items():
        assert not [k for k in run.data.metrics if k.startswith("iter")]
        history = sorted(mlflow.get_metric_history(run.info.run_id, "med_dist"), key=lambda p: p.step)
        assert [p.step for p in history] == [1, 2, 3]
        assert history[0].value >= history[1].value >= history[2].value
        assert run.data.metrics["med_dist"] == history[-1].value
        distances = np.load(mlflow.download_artifacts(run.info.run_id, "distances.npy", str(tmp_path)))
        assert run.data.metrics["med_dist"] == pytest.approx(np.median(distances[np.isfinite(distances)]))
        queries = sorted(mlflow.get_metric_history(run.info.run_id, "attack_queries_mean"), key=lambda p: p.step)
        assert [p.step for p in queries] == [1, 2, 3] and queries[0].value < queries[1].value < queries[2].value


OLD_NAMES = {"acc_0.5": "adv_acc_eps_0.5", "kept_1.0": "adv_acc_correct_eps_1.0", "med_dist": "adv_dist_median",
             "med_dist_correct": "adv_dist_median_correct", "mean_dist": "adv_dist_mean"}


def test_a_store_written_before_the_short_names_reads_under_them(swept, tmp_path):
    """A copy of the store with its metrics renamed in SQLite to the names of before (and an objective on one
    of them): `runs` lists them under today's names, and ranks by the old objective."""
    copy = tmp_path / "old"
    shutil.copytree(swept["folder"], copy, ignore=shutil.ignore_patterns("specreg-runs"))
    with sqlite3.connect(copy / "mlruns.db") as db:
        for new, old in OLD_NAMES.items():
            for table in ("metrics", "latest_metrics"):
                db.execute(f"UPDATE {table} SET key = ? WHERE key = ?", (old, new))
        objectives = json.dumps([{"metric": "adv_acc_eps_0.5", "mode": "max"}])
        db.execute("UPDATE tags SET value = ? WHERE key = 'specreg.objectives'", (objectives,))
    old = MlflowClient(f"sqlite:///{copy / 'mlruns.db'}")
    run = old.get_run(swept["trials"]["none"].info.run_id)
    assert "adv_acc_eps_0.5" in run.data.metrics and "acc_0.5" not in run.data.metrics  # the old store
    listed = cli("runs", "view", "--format", "json", "--mlflow", copy / "mlruns.db")
    assert listed.exit_code == 0, listed.output
    rows = {row["regularizer.kind"]: row for row in json.loads(listed.output)}
    for kind, row in rows.items():
        metrics = swept["trials"][kind].data.metrics
        assert row["acc_0.5"] == pytest.approx(metrics["acc_0.5"])
        assert not [k for k in row if k.startswith("adv_acc") or k.startswith("adv_dist")]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_copied_store_reads_and_writes_only_its_own_artifacts(swept, tmp_path):
    original = swept["folder"]
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, ignore=shutil.ignore_patterns("specreg-runs"))
    before = _snapshot(original)
    result = cli("report", "view", "--mlflow", copy / "mlruns.db", "--out", tmp_path / "report", "--format", "md")
    assert result.exit_code == 0, result.output
    assert _snapshot(original) == before  # the original folder is untouched
    assert list((copy / connection.ARTIFACT_DIR).rglob("report/*.png"))  # the figures went into the copy's

    moved = tmp_path / "moved"
    shutil.copytree(original, moved, ignore=shutil.ignore_patterns("specreg-runs"))
    hidden = original.with_name(original.name + "-gone")
    original.rename(hidden)
    try:  # the original is gone: export and report work from the moved store alone
        result = cli("export", "view", "--out", tmp_path / "export", "--mlflow", moved / "mlruns.db")
        assert result.exit_code == 0, result.output
        assert (tmp_path / "export" / "best.yaml").is_file()
        result = cli("report", "view", "--mlflow", moved / "mlruns.db", "--out", tmp_path / "report2")
        assert result.exit_code == 0, result.output
    finally:
        hidden.rename(original)


def test_a_store_copied_without_its_artifacts_is_refused_naming_the_folder(swept, tmp_path):
    (tmp_path / "lone").mkdir()
    shutil.copy(swept["folder"] / "mlruns.db", tmp_path / "lone" / "mlruns.db")
    for args in (["export", "view", "--out", tmp_path / "out"], ["report", "view", "--out", tmp_path / "out"]):
        result = cli(*args, "--mlflow", tmp_path / "lone" / "mlruns.db")
        assert result.exit_code == 2, result.output
        said = "".join(result.output.split())  # as one line, whatever the console wrapped
        assert str(swept["folder"] / connection.ARTIFACT_DIR) in said and "nomlartifacts/besideit" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone"]  # no output folder


def test_export_that_cannot_read_a_run_leaves_no_output_folder(swept, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(swept["folder"], copy, ignore=shutil.ignore_patterns("specreg-runs"))
    configs = list((copy / connection.ARTIFACT_DIR).rglob("config.yaml"))
    assert configs
    for config in configs:  # every trial's resolved config is gone from the copy
        config.unlink()
    result = cli("export", "view", "--out", tmp_path / "out", "--mlflow", copy / "mlruns.db")
    assert result.exit_code != 0
    assert not (tmp_path / "out").exists()
