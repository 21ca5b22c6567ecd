"""An MLflow tracking server that does not answer when the sweep starts: the sweep fails before any trial
or folder is created, with a message naming the URI."""
import socket

from conftest import TINY_BASE, cli, write_yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_at_start_fails_before_any_trial_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    space = {"name": "outage", "base": TINY_BASE, "search": {"train.lr": {"choice": [0.05]}},
             "objectives": [{"metric": "clean_acc", "mode": "max"}], "samples": 1}
    write_yaml(tmp_path / "space.yaml", space)
    result = cli("sweep", "space.yaml", "--mlflow", uri, "--storage", tmp_path / "runs")
    assert result.exit_code == 1, result.output
    assert f"the MLflow tracking server {uri} is unreachable" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"], "no Ray storage, no local store"
