"""An MLflow tracking server that does not answer when the sweep starts: the sweep fails before any trial
or folder is created, with a message naming the URI. One killed mid-sweep (a real `mlflow server`): the
trials finish, their writes wait in the sweep's storage, and `specreg sync` sends them once it is back."""
import subprocess
import sys
import threading
import time

import pytest
from mlflow import MlflowClient

from reliability_helpers import HTTP_FAIL_FAST, TINY_BASE, cli, ensure_ray, grid_space, kill_session, write_yaml
from shared_helpers import free_port, wait_healthy

EPOCHS = 300


def test_unreachable_server_at_start_fails_before_any_trial_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    space = {"name": "outage", "base": TINY_BASE, "search": {"train.lr": {"choice": [0.05]}},
             "objectives": [{"metric": "clean_acc", "mode": "max"}], "samples": 1}
    write_yaml(tmp_path / "space.yaml", space)
    result = cli("sweep", "space.yaml", "--mlflow", uri, "--storage", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    assert f"the MLflow tracking server {uri} is unreachable" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"], "no Ray storage, no local store"


def _start_server(folder, port) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, timeout=90)
    except BaseException:
        kill_session(server)
        raise
    return server


@pytest.mark.integration
def test_server_killed_mid_sweep_trials_finish_and_sync_sends_their_results(tmp_path, monkeypatch):
    ensure_ray()
    for key, value in HTTP_FAIL_FAST.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    killed = threading.Event()

    def kill_when_both_trials_run():
        mlflow = MlflowClient(uri)
        try:
            while not killed.is_set():
                experiment = mlflow.get_experiment_by_name("outage-mid")
                if experiment is not None:
                    runs = mlflow.search_runs([experiment.experiment_id],
                                              "tags.`specreg.role` = 'trial' and attributes.status = 'RUNNING'")
                    if len(runs) == 2:
                        kill_session(server)
                        killed.set()
                time.sleep(0.3)
        except Exception:  # noqa: BLE001 - the server went away under the poll: kill it for sure
            kill_session(server)
            killed.set()

    space = grid_space("outage-mid", "train.lr", [0.05, 0.1])
    # Long enough that the first trial is still running when the second one's worker starts, on a loaded
    # machine too (with 30 epochs a trial took under 2 s, and a slow second start let the first finish
    # before the watcher saw both running, so the server was never killed).
    space["base"]["train"]["epochs"] = EPOCHS
    path = write_yaml(tmp_path / "space.yaml", space)
    watcher = threading.Thread(target=kill_when_both_trials_run, daemon=True)
    watcher.start()
    try:
        result = cli("sweep", path, "--mlflow", uri, "--storage", tmp_path / "runs", "--max-concurrent", "2")
    finally:
        killed.set()
        watcher.join(timeout=30)
        kill_session(server)
    assert result.exit_code == 1, result.output
    assert "specreg sync outage-mid" in result.output, result.output
    offline = tmp_path / "runs" / "outage-mid" / "offline"
    assert len(list(offline.glob("*.jsonl"))) == 2, "each trial kept its writes"

    server = _start_server(tmp_path, port)
    try:
        result = cli("sync", "outage-mid", "--storage", tmp_path / "runs")
        assert result.exit_code == 0, result.output
        mlflow = MlflowClient(uri)
        experiment = mlflow.get_experiment_by_name("outage-mid")
        runs = mlflow.search_runs([experiment.experiment_id], "tags.`specreg.role` = 'trial'")
        assert len(runs) == 2
        for run in runs:
            assert run.info.status == "FINISHED" and run.data.tags["specreg.outcome"] == "finished"
            assert "clean_acc" in run.data.metrics and "acc_1.0" in run.data.metrics
            steps = sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "train_loss"))
            assert steps == list(range(1, EPOCHS + 1))
            assert "model.pt" in [f.path for f in mlflow.list_artifacts(run.info.run_id)]
        (parent,) = mlflow.search_runs([experiment.experiment_id], "tags.`specreg.role` = 'sweep'")
        assert parent.info.status == "FINISHED"
        assert not list(offline.glob("*.jsonl"))
    finally:
        kill_session(server)
