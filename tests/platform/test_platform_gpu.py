"""Fractional GPUs on a Ray instance that declares one GPU: trials asking for a quarter of it run four at a
time, each granted 0.25 GPU by Ray, and train on the CPU where torch sees no CUDA device (device auto)."""
import json

import pytest
import ray
import torch
from mlflow import MlflowClient

from specreg_platform.track import sweep_records

from platform_helpers import cli, tiny_space, write_yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def one_gpu():
    """A local Ray instance with 2 CPUs and 1 GPU (a logical one where the machine has none)."""
    ray.shutdown()  # the other tests' instance, which has no GPU; they start it again when they need it
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    yield
    ray.shutdown()


def test_quarter_gpu_trials_share_one_gpu_four_at_a_time(tmp_path, store, one_gpu):
    space = tiny_space("quarter-gpu", samples=4, resources={"cpu": 0.5, "gpu": 0.25})
    # Trials long enough (10-15 s on 2 loaded cores) to outlast Ray's staggered worker starts (up to ~3 s).
    space["base"]["train"]["epochs"] = 8
    space["base"]["attack"].update(samples=60, max_queries=2000)
    result = cli("sweep", write_yaml(tmp_path / "space.yaml", space), "--mlflow", store, "--storage", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "up to 4 at a time" in result.output

    mlflow = MlflowClient(store)
    trials = sweep_records.trials(mlflow, sweep_records.find_sweep(mlflow, "quarter-gpu"))
    assert len(trials) == 4 and {t.status for t in trials} == {"FINISHED"}
    spans = sorted((t.start_ms, t.end_ms) for t in trials)
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans  # all four ran at once
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for trial in trials:
        tags = mlflow.get_run(trial.run_id).data.tags
        assert json.loads(tags["specreg.resources"]) == {"CPU": 0.5, "GPU": 0.25}
        assert tags["specreg.device"] == device
        assert "clean_acc" in trial.metrics and "acc_1.0" in trial.metrics


def test_more_gpus_than_a_node_has_exit_2(tmp_path, monkeypatch, one_gpu):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "space.yaml", tiny_space("two-gpus", resources={"cpu": 1, "gpu": 2}))
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2 and "resources.gpu" in result.output and "no node has more than 1" in result.output
    result = cli("sweep", "space.yaml", "--gpus-per-trial", "1.5")
    assert result.exit_code == 2 and "1.5 GPUs per trial" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
