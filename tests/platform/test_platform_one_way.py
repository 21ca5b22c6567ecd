"""One way to do each thing: one bad-input base the command line maps to exit 2, one YAML loader, one strict
schema base and error formatter, one writer of best.yaml / pareto.yaml (no Ray, no MLflow)."""
import inspect

import pytest
import typer
import yaml

import specreg
from specreg_platform import cli
from specreg_platform.results import results
from specreg_platform.run import sweep
from specreg_platform.space import space
from specreg_platform.track import sweep_records
from specreg_platform.base.errors import BadInput

from platform_helpers import TINY_BASE, tiny_space, write_yaml


@pytest.mark.parametrize("error, code", [
    (BadInput("--mode: must be max or min"), 2),
    (specreg.ConfigError("train.lr: must be > 0"), 2),
    (RuntimeError("the MLflow tracking server is unreachable"), 1),
])
def test_one_bad_input_base_is_exit_2(error, code, capsys):
    def command():
        raise error

    assert isinstance(BadInput("x"), specreg.ConfigError)
    with pytest.raises(typer.Exit) as exit_:
        cli.exits(command)()
    assert exit_.value.exit_code == code
    assert str(error) in capsys.readouterr().err


def test_an_export_of_a_sweep_without_a_finished_trial_is_bad_input(tmp_path, monkeypatch):
    """The same condition `specreg confirm` reports as bad input (it was a RuntimeError here: exit 1)."""
    sweep_ = sweep_records.Sweep("s", "0", "parent", [{"metric": "clean_acc", "mode": "max"}], [], [])
    monkeypatch.setattr(results, "find_sweep", lambda mlflow, name: sweep_)
    monkeypatch.setattr(results, "trials", lambda mlflow, s: [])
    monkeypatch.setattr(results, "prefer_confirmed", lambda mlflow, s, records: records)
    with pytest.raises(BadInput, match="no finished trial with clean_acc"):
        results.export(None, "s", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_yaml_loader_for_configs_and_spaces(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nbase: {data: {name: digits}\nsearch: {}\n")
    messages = []
    for load in (lambda path: cli._load_config(path, []), space.load_space):
        with pytest.raises(BadInput) as error:
            load(broken)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "line 3" in messages[0]
    listed = write_yaml(tmp_path / "list.yaml", [1, 2])
    for load in (lambda path: cli._load_config(path, []), space.load_space):
        with pytest.raises(BadInput, match="expected a mapping"):
            load(listed)


def test_one_strict_base_and_one_error_format_for_configs_and_spaces(tmp_path):
    assert issubclass(space.SweepSpec, specreg.Strict) and issubclass(space.Param, specreg.Strict)
    assert issubclass(specreg.ExperimentConfig, specreg.Strict)
    with pytest.raises(specreg.ConfigError) as config_error:
        specreg.validate_config({**TINY_BASE, "extra_key": 1})
    with pytest.raises(BadInput) as space_error:
        space.load_space(write_yaml(tmp_path / "space.yaml", {**tiny_space("s"), "extra_key": 1}))
    assert "extra_key: unknown key" in str(config_error.value)
    assert str(space_error.value).endswith("\nextra_key: unknown key")


def test_best_and_pareto_have_one_writer(monkeypatch, tmp_path):
    configs = {"a": {**TINY_BASE, "data": {"name": "npz", "path": str(tmp_path / "data.npz")}}, "b": TINY_BASE}
    monkeypatch.setattr(sweep_records, "run_config", lambda mlflow, run_id: configs[run_id])

    def record(run_id, acc):
        return sweep_records.TrialRecord("s", run_id, f"t-{run_id}", "FINISHED", "finished", {}, {},
                                   {"clean_acc": acc}, 0, 1, "")

    front = [record("a", 0.9), record("b", 0.8)]
    stored = sweep_records.front_files(None, front[0], front, ["clean_acc"])
    assert yaml.safe_load(stored["best.yaml"]) == configs["a"]
    pareto = yaml.safe_load(stored["pareto.yaml"])
    assert [(p["mlflow_run_id"], p["trial_id"], p["metrics"]) for p in pareto] == \
        [("a", "t-a", {"clean_acc": 0.9}), ("b", "t-b", {"clean_acc": 0.8})]
    exported = sweep_records.front_files(None, front[0], front, ["clean_acc"], tmp_path / "out")
    assert yaml.safe_load(exported["best.yaml"])["data"]["path"] == "../data.npz"  # portable in an export
    source = inspect.getsource(sweep._finish_tracking)
    assert "front_files" in source and "safe_dump" not in source and "config_yaml" not in source


def test_no_default_that_every_caller_overrides():
    """Defaults no caller used (every call passed the value) are gone: the signature says what callers do."""
    import ast
    from pathlib import Path

    from specreg_platform.run import trainable
    from specreg_platform.track import connection, run_files

    empty = inspect.Parameter.empty
    for function, name in [(connection.check_healthy, "timeout"), (run_files.result_files, "checkpoint_dir"),
                           (trainable.Trial._end, "error"), (sweep_records.summary_markdown, "versus"),
                           (results.ranking_objectives, "objective"), (results.ranking_objectives, "mode")]:
        assert inspect.signature(function).parameters[name].default is empty, (function.__name__, name)
    # A phase's evaluate(full) is only ever called by the training loop, with `full` given.
    library = Path(specreg.__file__).parent
    for module in ("train", "ssl", "transfer", "probe", "loop"):
        tree = ast.parse((library / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith(("evaluate", "encoder_metrics")):
                assert not node.args.defaults, f"{module}.{node.name}"
