"""`specreg sweep --address ray://…`: a sweep driven through Ray Client, against a head node started with
`ray start` (with token authentication, as Ray 2.60 starts clusters), tracked in a local MLflow store."""
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from specreg_platform.track import sweep_records

from platform_helpers import SPACES
from shared_helpers import free_port

pytest.importorskip("grpc", reason="Ray Client needs the ray[client] extra (grpcio)")
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _wait_listening(port: int, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited:\n{log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray Client server did not listen on port {port} within {timeout} s:\n{log.read_text()}")


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head's process group, then any process of this head that left it (found by its temp dir)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def head_node(tmp_path):
    """A Ray head (2 CPUs) in its own process group, with its Ray Client server and its own token; its
    address and token. GRPC_ENABLE_FORK_SUPPORT=0 as cluster.yaml starts heads: with gRPC's fork handlers
    on, the Ray Client server's fork of a per-client server crashed in 2 of 11 runs on a loaded machine
    (`ev_epoll1_linux.cc Check failed: next_worker->state == KICKED`, "Starting Ray client server
    failed"); it only forks to exec, which needs no handlers."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, client_port = free_port(), free_port()
    token = secrets.token_hex(32)
    log = tmp_path / "ray-head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={port}", f"--ray-client-server-port={client_port}",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "GRPC_ENABLE_FORK_SUPPORT": "0"})
    try:
        _wait_listening(client_port, head, log)
        yield f"ray://127.0.0.1:{client_port}", token
    finally:
        _stop(head, temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def _specreg(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([sys.executable, "-c", "from specreg_platform.cli import main; main()", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=240,
                          env={**base, "OMP_NUM_THREADS": "1", **env})


def test_smoke_sweep_through_ray_client(tmp_path, head_node):
    address, token = head_node
    store = tmp_path / "mlruns.db"
    args = ("sweep", str(SPACES / "quickstart.yaml"), "--smoke", "--address", address, "--mlflow", str(store),
            "--storage", str(tmp_path / "runs"))
    # Ray sends no token to an explicit address unless told to: a clear refusal, nothing created.
    refused = _specreg(tmp_path, *args, RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S="1",
                       RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S="1")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "cannot join the Ray cluster" in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray-head.log"]

    done = _specreg(tmp_path, *args, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sweep quickstart-smoke done" in done.stdout

    mlflow = MlflowClient(f"sqlite:///{store}")
    sweep = sweep_records.find_sweep(mlflow, "quickstart-smoke")
    trials = sweep_records.trials(mlflow, sweep)
    assert len(trials) == 2 and {t.status for t in trials} == {"FINISHED"}
    for trial in trials:
        assert "clean_acc" in trial.metrics and "acc_1.0" in trial.metrics
        assert {"config.yaml", "model.pt", "distances.npy"} <= {a.path for a in mlflow.list_artifacts(trial.run_id)}
    assert mlflow.get_run(sweep.parent_run_id).info.status == "FINISHED"
    assert not mlflow.search_runs([sweep.experiment_id], "attributes.status = 'RUNNING'")
