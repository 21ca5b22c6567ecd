"""The offline journal: a trial's MLflow writes kept in its sweep's storage folder while the tracking
server is unreachable, replayed in order by `specreg sync`, and the buffered epochs a retried trial still
has to send."""
import json
import time
from pathlib import Path

from .connection import Metric, MlflowClient, Param, RunTag, check_healthy, retry

OFFLINE_DIR = "offline"          # in a sweep's storage folder: writes made while MLflow was unreachable


def reachable(uri: str) -> bool:
    try:
        check_healthy(uri, timeout=5.0)
    except RuntimeError:
        return False
    return True


def append(folder: Path, run_id: str, method: str, kwargs: dict) -> None:
    """Append one write to `folder/<run_id>.jsonl` (artifacts copied beside it)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    entry = {"method": method}
    for key, value in kwargs.items():
        if key == "local_dir":
            copy = folder / f"{run_id}-artifacts-{time.time_ns()}"
            shutil.copytree(value, copy)
            value = copy.name
        elif key in ("metrics", "params", "tags"):
            value = [m.to_dictionary() if hasattr(m, "to_dictionary") else {"key": m.key, "value": m.value}
                     for m in value]
        entry[key] = value
    with open(folder / f"{run_id}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def sync_offline(mlflow: MlflowClient, folder: Path) -> int:
    """Send every journalled write in folder to the tracking server, in order; return how many runs."""
    import shutil

    runs = sorted(Path(folder).glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if Path(folder).is_dir() else []
    for path in runs:
        run_id = path.stem
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            method = entry.pop("method")
            if method == "log_batch":
                retry(mlflow.log_batch, run_id,
                      metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in entry.get("metrics", [])],
                      params=[Param(p["key"], p["value"]) for p in entry.get("params", [])],
                      tags=[RunTag(t["key"], t["value"]) for t in entry.get("tags", [])])
            elif method == "log_artifacts":
                retry(mlflow.log_artifacts, run_id, str(path.parent / entry["local_dir"]))
                shutil.rmtree(path.parent / entry["local_dir"])
            else:
                retry(getattr(mlflow, method), run_id, **entry)
        path.unlink()
    return len(runs)


def not_yet_sent(mlflow: MlflowClient, run_id: str, pending: list[list]) -> list[list]:
    """The buffered epochs (from a checkpoint) that the run does not hold yet: an attempt that failed
    flushed its buffer before ending, so its retry must not send those epochs again."""
    sent: dict[str, set] = {}
    out = []
    for step, metrics in pending:
        if not metrics:
            continue
        key = next(iter(metrics))  # an epoch's metrics are sent together: one key tells
        if key not in sent:
            sent[key] = {m.step for m in retry(mlflow.get_metric_history, run_id, key)}
        if step not in sent[key]:
            out.append([step, metrics])
    return out
