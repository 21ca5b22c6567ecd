"""Pieces of the platform and reliability tests that both folders use: the `specreg` command in this
process, YAML files, free ports and MLflow SQLite stores. (tests/ is on sys.path through tests/conftest.py.)"""
import socket
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
