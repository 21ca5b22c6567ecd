"""Search-space schema, define-by-run conditions, grids, Pareto fronts, intervals, burn-in keys, cluster.yaml."""
import copy
import json
import random

import numpy as np
import optuna
import pytest

from specreg_platform.run import burnin
from specreg_platform.track import connection, sweep_records, tracking
from specreg_platform.base.errors import BadInput
from specreg_platform.space.space import SweepSpec, load_space

from platform_helpers import ROOT, SPACES, TINY_BASE, tiny_space, write_yaml


@pytest.mark.parametrize("name", ["quickstart", "fashion_mnist_slp", "cifar10_resnet18", "ablation_placement"])
def test_shipped_spaces_validate(name):
    spec, base = load_space(SPACES / f"{name}.yaml")
    assert spec.num_samples() >= 8
    assert base["attack"] is not None


def test_quickstart_is_small_and_offline():
    spec, base = load_space(SPACES / "quickstart.yaml")
    assert base["data"]["name"] == "digits" and base["model"]["name"] == "mlp"
    assert spec.num_samples() == 8 and spec.resources.gpu == 0


def test_ablation_is_placement_by_strength_by_three_seeds():
    spec, _ = load_space(SPACES / "ablation_placement.yaml")
    points = spec.grid_points()
    assert len(points) == 12 == len({tuple(sorted(p.items())) for p in points})
    assert {p["regularizer.placement"] for p in points} == {"upto:1", "upto:2", "feature", "all"}
    assert spec.seeds == [0, 1, 2]


def test_define_by_run_samples_a_key_only_where_its_condition_holds():
    spec, _ = load_space(SPACES / "fashion_mnist_slp.yaml")
    study = optuna.create_study(directions=["maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(80):
        trial = study.ask()
        spec.define_by_run(trial)
        params = trial.params
        kind = params["regularizer.kind"]
        assert ("regularizer.target_exponent" in params) == (kind == "spectral-decay")
        assert ("regularizer.strength" in params) == (kind != "none")
        assert ("regularizer.placement" in params) == (kind == "rep-spectral")
        study.tell(trial, [random.random(), random.random()])
    assert {t.params["regularizer.kind"] for t in study.trials} == {
        "none", "rep-spectral", "all-layer-spectral", "spectral-decay"}


def test_grid_leaves_out_inactive_keys_and_lists_travel_as_json(tmp_path):
    space = tiny_space("grid", sampler={"name": "grid"}, samples=None, search={
        "regularizer.kind": {"grid": ["none", "rep-spectral"]},
        "regularizer.strength": {"grid": [0.01, 0.1], "when": {"regularizer.kind": ["rep-spectral"]}},
        "model.widths": {"choice": [[16], [16, 16]]}})
    spec, _ = load_space(write_yaml(tmp_path / "grid.yaml", space))
    points = spec.grid_points()
    assert len(points) == 2 * (1 + 2) == spec.num_samples()
    assert all(("regularizer.strength" in p) == (p["regularizer.kind"] == "rep-spectral") for p in points)
    config = spec.trial_config(points[-1])
    assert config["model"]["widths"] in ([16], [16, 16]) and isinstance(points[-1]["model.widths"], str)


def test_smoke_is_two_one_epoch_trials_with_a_tiny_attack():
    spec, _ = load_space(SPACES / "ablation_placement.yaml", smoke=True)
    assert spec.num_samples() == 2 and spec.seeds == [0] and spec.name == "ablation-placement-smoke"
    assert spec.base["train"]["epochs"] == 1 and spec.base["attack"]["max_queries"] <= 200


def _record(metrics: dict) -> sweep_records.TrialRecord:
    return sweep_records.TrialRecord("s", "id", "t", "FINISHED", "finished", {}, {}, metrics, 0, 1, "m")


def test_pareto_front_is_exactly_the_non_dominated_set():
    rng = np.random.default_rng(0)
    objectives = [{"metric": "a", "mode": "max"}, {"metric": "b", "mode": "min"}]
    records = [_record({"a": float(a), "b": float(b)}) for a, b in rng.integers(0, 6, size=(60, 2))]
    front = sweep_records.pareto(records, objectives)
    for r in records:
        dominated = any(o.metrics["a"] >= r.metrics["a"] and o.metrics["b"] <= r.metrics["b"]
                        and (o.metrics["a"], o.metrics["b"]) != (r.metrics["a"], r.metrics["b"]) for o in records)
        assert (r in front) == (not dominated)


def test_burnin_key_ignores_regularizer_and_attack_but_not_seed_or_length():
    import specreg

    base = specreg.validate_config({**TINY_BASE, "regularizer": {"kind": "rep-spectral", "burnin": 0.5}})
    other = copy.deepcopy(base)
    other["regularizer"].update(kind="spectral-decay", strength=0.3, placement="all", every=4)
    other["attack"]["max_queries"] = 50
    assert burnin.cache_key(base) == burnin.cache_key(other)
    for key, value in [("train.seed", 1), ("regularizer.burnin", 0.0), ("train.lr", 0.2), ("train.epochs", 4)]:
        changed = copy.deepcopy(base)
        section, field = key.split(".")
        changed[section][field] = value
        assert burnin.cache_key(changed) != burnin.cache_key(base), key


def test_cluster_yaml_passes_rays_own_schema(tmp_path):
    import jsonschema
    import yaml
    from ray.autoscaler._private import util  # the private API `ray up` uses; the wrapper depends on it

    from specreg_platform.run.cluster import validate_cluster_config

    assert callable(util.prepare_config) and callable(util.validate_config)
    prepared = validate_cluster_config(ROOT / "cluster.yaml")
    assert prepared["available_node_types"]["gpu_worker"]["min_workers"] >= 1
    assert any("mlflow server" in c for c in prepared["head_start_ray_commands"])
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        validate_cluster_config(write_yaml(tmp_path / "typo.yaml", config))


@pytest.mark.parametrize("change, fragment", [
    ({"searchh": {}}, "searchh: unknown key"),
    ({"search": {"train.lr": {"loguniform": [0.1, 0.01]}}}, "inverted range"),
    ({"search": {"train.lr": {"loguniform": [0.0, 0.1]}}}, "bounds must be > 0"),
    ({"search": {"train.lr": {"uniform": [0.01, 0.1], "choice": [1]}}}, "exactly one of"),
    ({"search": {"regularizer.kind": {"choice": ["none", "spectral-magic"]}}}, "search.regularizer.kind"),
    ({"search": {"regularizer.placement": {"choice": ["feature", "upto:7"]}}}, "search.regularizer.placement"),
    ({"search": {"regularizer.strength": {"uniform": [-0.1, 0.1]}}}, "search.regularizer.strength"),
    ({"search": {"train.lr": {"choice": [0.1], "when": {"regularizer.kind": ["rep"]}}}}, "never"),
    ({"search": {"attack.max_queries": {"choice": [10, 20]}}}, "threat model"),
    ({"search": {"train.nesterov": {"choice": [True]}}}, "search.train.nesterov: not a key"),
    ({"objectives": [{"metric": "acc_3.0"}]}, "no trial reports 'acc_3.0'"),
    ({"objectives": [{"metric": "clean_acc"}, {"metric": "adv_auc"}], "scheduler": {"name": "asha"}},
     "asha needs a single objective"),
    ({"scheduler": {"name": "asha"}, "objectives": [{"metric": "adv_auc"}]}, "only known at the end"),
    ({"name": "../escape"}, "not a valid sweep name"),
    ({"seeds": [0, 0]}, "distinct"),
])
def test_bad_spaces_name_the_key_and_fault(tmp_path, change, fragment):
    space = tiny_space("bad")
    space.update(change)
    path = write_yaml(tmp_path / "bad.yaml", space)
    with pytest.raises(BadInput) as error:
        load_space(path)
    assert fragment in str(error.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbase: {data: {name: digits}\nsearch: {}\n")
    with pytest.raises(BadInput, match=r"line \d+"):
        load_space(path)


def test_spec_survives_the_trip_to_a_trial_and_orders_conditions_first():
    spec, _ = load_space(SPACES / "quickstart.yaml")
    again = SweepSpec.model_validate(spec.model_dump(by_alias=True))
    assert again == spec
    assert again.order()[0] == "regularizer.kind"


def test_searcher_prunes_early_stopped_trials_and_records_a_trial_finished_after_resume():
    from specreg_platform.run.sweep import make_searcher
    from specreg_platform.run.trainable import FINAL

    spec, _ = load_space(SPACES / "quickstart.yaml")
    searcher = make_searcher(spec)
    searcher.suggest("stopped")
    searcher.on_trial_complete("stopped", {"clean_acc": 0.3, "acc_0.5": float("nan")})
    config = searcher.suggest("crashed")
    searcher.on_trial_complete("crashed", None, error=True)
    searcher.on_trial_complete("crashed", {FINAL: 1, "clean_acc": 0.9, "acc_0.5": 0.4})
    states = [(t.state.name, t.values) for t in searcher._ot_study.trials]
    assert states == [("PRUNED", None), ("FAIL", None), ("COMPLETE", [0.9, 0.4])]
    assert searcher._ot_study.trials[-1].params == config


def test_epoch_metrics_are_buffered_then_sent_with_their_steps(store):
    from mlflow import MlflowClient

    mlflow = MlflowClient(store)
    run = tracking.RunLog.open(mlflow, connection.ensure_experiment(mlflow, "buffered", store), "run", {})
    run.log_epoch({"loss": 1.0, "alpha_hat": None}, step=1)
    run.log_epoch({"loss": 0.5}, step=2)
    assert mlflow.get_metric_history(run.run_id, "loss") == [] and len(run.pending) == 2
    retried = tracking.RunLog(mlflow, run.run_id)  # a retried trial sends what its checkpoint kept
    retried.pending, run.pending = json.loads(json.dumps(run.pending)), []
    retried.log_metrics({"clean_acc": 0.9}, step=2)
    run.end("FINISHED", "finished")
    history = sorted((m.step, m.value) for m in mlflow.get_metric_history(run.run_id, "loss"))
    assert history == [(1, 1.0), (2, 0.5)] and mlflow.get_run(run.run_id).info.status == "FINISHED"


def test_searcher_enqueues_the_baseline_first_and_never_repeats_a_config():
    """Told the same values every time, TPE would propose the parameter-less `none` over and over."""
    from specreg_platform.run.sweep import make_searcher
    from specreg_platform.run.trainable import FINAL

    spec, _ = load_space(SPACES / "quickstart.yaml")
    searcher = make_searcher(spec)
    asked = []
    for index in range(24):
        asked.append(searcher.suggest(str(index)))
        searcher.on_trial_complete(str(index), {FINAL: 1, "clean_acc": 0.9, "acc_0.5": 0.5})
    assert asked[0] == {"regularizer.kind": "none"}
    assert len({json.dumps(config, sort_keys=True) for config in asked}) == len(asked)


def test_a_space_of_listed_values_runs_each_config_at_most_once(tmp_path):
    space = tiny_space("listed", samples=8, search={
        "regularizer.kind": {"choice": ["none", "rep-spectral"]},
        "regularizer.strength": {"choice": [0.01, 0.1], "when": {"regularizer.kind": ["rep-spectral"]}}})
    spec, _ = load_space(write_yaml(tmp_path / "listed.yaml", space))
    assert spec.num_samples() == 3
