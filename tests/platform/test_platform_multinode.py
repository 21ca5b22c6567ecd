"""A sweep on a Ray cluster of two worker nodes, logging to a real `mlflow server` on 127.0.0.1."""
import subprocess
import sys

import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from specreg_platform.track import sweep_records

from platform_helpers import cli, tiny_space, write_yaml
from shared_helpers import free_port, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def tracking_server(tmp_path):
    port = free_port()
    with open(tmp_path / "mlflow-server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def two_worker_cluster():
    ray.shutdown()  # the other tests' local instance; they start it again when they need it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_config=ray.LoggingConfig(log_level="WARNING"))
    try:
        yield {w.node_id for w in workers}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_trials_run_on_both_workers_and_every_run_reaches_the_server(tmp_path, tracking_server,
                                                                     two_worker_cluster):
    uri, server = tracking_server
    wait_healthy(uri, server, timeout=180)
    space = write_yaml(tmp_path / "multinode.yaml", tiny_space("multinode", samples=2))
    result = cli("sweep", space, "--mlflow", uri, "--storage", tmp_path / "runs", "--max-concurrent", "2")
    assert result.exit_code == 0, result.output

    mlflow = MlflowClient(uri)
    sweep = sweep_records.find_sweep(mlflow, "multinode")
    trials = sweep_records.trials(mlflow, sweep)
    assert len(trials) == 2 and {t.status for t in trials} == {"FINISHED"}
    nodes = {mlflow.get_run(t.run_id).data.tags["specreg.ray_node_id"] for t in trials}
    assert nodes == two_worker_cluster
    for trial in trials:
        assert "clean_acc" in trial.metrics and "acc_1.0" in trial.metrics
        assert {"config.yaml", "model.pt", "distances.npy"} <= {a.path for a in mlflow.list_artifacts(trial.run_id)}
    assert mlflow.get_run(sweep.parent_run_id).info.status == "FINISHED"
    assert not mlflow.search_runs([sweep.experiment_id], "attributes.status = 'RUNNING'")
