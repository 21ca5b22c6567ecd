"""The cluster's tracking server (issue 15, item 6): `cluster.yaml`'s own command starts MLflow's basic-auth
app on 127.0.0.1; a request without credentials is refused, and a sweep given them in its environment (as
every node of the cluster is) tracks to it."""
import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from platform_helpers import ROOT, tiny_space, write_yaml
from shared_helpers import free_port, wait_healthy

pytestmark = pytest.mark.integration

USER, PASSWORD = "specreg", "a-test-password-0123456789"
SERVER_HOST = "\"$(hostname -I | awk '{print $1}')\""


def _server_command(shared: Path, port: int) -> str:
    """The head's `mlflow server` command from cluster.yaml, with this test's folder for /shared, and
    127.0.0.1 and a free port for the head's private address and 5000."""
    commands = yaml.safe_load((ROOT / "cluster.yaml").read_text())["head_start_ray_commands"]
    command, = [c for c in commands if "mlflow server --app-name basic-auth" in c]
    for old, new in (("/shared", str(shared)), (SERVER_HOST, "127.0.0.1"), ("--port 5000", f"--port {port}")):
        assert command.count(old) >= 1, (old, command)
        command = command.replace(old, new)
    return command


@pytest.fixture
def server(tmp_path):
    """The server as cluster.yaml starts it, HOME being tmp_path (its ~/mlflow.env, ~/mlflow-server.log)."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "mlflow.env").write_text(f"MLFLOW_TRACKING_USERNAME={USER}\nMLFLOW_TRACKING_PASSWORD={PASSWORD}\n"
                                         "MLFLOW_FLASK_SERVER_SECRET_KEY=a-test-secret\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"HOME": str(tmp_path)}
    shell = subprocess.Popen(["bash", "-c", _server_command(tmp_path / "shared", port) + " wait"], cwd=tmp_path,
                             env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, shell, timeout=120)
        yield url
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


def _search(url: str, credentials: tuple[str, str] | None) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _specreg(cwd: Path, *args, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "RAY_"))}
    return subprocess.run([sys.executable, "-c", "from specreg_platform.cli import main; main()", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**base, "OMP_NUM_THREADS": "1", **env})


def test_the_server_refuses_requests_without_credentials_and_a_sweep_with_them_tracks(server, tmp_path):
    assert _search(server, None) == 401
    assert _search(server, (USER, "wrong")) == 401
    assert _search(server, (USER, PASSWORD)) == 200

    space = write_yaml(tmp_path / "space.yaml", tiny_space("authed", samples=1))
    refused = _specreg(tmp_path, "sweep", space, "--mlflow", server, "--storage", tmp_path / "runs")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "MLFLOW_TRACKING_USERNAME" in refused.stderr and not (tmp_path / "runs").exists()

    credentials = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    done = _specreg(tmp_path, "sweep", space, "--mlflow", server, "--storage", tmp_path / "runs", **credentials)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = _specreg(tmp_path, "runs", "authed", "--format", "json", "--mlflow", server, **credentials)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [row["status"] for row in json.loads(listed.stdout)] == ["FINISHED"]
