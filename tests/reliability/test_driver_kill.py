"""The driver is killed with SIGKILL mid-sweep, then `specreg sweep SPACE.yaml --resume` continues it:
finished trials are not rerun, MLflow ends with one FINISHED run per trial and nothing RUNNING.

The driver runs as a subprocess (the real `specreg` command, with its own Ray instance); the kill takes
its Ray processes with it, as a reboot would."""
import os
import signal
import time

import pytest
from mlflow import MlflowClient

from reliability_helpers import grid_space, kill_session, specreg_process, sqlite_uri, write_yaml

pytestmark = pytest.mark.integration

TRIAL_QUERY = "tags.`specreg.role` = 'trial'"


def _three_slow_trials(tmp_path, name):
    """A sweep of three ~20-epoch trials run one at a time, so an interruption finds one finished and one
    running; returns its MLflow client and the `specreg` arguments that run it."""
    uri = sqlite_uri(tmp_path)
    space = grid_space(name, "train.lr", [0.02, 0.05, 0.1], run={"max_concurrent": 1})
    space["base"]["train"]["epochs"] = 20
    path = write_yaml(tmp_path / "space.yaml", space)
    return MlflowClient(uri), ["sweep", path, "--mlflow", uri, "--storage", tmp_path / "runs"]


def _trial_runs(mlflow, name):
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return []
    return mlflow.search_runs([experiment.experiment_id], TRIAL_QUERY, max_results=100)


def test_resume_after_sigkill_reruns_nothing_finished_and_leaves_nothing_running(tmp_path):
    mlflow, args = _three_slow_trials(tmp_path, "killed")

    driver = specreg_process(*args, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert driver.poll() is None, driver.stdout.read()
            statuses = [r.info.status for r in _trial_runs(mlflow, "killed")]
            if "FINISHED" in statuses and "RUNNING" in statuses:
                break
            assert time.monotonic() < deadline, f"no finished and running trial together: {statuses}"
            time.sleep(0.3)
    finally:
        kill_session(driver)  # the driver, its Ray and its trials' workers, all at once, as a power cut
    before = {r.info.run_id: r for r in _trial_runs(mlflow, "killed")}
    finished_before = {i for i, r in before.items() if r.info.status == "FINISHED"}
    statuses = [r.info.status for r in before.values()]
    assert "RUNNING" in statuses, f"the kill left no interrupted run: {statuses}"

    resumed = specreg_process(*args, "--resume", cwd=tmp_path)
    try:
        output, _ = resumed.communicate(timeout=240)
    finally:
        kill_session(resumed)
    assert resumed.returncode == 0, output

    after = {r.info.run_id: r for r in _trial_runs(mlflow, "killed")}
    experiment = mlflow.get_experiment_by_name("killed")
    assert not mlflow.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'"), "none RUNNING"
    # exactly one FINISHED run per trial (config); an interrupted run was either continued by its trial
    # or, where Ray's saved state predates that trial (it is then run again), closed as KILLED
    finished = sorted(r.data.params["train.lr"] for r in after.values() if r.info.status == "FINISHED")
    assert finished == ["0.02", "0.05", "0.1"], finished
    for run_id, run in after.items():
        if run.info.status != "FINISHED":
            assert run_id in before and before[run_id].info.status == "RUNNING"
            assert run.info.status == "KILLED" and run.data.tags["specreg.outcome"] == "killed"
    for run_id in finished_before:  # not rerun: untouched since the kill, and alone for its config
        assert after[run_id].info.end_time == before[run_id].info.end_time
        steps = [m.step for m in mlflow.get_metric_history(run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 21))
        lr = before[run_id].data.params["train.lr"]
        # .get: a trial killed between opening its run and logging its params leaves a KILLED run without them
        assert [r.data.params.get("train.lr") for r in after.values()].count(lr) == 1


def test_ctrl_c_stops_cleanly_closes_the_runs_and_says_how_to_resume(tmp_path):
    mlflow, args = _three_slow_trials(tmp_path, "interrupted")
    driver = specreg_process(*args, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not any(r.info.status == "RUNNING" for r in _trial_runs(mlflow, "interrupted")):
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline, "no trial started"
            time.sleep(0.3)
        os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
        output, _ = driver.communicate(timeout=120)
    finally:
        kill_session(driver)
    assert driver.returncode == 1, output
    assert "interrupted; continue it with: specreg sweep" in output and "--resume" in output, output
    experiment = mlflow.get_experiment_by_name("interrupted")
    runs = mlflow.search_runs([experiment.experiment_id], "")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"], [r.info.status for r in runs]
    (parent,) = [r for r in runs if r.data.tags["specreg.role"] == "sweep"]
    assert parent.info.status == "KILLED"
    trials = [r for r in runs if r.data.tags["specreg.role"] == "trial"]
    assert {r.info.status for r in trials} <= {"FINISHED", "KILLED"} and "KILLED" in {r.info.status for r in trials}
