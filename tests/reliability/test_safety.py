"""Safety: servers bind 127.0.0.1, sweep names cannot escape their folder, YAML cannot run code,
checkpoints cannot run code. (Exported configs without absolute paths: test_trial_faults.py.)"""
import pickle
import subprocess

import pytest
import torch

import specreg
from specreg_platform import cli as cli_module

from reliability_helpers import TINY_BASE, cli, write_yaml, store  # noqa: F401 (fixtures)


def test_ui_binds_localhost_unless_told_otherwise(tmp_path, monkeypatch, store):
    started = []
    monkeypatch.setattr(cli_module.subprocess, "run",
                        lambda command, **kw: started.append(command) or subprocess.CompletedProcess(command, 0))
    assert cli("ui", "--mlflow", store).exit_code == 0
    assert cli("ui", "--mlflow", store, "--host", "10.0.0.5").exit_code == 0
    default, told = started
    assert default[default.index("--host") + 1] == "127.0.0.1"
    assert told[told.index("--host") + 1] == "10.0.0.5"


@pytest.mark.parametrize("name", ["a/b", "../up", "..", "a\\b", "/abs", "x/../../y"])
def test_sweep_names_with_path_parts_exit_2_and_create_nothing(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    space = {"name": "fine", "base": TINY_BASE, "search": {"train.lr": {"choice": [0.05]}},
             "objectives": [{"metric": "clean_acc", "mode": "max"}], "samples": 1}
    write_yaml(tmp_path / "flag.yaml", space)
    write_yaml(tmp_path / "file.yaml", {**space, "name": name})
    for args in (["file.yaml"], ["flag.yaml", "--name", name]):
        result = cli("sweep", *args)
        assert result.exit_code == 2 and "not a valid sweep name" in result.output, (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.yaml", "flag.yaml"]
    assert not (tmp_path.parent / "up").exists() and not (tmp_path.parent / "y").exists()


def test_yaml_tags_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    (tmp_path / "config.yaml").write_text("data: !!python/object/apply:os.system ['touch pwned']\n")
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2 and "YAML" in result.output, result.output
    result = cli("train", "config.yaml")
    assert result.exit_code == 2 and "YAML" in result.output, result.output
    assert not (tmp_path / "pwned").exists()


class _Payload:
    """Unpickling this would create a file (what a malicious checkpoint would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoints_load_weights_only(tmp_path):
    (tmp_path / "ckpt").mkdir()
    evil = tmp_path / "pwned"
    torch.save({"epoch": 1, "model": _Payload(evil)}, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        specreg.load_checkpoint(tmp_path / "ckpt")
    assert not evil.exists()
