"""The MLflow connection: the tracking URI (a SQLite store or a server), its health and credentials, one
client per URI, retries of temporary faults, the sweep's experiment, and the tag names runs carry.

Importing this module configures MLflow (telemetry off) before MLflow is first imported: import it, or a
module that imports it, before anything that imports MLflow.
"""
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

# Before MLflow is first imported: its telemetry client starts at import, cannot reach the network from
# a cluster without egress, and sets/unsets an environment variable from a background thread, which
# raced `requests` reading os.environ (KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in a trial).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402,F401  (for journal and tracking)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE, ErrorCode  # noqa: E402


from ..base.errors import BadInput

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
