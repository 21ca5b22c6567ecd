"""MLflow run records through `MlflowClient`, written by the process that runs the trial.

One experiment per sweep; a parent run for the sweep, a nested run per trial (`mlflow.parentRunId`), and
for several seeds a nested run per seed under the trial's config run. Every write is retried on a
temporary fault. A run ends FINISHED, FAILED or KILLED, never left RUNNING by a normal exit.

This module holds what a run records (`RunLog`, its params, name, tags and seed aggregates); the
connection (URI, client, retries, tag names) is `connection`, the offline journal `journal`, a finished
run's artifacts `run_files`.
"""
import subprocess
import tempfile
import time
from pathlib import Path

import specreg

from .connection import (ERROR, OUTCOME, ROLE, SWEEP, THREAT_MODEL, TRIAL_ID, Metric, MlflowClient,
                         MlflowException, Param, RunTag, retry)
from .journal import append, reachable
from ..space.space import flatten
from ..base.stats import mean_interval

ARRAY_KEYS = ("history", "distances", "spectrum", "attack_trace")


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


def final_metrics(result: dict) -> list[tuple[int, dict[str, float]]]:
    """What a finished run logs after its epochs, as (step, metrics): at its last epoch, the scalars that
    epoch did not log; the metrics the attack traced, as a history with one step per attack iteration (the
    last step is the full attack, so MLflow shows its value as the metric's)."""
    last_epoch = result["history"][-1] if result.get("history") else {}
    trace = result.get("attack_trace") or {}
    traced = set().union(*trace.values())
    final = {k: v for k, v in scalars(result).items() if k not in last_epoch and k not in traced}
    return [(result["epoch"], final)] + [(int(t), scalars(values)) for t, values in sorted(trace.items())]


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
        append(Path(self.offline_dir), self.run_id, method, kwargs)

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


def close_trial_runs(mlflow: MlflowClient, experiment_id: str, trial_id: str, status: str, outcome: str,
                     error: str | None = None) -> None:
    """End a trial's runs (config and seeds) that are still RUNNING: the trial could not (stopped, lost)."""
    query = f"tags.`{TRIAL_ID}` = '{trial_id}' and attributes.status = 'RUNNING'"
    for run in retry(mlflow.search_runs, [experiment_id], query):
        RunLog(mlflow, run.info.run_id).end(status, outcome, error)
