"""Pieces of the platform and reliability tests that both folders use: the `specreg` command in this
process, YAML files, free ports, MLflow SQLite stores and the wait for an `mlflow server`. (tests/ is on sys.path through tests/conftest.py.)"""
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml
from typer.testing import CliRunner

from specreg_platform.cli import app


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args):
    """Run `specreg ARGS` in this process (so sweeps join the tests' Ray instance)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlite_uri(folder: Path) -> str:
    """A new MLflow SQLite store in `folder`, created now (creating one takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Wait until the `mlflow server` process `server` answers `url`/health; it must not exit meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer /health within {timeout} s")
