"""Settings for the whole test session."""
import os

import pytest
import torch

# MLflow's telemetry thread races `requests` over os.environ (see platform/track/connection.py); test modules
# import MLflow before the platform can switch it off, so switch it off here, before any of them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: more threads only add synchronisation, which is
    what costs when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
