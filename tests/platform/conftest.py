"""Fixtures of the platform tests: one MLflow SQLite store per session; Ray stopped at the end."""
import pytest
import ray

from shared_helpers import sqlite_uri


@pytest.fixture(scope="session", autouse=True)
def _stop_ray():
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    """One MLflow SQLite store for the session (creating one takes seconds)."""
    return sqlite_uri(tmp_path_factory.mktemp("mlflow"))
