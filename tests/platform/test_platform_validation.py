"""Every fault of a space refused by the real `specreg` command before Ray starts (exit 2 within 10 s,
naming key, value and the closest valid name, nothing created), and a config that fails inside its trial
neither retried nor counted as a finished sweep."""
import shutil
import subprocess
import time

import pytest
from mlflow import MlflowClient

from specreg_platform.track import sweep_records

from platform_helpers import TINY_BASE, cli, ensure_ray, tiny_space, write_yaml


def _base(**blocks) -> dict:
    space = tiny_space("bad")
    for block, change in blocks.items():
        space["base"][block] = {**space["base"][block], **change}
    return space


@pytest.mark.parametrize("space, fragments", [
    (_base(data={"name": "digitz"}), ["data.name = 'digitz'", "did you mean 'digits'"]),
    (_base(attack={"max_querys": 500}), ["attack.max_querys = 500", "did you mean 'max_queries'"]),
    (_base(model={"widht": [8]}), ["model.widht = [8]", "did you mean 'widths'"]),
    (_base(data={"test_subst": 50}), ["data.test_subst = 50", "did you mean 'test_subset'"]),
    (_base(train={"lrr": 0.1}), ["train.lrr = 0.1", "did you mean 'lr'"]),
    (_base(regularizer={"kind": "rep-spectal"}), ["regularizer.kind = 'rep-spectal'", "did you mean 'rep-spectral'"]),
    (_base(attack={"gamma": -1.0}), ["attack", "gamma", "-1.0"]),
    ({**tiny_space("bad"), "search": {"data.name": {"choice": ["digits", "fashion_mnst"]}}},
     ["search.data.name", "'fashion_mnst'", "did you mean 'fashion_mnist'"]),
    ({**tiny_space("bad"), "search": {"model.activaton": {"choice": ["relu", "gelu"]}}},
     ["search.model.activaton", "did you mean 'activation'"]),
])
def test_the_command_refuses_every_fault_before_anything_starts(tmp_path, space, fragments):
    write_yaml(tmp_path / "space.yaml", space)
    started = time.monotonic()
    done = subprocess.run([shutil.which("specreg"), "sweep", "space.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert seconds < 10, f"{seconds:.1f} s"
    message = " ".join(output.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no store, mlartifacts, specreg-runs


def test_train_refuses_the_same_faults_before_anything_is_created(tmp_path):
    write_yaml(tmp_path / "config.yaml", TINY_BASE)
    started = time.monotonic()
    done = subprocess.run([shutil.which("specreg"), "train", "config.yaml", "--set", "data.name=digitz"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - started
    message = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2 and seconds < 10, (seconds, message)
    assert "data.name = 'digitz'" in message and "did you mean 'digits'" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_config_that_fails_in_its_trial_is_not_retried_and_the_sweep_fails(tmp_path, store):
    """Label 12 does not exist in digits, which only loading the data finds out."""
    ensure_ray()
    space = _base(data={"classes": [0, 12]})
    space["samples"], space["run"] = 1, {"max_failures": 2}
    result = cli("sweep", write_yaml(tmp_path / "classes.yaml", space), "--mlflow", store,
                 "--storage", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    assert "no trial finished" in result.output and "data.classes: [0, 12]" in result.output
    mlflow = MlflowClient(store)
    sweep = sweep_records.find_sweep(mlflow, "bad")
    (trial,) = sweep_records.trials(mlflow, sweep)
    assert (trial.status, trial.outcome) == ("FAILED", "invalid")
    assert mlflow.get_run(sweep.parent_run_id).info.status == "FAILED"
    # Tune leaves error.txt in the folder of a trial that raised; this one ended without raising.
    assert not list((tmp_path / "runs" / "bad").rglob("error.txt"))
