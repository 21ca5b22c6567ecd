"""MLflow tracking through `MlflowClient`, done by the process that runs the trial.

One experiment per sweep; a parent run for the sweep, a nested run per trial (`mlflow.parentRunId`), and
for several seeds a nested run per seed under the trial's config run. Every write is retried on a
temporary fault. A run ends FINISHED, FAILED or KILLED, never left RUNNING by a normal exit.
"""
import io
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import yaml

import specreg

# Before MLflow is first imported: its telemetry client starts at import, cannot reach the network from
# a cluster without egress, and sets/unsets an environment variable from a background thread, which
# raced `requests` reading os.environ (KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in a trial).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode  # noqa: E402

from .errors import BadInput
from .space import flatten
from .stats import mean_interval

DEFAULT_DB = "mlruns.db"
ARTIFACT_DIR = "mlartifacts"
PARENT = "mlflow.parentRunId"
ROLE = "specreg.role"            # sweep | trial | seed | train
SWEEP = "specreg.sweep"
TRIAL_ID = "specreg.trial_id"
SEED = "specreg.seed"
SEARCHED = "specreg.searched"   # a trial's searched values (JSON): only the keys whose conditions held
OUTCOME = "specreg.outcome"      # finished | diverged | early_stopped | failed | killed
ERROR = "specreg.error"
THREAT_MODEL = "specreg.threat_model"
NODE = "specreg.ray_node_id"     # where a trial ran: its Ray node, the resources Ray granted it, its torch device
RESOURCES = "specreg.resources"
DEVICE = "specreg.device"
NOTE = "mlflow.note.content"     # a run's description in the MLflow UI (Markdown)
# MLflow 3's experiment type: its UI offers training runs, not the GenAI overview and traces, for this kind
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ARRAY_KEYS = ("history", "distances", "spectrum")
OFFLINE_DIR = "offline"          # in a sweep's storage folder: writes made while MLflow was unreachable
_CLIENTS: dict[str, MlflowClient] = {}


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: default `./mlruns.db`; a `.db` path or a relative SQLite URI made absolute.

    Absolute because trials run in other working directories.
    """
    if not uri:
        uri = DEFAULT_DB
    if "://" not in uri and uri.endswith(".db"):
        return f"sqlite:///{Path(uri).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def require_store(uri: str) -> None:
    """For reading commands: a SQLite store must already exist (reading must not create one), with its
    artifacts beside it (see `relocate_artifacts`)."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise BadInput(f"--mlflow: no MLflow store at {path} (run a sweep first, or pass --mlflow URI)")
    if path is not None:
        relocate_artifacts(path)


def relocate_artifacts(path: Path) -> None:
    """Point a copied or moved SQLite store at the artifacts beside it.

    MLflow records absolute artifact locations, so a copied store still read and wrote the original
    folder's artifacts. The experiments this platform created keep theirs in `mlartifacts/NAME` beside
    the store: where that recorded root is not the store's own folder, the experiments' and runs'
    locations are rewritten to it (MLflow has no API to change an experiment's artifact location), once
    that folder is there; without it, nothing is read or written and the error names both folders.
    """
    import sqlite3

    root = (path.parent / ARTIFACT_DIR).as_uri()
    with sqlite3.connect(path) as db:
        recorded = {location.rsplit("/", 1)[0] for (location,) in db.execute(
            "SELECT artifact_location FROM experiments JOIN experiment_tags USING (experiment_id) "
            "WHERE key = ?", (SWEEP,))}
        moved = recorded - {root}
        if moved and not (path.parent / ARTIFACT_DIR).is_dir():
            folders = ", ".join(sorted(m.removeprefix("file://") for m in moved))
            raise BadInput(f"--mlflow: the store {path} keeps its artifacts in {folders}, and "
                           f"there is no {ARTIFACT_DIR}/ beside it: copy the store's folder with its "
                           f"{ARTIFACT_DIR}/, or point --mlflow at the original store")
        for old in moved:
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                           f"WHERE substr({column}, 1, ?) = ?", (root, len(old) + 1, len(old) + 1, old + "/"))
    db.close()


def ui_url(server: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A page of the MLflow UI on its training-runs side: MLflow 3.17's UI picks GenAI or model training
    from a browser-wide switch (default GenAI) and from this URL parameter, not from the experiment."""
    page = "/#/experiments" + (f"/{experiment_id}" if experiment_id else "") + (f"/runs/{run_id}" if run_id else "")
    return f"{server.rstrip('/')}{page}?workflowType=machine_learning"


def check_healthy(uri: str, timeout: float) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(f"the MLflow tracking server {uri} is unreachable: {error}") from None
    raise RuntimeError(f"the MLflow tracking server {uri} is not healthy")


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer, or refuses this user."""
    if not uri.startswith(("http://", "https://")):
        return
    check_healthy(uri, timeout)
    try:
        client(uri).search_experiments(max_results=1)
    except MlflowException as error:
        if error.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            raise BadInput(f"--mlflow: the tracking server {uri} refused the request ({error.error_code}): give "
                           "its user name and password in MLFLOW_TRACKING_USERNAME and "
                           "MLFLOW_TRACKING_PASSWORD") from None
        raise


def client(uri: str) -> MlflowClient:
    if uri not in _CLIENTS:
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri)
    return _CLIENTS[uri]


def retry(call, *args, attempts: int = 5, **kwargs):
    """Call, retrying temporary faults (a locked database, a dropped connection) with backoff."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(TEMPORARILY_UNAVAILABLE) or attempt == attempts - 1:
                raise
        except (OSError, ConnectionError):
            if attempt == attempts - 1:
                raise
        time.sleep(0.5 * 2 ** attempt)


def ensure_experiment(mlflow: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, creating it (artifacts next to a SQLite store) if needed."""
    experiment = retry(mlflow.get_experiment_by_name, name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            retry(mlflow.restore_experiment, experiment.experiment_id)
        return experiment.experiment_id
    path = sqlite_path(uri)
    location = (path.parent / ARTIFACT_DIR / name).as_uri() if path else None
    return retry(mlflow.create_experiment, name, artifact_location=location, tags={SWEEP: name, **EXPERIMENT_KIND})


def git_commit() -> str:
    """The commit of the checkout that holds the library, or '' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(specreg.__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def threat_model(resolved: dict) -> dict:
    """The params that define what a robust metric means; empty without an attack."""
    attack = resolved.get("attack")
    if not attack:
        return {}
    return {"attack.name": attack["name"], "attack.norm": attack.get("norm", "l2"),
            "attack.max_queries": attack["max_queries"], "attack.samples": attack["samples"]}


def threat_model_tag(resolved: dict) -> str:
    return "/".join(str(v) for v in threat_model(resolved).values()) or "none"


# The regularizer options each kind reads, as its registry entry declares them: a run logs only these, so
# that a rep-spectral run shows no target_exponent and a `none` run no strength.
REGULARIZER_OPTIONS = {kind: specreg.regularizer_options(kind) for kind in specreg.REGULARIZERS}


def run_params(resolved: dict) -> dict:
    """The params a run logs: its config with only the regularizer options its kind uses (`stage` in a
    transfer task), and the threat model."""
    regularizer = resolved["regularizer"]
    used = REGULARIZER_OPTIONS[regularizer["kind"]] + (("stage",) if resolved["task"] == "transfer" else ())
    params = {**resolved, "regularizer": {k: v for k, v in regularizer.items() if k == "kind" or k in used}}
    return {**params, **threat_model(resolved)}


LABELS = {"regularizer.kind": "", "regularizer.strength": "λ=", "regularizer.placement": "",
          "regularizer.target_exponent": "α="}


def run_name(resolved: dict, values: dict) -> str:
    """A trial's run name: its regularizer's kind, strength and placement (where the kind uses them), then
    its other searched values, `lr=` for `train.lr`: `rep-spectral λ=0.00431 upto:1` (3 significant digits)."""
    regularizer = resolved["regularizer"]
    shown = {f"regularizer.{k}": regularizer[k] for k in ("kind", "strength", "placement")
             if k == "kind" or k in REGULARIZER_OPTIONS[regularizer["kind"]]}
    shown.update(values)  # a key already shown keeps its place
    return " ".join(LABELS.get(k, k.rsplit(".", 1)[-1] + "=") + (f"{v:.3g}" if isinstance(v, float) else str(v))
                    for k, v in shown.items())


def run_tags(resolved: dict, role: str, sweep: str, commit: str) -> dict:
    tags = {ROLE: role, SWEEP: sweep, "specreg.task": resolved["task"],
            "specreg.dataset": resolved["data"]["name"], "specreg.regularizer": resolved["regularizer"]["kind"],
            THREAT_MODEL: threat_model_tag(resolved)}
    if commit:
        tags.update({"specreg.git_commit": commit, "mlflow.source.git.commit": commit})
    return tags


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (None, arrays and lists dropped)."""
    return {k: float(v) for k, v in metrics.items()
            if k not in ARRAY_KEYS and isinstance(v, (int, float))}


def final_metrics(result: dict) -> dict[str, float]:
    """The scalars of a finished run that its last epoch did not already log."""
    last_epoch = result["history"][-1] if result.get("history") else {}
    return {k: v for k, v in scalars(result).items() if k not in last_epoch}


def aggregate(results: list[dict]) -> dict[str, float]:
    """Per metric over seeds: the mean under the metric's name, and `<metric>_ci95_low/high`."""
    shared = set.intersection(*(set(scalars(r)) for r in results))
    out = {}
    for key in sorted(shared):
        mean, low, high = mean_interval([scalars(r)[key] for r in results])
        out.update({key: mean, f"{key}_ci95_low": low, f"{key}_ci95_high": high})
    return out


class RunLog:
    """One MLflow run, written through the client with retries.

    Epoch metrics are buffered and sent in one call every FLUSH_SECONDS (one MLflow write costs ~25 ms
    on SQLite and ~130 ms over HTTP, more than a small model's epoch); `pending` is what is not sent yet,
    which a trial keeps in its checkpoint so that a retry sends it instead of losing it.
    """
    FLUSH_SECONDS = 5.0

    def __init__(self, mlflow: MlflowClient, run_id: str, offline_dir: Path | None = None):
        self.mlflow, self.run_id = mlflow, run_id
        self.pending: list[list] = []  # [step, {metric: value}] per buffered epoch
        self._flushed = time.monotonic()
        self.offline_dir = offline_dir  # where writes go while the tracking server is unreachable
        self.offline = False

    def _write(self, method: str, **kwargs) -> None:
        """One write through the client; once the tracking server is found unreachable, this and every
        later write of the run go to its offline journal (replayed by `specreg sync`)."""
        if not self.offline:
            try:
                retry(getattr(self.mlflow, method), self.run_id, **kwargs)
                return
            except (MlflowException, OSError):
                if self.offline_dir is None or reachable(self.mlflow._tracking_client.tracking_uri):
                    raise
                self.offline = True
        journal(Path(self.offline_dir), self.run_id, method, kwargs)

    @classmethod
    def open(cls, mlflow: MlflowClient, experiment_id: str, name: str, tags: dict,
             match: dict | None = None) -> "RunLog":
        """Reopen the run whose tags equal `match` (a retried or resumed trial), else create one."""
        if match:
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())
            found = retry(mlflow.search_runs, [experiment_id], query, max_results=1)
            if found:
                run = cls(mlflow, found[0].info.run_id)
                if found[0].info.status != "RUNNING":
                    retry(mlflow.update_run, run.run_id, status="RUNNING")
                run.set_tags({OUTCOME: "running"})
                return run
        created = retry(mlflow.create_run, experiment_id, run_name=name, tags={**tags, OUTCOME: "running"})
        return cls(mlflow, created.info.run_id)

    def log_params(self, params: dict) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self._write("log_batch", params=items[start:start + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Send metrics now (after any buffered epochs)."""
        self.pending.append([step or 0, scalars(metrics)])
        self.flush()

    def log_epoch(self, metrics: dict, step: int) -> None:
        """Buffer one epoch's metrics; send the buffer when FLUSH_SECONDS have passed."""
        self.pending.append([step, scalars(metrics)])
        if time.monotonic() - self._flushed >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for step, metrics in self.pending for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self._write("log_batch", metrics=items[start:start + 1000])
        self.pending, self._flushed = [], time.monotonic()

    def set_tags(self, tags: dict) -> None:
        self._write("log_batch", tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_files(self, files: dict[str, bytes]) -> None:
        """Upload named byte strings as artifacts in one call."""
        with tempfile.TemporaryDirectory() as staging:
            for name, data in files.items():
                (Path(staging) / name).write_bytes(data)
            self._write("log_artifacts", local_dir=staging)

    def end(self, status: str, outcome: str, error: str | None = None) -> None:
        self.flush()
        self.set_tags({OUTCOME: outcome, **({ERROR: error} if error else {})})
        self._write("set_terminated", status=status)


# --- offline journal: writes kept while the tracking server is unreachable ---------------------------

def reachable(uri: str) -> bool:
    try:
        check_healthy(uri, timeout=5.0)
    except RuntimeError:
        return False
    return True


def journal(folder: Path, run_id: str, method: str, kwargs: dict) -> None:
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


def close_trial_runs(mlflow: MlflowClient, experiment_id: str, trial_id: str, status: str, outcome: str,
                     error: str | None = None) -> None:
    """End a trial's runs (config and seeds) that are still RUNNING: the trial could not (stopped, lost)."""
    query = f"tags.`{TRIAL_ID}` = '{trial_id}' and attributes.status = 'RUNNING'"
    for run in retry(mlflow.search_runs, [experiment_id], query):
        RunLog(mlflow, run.info.run_id).end(status, outcome, error)


def config_yaml(config: dict) -> bytes:
    return yaml.safe_dump(config, sort_keys=False).encode()


def result_files(resolved: dict, result: dict, checkpoint_dir) -> dict[str, bytes]:
    """The artifacts of a finished run: its config, final model weights, attack distances, spectrum."""
    files = {"config.yaml": config_yaml(resolved)}
    if (Path(checkpoint_dir) / "state.pt").is_file():
        buffer = io.BytesIO()
        torch.save(specreg.load_checkpoint(checkpoint_dir)["model"], buffer)
        files["model.pt"] = buffer.getvalue()
    if result.get("distances") is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(result["distances"]))
        files["distances.npy"] = buffer.getvalue()
    if result.get("spectrum") is not None:
        files["spectrum.json"] = json.dumps(list(result["spectrum"])).encode()
    from .figures import trial_figures  # matplotlib, loaded only where a run finishes

    files.update(trial_figures(result, (resolved.get("attack") or {}).get("eps", [])))
    return files
