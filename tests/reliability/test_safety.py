"""Safety: servers bind 127.0.0.1, sweep names cannot escape their folder, YAML cannot run code,
checkpoints cannot run code. (Exported configs without absolute paths: test_trial_faults.py.)"""
import os
import pickle
import signal
import socket
from pathlib import Path

import pytest
import torch

import specreg

from reliability_helpers import TINY_BASE, cli, kill_session, specreg_process, write_yaml, store  # noqa: F401
from shared_helpers import free_port, wait_healthy


def _descendants(pid: int) -> set[int]:
    """Every live process started by pid, and by those, from /proc (Linux only, as are these tests)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # after the ")" that ends the command name: state, ppid, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        found.update(new := children.get(todo.pop(), []))
        todo += new
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(port: int) -> list[str]:
    """The local addresses that listen on port (IPv4, from /proc/net/tcp: state 0A is LISTEN)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return [socket.inet_ntoa(bytes.fromhex(local.split(":")[0])[::-1]) for _, local, _, state, *_ in rows
            if int(local.split(":")[1], 16) == port and state == "0A"]


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_ui_binds_localhost_and_stopping_it_stops_the_whole_server(tmp_path, store, stop):
    """`specreg ui` serves on 127.0.0.1 only; SIGTERM to it, or Ctrl-C (SIGINT to its process group, as a
    terminal sends it), ends it, and by the time it has ended every process of MLflow's server has too and
    the port is free (a `ui` started again on that port finds it free)."""
    port = free_port()
    ui = specreg_process("ui", "--port", port, "--mlflow", store, cwd=tmp_path)
    server = set()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", ui, timeout=120)
        assert _listening(port) == ["127.0.0.1"]
        server = _descendants(ui.pid)
        assert len(server) > 3, server  # the server, its uvicorn workers, its job runner and consumers
        if stop == "SIGTERM":
            ui.send_signal(signal.SIGTERM)
        else:
            os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=60)
        assert not [pid for pid in server if _alive(pid)]  # gone by the time `ui` has returned
        assert not _listening(port)
    finally:
        kill_session(ui)
        for pid in filter(_alive, server):  # what a failing `ui` left behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("name", ["a/b", "../up", "..", "a\\b", "/abs", "x/../../y"])
def test_sweep_names_with_path_parts_exit_2_and_create_nothing(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    space = {"name": "fine", "base": TINY_BASE, "search": {"train.lr": {"choice": [0.05]}},
             "objectives": [{"metric": "clean_acc", "mode": "max"}], "samples": 1}
    write_yaml(tmp_path / "flag.yaml", space)
    write_yaml(tmp_path / "file.yaml", {**space, "name": name})
    for args in (["file.yaml"], ["flag.yaml", "--name", name]):
        result = cli("sweep", *args)
        assert result.exit_code == 2 and "not a valid sweep name" in result.output, (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.yaml", "flag.yaml"]
    assert not (tmp_path.parent / "up").exists() and not (tmp_path.parent / "y").exists()


def test_yaml_tags_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    (tmp_path / "config.yaml").write_text("data: !!python/object/apply:os.system ['touch pwned']\n")
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2 and "YAML" in result.output, result.output
    result = cli("train", "config.yaml")
    assert result.exit_code == 2 and "YAML" in result.output, result.output
    assert not (tmp_path / "pwned").exists()


class _Payload:
    """Unpickling this would create a file (what a malicious checkpoint would do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_checkpoints_load_weights_only(tmp_path):
    (tmp_path / "ckpt").mkdir()
    evil = tmp_path / "pwned"
    torch.save({"epoch": 1, "model": _Payload(evil)}, tmp_path / "ckpt" / "state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        specreg.load_checkpoint(tmp_path / "ckpt")
    assert not evil.exists()
