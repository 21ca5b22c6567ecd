"""Bad input through the `specreg` command: exit code 2, a message naming the fault, nothing created."""
import pytest
import yaml

from platform_helpers import SPACES, TINY_BASE, cli, ensure_ray, tiny_space, write_yaml


def _only(tmp_path, *names):
    """The folder holds exactly these entries (no store, no Ray results, no output)."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize("change, fragment", [
    ({"unknown": 1}, "unknown: unknown key"),
    ({"search": {"regularizer.kind": {"choice": ["none", "spectral-magic"]}}}, "spectral-magic"),
    ({"search": {"regularizer.placement": {"choice": ["upto:9"]}}}, "search.regularizer.placement"),
    ({"search": {"regularizer.strength": {"uniform": [0.1, 0.01]}}}, "inverted range"),
    ({"search": {"regularizer.strength": {"uniform": [-1.0, 0.1]}}}, "search.regularizer.strength"),
    ({"objectives": [{"metric": "acc_9.0", "mode": "max"}]}, "no trial reports"),
    ({"base": {**TINY_BASE, "train": {"epochs": 0}}}, "base: train.epochs"),
])
def test_bad_space_exits_2_and_creates_nothing(tmp_path, monkeypatch, change, fragment):
    monkeypatch.chdir(tmp_path)
    space = tiny_space("bad")
    space.update(change)
    write_yaml(tmp_path / "space.yaml", space)
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    _only(tmp_path, "space.yaml")


def test_missing_file_and_yaml_syntax(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("sweep", "nowhere.yaml")
    assert result.exit_code == 2 and "no such file" in result.output
    (tmp_path / "broken.yaml").write_text("name: x\nsearch:\n  a: [1, 2\n")
    result = cli("sweep", "broken.yaml")
    assert result.exit_code == 2 and "line" in result.output
    _only(tmp_path, "broken.yaml")


def test_bad_options_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "space.yaml", tiny_space("ok"))
    for args, fragment in [(["--name", "../up"], "not a valid sweep name"), (["--samples", "0"], "--samples"),
                           (["--resume"], "no sweep named 'ok'"), (["--max-concurrent", "0"], "--max-concurrent"),
                           (["--address", "ray://10.0.0.1:10001"], "cannot see the SQLite store")]:
        result = cli("sweep", "space.yaml", *args)
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.output
    _only(tmp_path, "space.yaml")


def test_gpus_on_a_cluster_without_gpus_exit_2(tmp_path, monkeypatch):
    ensure_ray()
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "space.yaml", tiny_space("gpu", resources={"cpu": 1, "gpu": 0.5}))
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2 and "resources.gpu" in result.output and "no GPU" in result.output
    result = cli("sweep", str(SPACES / "quickstart.yaml"), "--gpus-per-trial", "1")
    assert result.exit_code == 2 and "no GPU" in result.output
    _only(tmp_path, "space.yaml")


def test_reading_commands_create_no_store(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    for args in (["runs"], ["runs", "nosuch"], ["export", "nosuch", "--out", "out"], ["ui"]):
        result = cli(*args)
        assert result.exit_code == 2 and "no MLflow store" in result.output, (args, result.output)
    result = cli("export", "nosuch", "--out", "out", "--mlflow", store)
    assert result.exit_code == 2 and "no sweep named 'nosuch'" in result.output
    _only(tmp_path)


def test_train_rejects_bad_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "config.yaml", TINY_BASE)
    for args, fragment in [(["--set", "regularizer.kind=magic"], "regularizer.kind"),
                           (["--set", "novalue"], "key=value"), (["--set", "train.lr=-1"], "train.lr")]:
        result = cli("train", "config.yaml", *args)
        assert result.exit_code == 2 and fragment in result.output, (args, result.output)
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    assert cli("train", "list.yaml").exit_code == 2
    _only(tmp_path, "config.yaml", "list.yaml")


def test_help_lists_every_command_and_option():
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("sweep", "runs", "export", "train", "ui"):
        assert command in result.output
    result = cli("sweep", "--help")
    for option in ("--samples", "--name", "--mlflow", "--storage", "--max-concurrent", "--resume", "--smoke",
                   "--address", "--gpus-per-trial"):
        assert option in result.output
