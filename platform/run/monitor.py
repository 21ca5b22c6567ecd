"""The driver's view of a running sweep: a live table of the trials, and closing the MLflow runs of
trials that Tune ended without the trial itself getting to (an early stop, a lost worker)."""
import math

from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..track import connection, tracking
from .trainable import FINAL, OUTCOME


class SweepMonitor(tune.Callback):
    def __init__(self, mlflow_uri: str, experiment_id: str, metrics: list[str], search_keys: list[str]):
        self.mlflow_uri, self.experiment_id = mlflow_uri, experiment_id
        self.metrics, self.search_keys = metrics, search_keys
        self.trials: list = []
        self._live = None

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; the display stays behind
        return {**self.__dict__, "trials": [], "_live": None}

    def setup(self, **info):
        console = Console()
        if console.is_terminal:
            self._live = Live(self._table(), console=console, auto_refresh=False)
            self._live.start()

    def _table(self) -> Table:
        table = Table(title="trials", show_lines=False)
        for column in ["trial", "status", *self.search_keys, "epoch", *self.metrics]:
            table.add_column(column)
        for trial in self.trials:
            result = trial.last_result or {}
            cells = [trial.trial_id, trial.status]
            cells += [_show(trial.config.get(k, "—")) for k in self.search_keys]
            cells.append(_show(result.get("epoch", "")))
            cells += [_show(result.get(m, "")) for m in self.metrics]
            table.add_row(*cells)
        return table

    def _refresh(self, trials) -> None:
        self.trials = trials
        if self._live is not None:
            self._live.update(self._table(), refresh=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._refresh(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._refresh(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not (trial.last_result or {}).get(FINAL):
            tracking.close_trial_runs(connection.client(self.mlflow_uri), self.experiment_id, trial.trial_id,
                                      "KILLED", "early_stopped")
        self._refresh(trials)
        self._line(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_error()
        tracking.close_trial_runs(connection.client(self.mlflow_uri), self.experiment_id, trial.trial_id,
                                  "FAILED", "failed", str(error).strip()[-2000:] if error else None)
        self._refresh(trials)
        if self._live is None:
            print(f"trial {trial.trial_id} failed: {str(error).strip().splitlines()[-1] if error else ''}",
                  flush=True)

    def on_experiment_end(self, trials, **info):
        self._refresh(trials)
        if self._live is not None:
            self._live.stop()

    def _line(self, trial) -> None:
        """Without a terminal, one line per ended trial instead of the live table."""
        if self._live is None:
            result = trial.last_result or {}
            values = ", ".join(f"{m}={_show(result.get(m, ''))}" for m in self.metrics)
            print(f"trial {trial.trial_id} {result.get(OUTCOME, 'stopped')}: {values}", flush=True)


def _show(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)
