"""Fixtures of the platform tests: one MLflow SQLite store per session; Ray stopped at the end."""
import pytest
import ray


@pytest.fixture(scope="session", autouse=True)
def _stop_ray():
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    """One MLflow SQLite store for the session (creating one takes seconds)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()
    return uri
