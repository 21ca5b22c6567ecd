"""Shared pieces of the reliability tests: a local Ray instance whose workers load the test's faults,
real MLflow stores, tiny sweeps, and the `specreg` command run in this process or as a subprocess.

Not a conftest.py: test modules import these by name, and with a conftest.py in several test folders
the module name `conftest` is ambiguous within one pytest session."""
import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray

import faults
from shared_helpers import cli, sqlite_uri, write_yaml  # noqa: F401 (the test modules import them from here)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# A trial of a few seconds on 2 cores: digits, one hidden layer of 16, 3 epochs, a 10-point attack.
TINY_BASE = {
    "task": "supervised",
    "data": {"name": "digits"},
    "model": {"name": "mlp", "widths": [16]},
    "train": {"epochs": 3, "batch_size": 128, "lr": 0.05},
    "regularizer": {"kind": "none"},
    "attack": {"name": "tangent", "samples": 10, "max_queries": 100, "eps": [0.5, 1.0]},
}


def grid_space(name: str, key: str, values: list, **changes) -> dict:
    """A sweep with one trial per value of `key` (grid sampler: the trials are known in advance)."""
    space = {"name": name, "base": copy.deepcopy(TINY_BASE), "search": {key: {"grid": values}},
             "sampler": {"name": "grid"}, "objectives": [{"metric": "clean_acc", "mode": "max"}],
             "samples": len(values)}
    space.update(changes)
    return space


# MLflow's HTTP client retries a refused connection for minutes by default; the outage test wants seconds.
HTTP_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                            **HTTP_FAIL_FAST},
               "worker_process_setup_hook": "faults.install"}


def ensure_ray() -> None:
    """The tests' local Ray instance (2 CPUs) whose workers install the faults; one started without
    them (by another test folder) is replaced."""
    if ray.is_initialized():
        hook = (ray.get_runtime_context().runtime_env or {}).get("worker_process_setup_hook")
        if hook == RUNTIME_ENV["worker_process_setup_hook"]:
            return
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, runtime_env=RUNTIME_ENV,
             logging_config=ray.LoggingConfig(log_level="WARNING"))


def specreg_process(*args, cwd, **kwargs) -> subprocess.Popen:
    """`specreg ARGS` as its own process (in its own session, so the test can kill all of it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen([sys.executable, "-c", "from specreg_platform.cli import main; main()",
                             *[str(a) for a in args]], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def session_members(session: int) -> list[int]:
    """The live processes whose session id is `session` (from /proc: Linux only, as are these tests)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # after the ")" that ends the command name: state, ppid, pgrp, session, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        if fields[0] != "Z" and int(fields[3]) == session:  # a zombie is dead already
            members.append(int(stat.parent.name))
    return members


def kill_session(process) -> None:
    """SIGKILL a process started in its own session and everything it started, as a power cut would.

    The whole session, not the process group: Ray's workers put themselves in process groups of their
    own, and a killpg that missed them let a trial go on writing to MLflow after its "machine" died."""
    for _ in range(20):  # again until none is left: Ray may start a worker while we kill
        members = session_members(process.pid)
        if not members:
            break
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.wait(timeout=30)


faults.install()  # the driver validates configs with the same builders the workers use


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow SQLite store per test module (creating one takes seconds)."""
    return sqlite_uri(tmp_path_factory.mktemp("mlflow"))
