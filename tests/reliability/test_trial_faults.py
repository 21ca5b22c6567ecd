"""A trial that raises is retried from its checkpoint and continues its MLflow run; one that keeps
raising ends FAILED with its error; a NaN loss ends a trial as `diverged`; the sweep goes on."""
import math
import os

import numpy as np

import pytest
import specreg
import yaml
from mlflow import MlflowClient
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from sklearn.datasets import load_digits

from specreg_platform.track import sweep_records

from reliability_helpers import cli, ensure_ray, grid_space, write_yaml, store  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def _sweep(tmp_path, space: dict, store: str) -> dict:
    ensure_ray()
    path = write_yaml(tmp_path / f"{space['name']}.yaml", space)
    result = cli("sweep", path, "--mlflow", store, "--storage", tmp_path / "runs", "--max-concurrent", "2")
    mlflow = MlflowClient(store)
    sweep = sweep_records.find_sweep(mlflow, space["name"])
    runs = mlflow.search_runs([sweep.experiment_id], "tags.`specreg.role` = 'trial'", max_results=100)
    ray_trials = tune.ExperimentAnalysis(str(tmp_path / "runs" / space["name"])).trials
    return {"result": result, "mlflow": mlflow, "sweep": sweep, "dir": tmp_path / "runs" / space["name"],
            "runs": runs,
            "ray": {str(t.config[list(space["search"])[0]]): t for t in ray_trials}}


@pytest.fixture(scope="module")
def failing(tmp_path_factory, store):
    """Three trials, each raising at epoch 2 until it has failed 0, 1 or 9 times; one retry allowed."""
    tmp = tmp_path_factory.mktemp("failing")
    (tmp / "faults").mkdir()
    space = grid_space("failing", "model.fail_times", [0, 1, 9], run={"max_failures": 1})
    space["base"]["model"].update(fail_at_epoch=2, fail_log=str(tmp / "faults"))
    done = _sweep(tmp, space, store)
    done["runs"] = {r.data.params["model.fail_times"]: r for r in done["runs"]}
    done["failures"] = {str(n): len((tmp / "faults" / f"fail_times={n}").read_text().splitlines())
                        for n in (0, 1, 9)}
    return done


def test_the_sweep_goes_on_past_a_failing_trial(failing):
    assert failing["result"].exit_code == 0, failing["result"].output
    assert sorted(failing["runs"]) == ["0", "1", "9"], "one MLflow run per trial, none duplicated"
    assert failing["runs"]["0"].info.status == "FINISHED"


def test_a_trial_that_fails_once_resumes_from_its_checkpoint_in_the_same_run(failing):
    assert failing["failures"]["1"] == 1
    run = failing["runs"]["1"]
    assert run.info.status == "FINISHED" and run.data.tags["specreg.outcome"] == "finished"
    assert failing["ray"]["1"].status == "TERMINATED" and failing["ray"]["1"].num_failures == 1
    # Epoch 1 ran once: the retry started from the epoch-1 checkpoint, not from scratch, and kept
    # logging into the same run (one value per epoch, none twice).
    history = failing["mlflow"].get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert "clean_acc" in run.data.metrics and "acc_1.0" in run.data.metrics


def test_a_trial_failing_past_max_failures_ends_failed_with_its_error(failing):
    assert failing["failures"]["9"] == 2, "the first attempt and one retry (run.max_failures: 1)"
    run = failing["runs"]["9"]
    assert run.info.status == "FAILED"
    assert run.data.tags["specreg.outcome"] == "failed"
    assert "InjectedFault: injected fault at epoch 2" in run.data.tags["specreg.error"]
    assert failing["ray"]["9"].status == "ERROR"
    assert "injected fault" in (failing["ray"]["9"].error_file and open(failing["ray"]["9"].error_file).read())


@pytest.fixture(scope="module")
def attack_failing(tmp_path_factory, store):
    """Two trials of one network: one fails once mid-attack (at its 150th query pass), one does not."""
    tmp = tmp_path_factory.mktemp("attack_failing")
    (tmp / "faults").mkdir()
    space = grid_space("attackfail", "model.fail_times", [0, 1], run={"max_failures": 1})
    space["base"]["model"].update(fail_at_query=150, fail_log=str(tmp / "faults"))
    space["base"]["attack"] = {"name": "tangent", "samples": 30, "max_queries": None, "iterations": 15,
                               "eps": [0.5, 1.0]}
    done = _sweep(tmp, space, store)
    done["runs"] = {r.data.params["model.fail_times"]: r for r in done["runs"]}
    done["failures"] = (tmp / "faults" / "fail_times=1").read_text().splitlines()
    return done


def test_a_trial_failing_mid_attack_continues_its_attack_to_the_uninterrupted_result(attack_failing):
    assert attack_failing["result"].exit_code == 0, attack_failing["result"].output
    assert attack_failing["failures"] == ["query 150"]
    assert attack_failing["ray"]["1"].num_failures == 1 and attack_failing["ray"]["0"].num_failures == 0
    failed, healthy = (attack_failing["runs"][k].data.metrics for k in ("1", "0"))
    # The retry restored the final checkpoint and continued the attack from its kept progress (a restart
    # would report 0), to the same distances as the trial that was never interrupted.
    assert failed["attack_resumed_at"] >= 1 and healthy["attack_resumed_at"] == 0
    attack_metrics = [k for k in healthy
                      if specreg.is_attack_metric(k) and k not in ("attack_seconds", "attack_resumed_at")]
    assert len(attack_metrics) >= 6 and all(failed[k] == healthy[k] for k in attack_metrics)
    assert not any((attack_failing["dir"] / "attack-state").glob("*.pt")), "progress files left behind"


@pytest.fixture(scope="module")
def diverging(tmp_path_factory, store):
    """Two trials: one whose loss turns NaN at epoch 2, one healthy."""
    tmp = tmp_path_factory.mktemp("diverging")
    # digits as an .npz at an absolute path, so that the export can be checked for machine paths
    digits = load_digits()
    np.savez(tmp / "digits.npz", x_train=digits.data[:1400] / 16, y_train=digits.target[:1400],
             x_test=digits.data[1400:] / 16, y_test=digits.target[1400:])
    space = grid_space("diverging", "model.nan_at_epoch", [2, 99])
    space["base"]["data"] = {"name": "npz", "path": str(tmp / "digits.npz")}
    done = _sweep(tmp, space, store)
    done["tmp"] = tmp
    done["runs"] = {r.data.params["model.nan_at_epoch"]: r for r in done["runs"]}
    return done


def test_a_nan_loss_ends_the_trial_as_diverged_keeping_its_finite_metrics(diverging):
    assert diverging["result"].exit_code == 0, diverging["result"].output
    run = diverging["runs"]["2"]
    assert run.info.status == "FAILED"
    assert run.data.tags["specreg.outcome"] == "diverged"
    assert "epoch 2" in run.data.tags["specreg.error"]
    history = diverging["mlflow"].get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1] and math.isfinite(history[0].value)
    assert all(math.isfinite(v) for v in run.data.metrics.values())
    # Ray saw a result, not an exception
    assert diverging["ray"]["2"].status == "TERMINATED" and diverging["ray"]["2"].num_failures == 0


def test_other_trials_continue_and_the_searcher_is_told_a_bad_value(diverging):
    healthy = diverging["runs"]["99"]
    assert healthy.info.status == "FINISHED" and healthy.data.tags["specreg.outcome"] == "finished"
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(diverging["dir"]))
    trials = searcher._ot_study.trials
    assert len(trials) == 2
    assert all(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    assert sorted(t.value for t in trials)[0] == -math.inf


def test_exported_configs_hold_no_absolute_path_of_this_machine(diverging, store):
    out = diverging["tmp"] / "export"
    result = cli("export", "diverging", "--out", out, "--mlflow", store)
    assert result.exit_code == 0, result.output
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"].get("nan_at_epoch") == 99, "the healthy trial is the best"
    assert best["data"]["path"] == "../digits.npz"
    for name in ("best.yaml", "pareto.yaml", "summary.md"):
        text = (out / name).read_text()
        for machine_path in (str(diverging["tmp"]), os.path.expanduser("~") + "/"):
            assert machine_path not in text, (name, machine_path)


def test_resuming_a_sweep_whose_saved_state_names_code_this_version_lacks_exits_2_naming_its_commit(tmp_path,
                                                                                                     store):
    """A sweep saved by a version whose modules have since moved (Tune pickles classes by module): --resume
    says which commit started it instead of a traceback, and leaves the sweep's MLflow run as it was."""
    ensure_ray()
    path = write_yaml(tmp_path / "moved.yaml", grid_space("moved", "train.lr", [0.05]))
    args = ("sweep", path, "--mlflow", store, "--storage", tmp_path / "runs")
    assert cli(*args).exit_code == 0
    tuner = tmp_path / "runs" / "moved" / "tuner.pkl"  # Tune's pickled tuner: it names our searcher's module
    assert b"specreg_platform.run.sweep" in tuner.read_bytes()
    tuner.write_bytes(tuner.read_bytes().replace(b"specreg_platform.run.sweep", b"specreg_platform.run.sweeq"))
    mlflow = MlflowClient(store)
    parent = sweep_records.find_sweep(mlflow, "moved").parent_run_id
    result = cli(*args, "--resume")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "--resume: sweep 'moved' was started by specreg at commit" in text
    assert "specreg_platform.run.sweeq" in text and "resume it with that version" in text
    assert mlflow.get_run(parent).info.status == "FINISHED"

