"""The `specreg` command. Exit codes: 0 done, 2 bad input (nothing created), 1 failure."""
import csv
import functools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from .base.errors import BadInput

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Spectral-regularization sweeps: Ray Tune trials, Optuna search, MLflow tracking.")
err = Console(stderr=True)

MLFLOW_HELP = ("MLflow tracking URI, or a .db file. Default: the SQLite store ./mlruns.db with artifacts in "
               "./mlartifacts.")
STORAGE_HELP = "Folder for Ray results, trial checkpoints and the shared burn-in cache."


def _mlflow_option():
    return typer.Option(None, "--mlflow", help=MLFLOW_HELP, envvar="SPECREG_MLFLOW")


def _storage_option():
    return typer.Option(Path("specreg-runs"), "--storage", help=STORAGE_HELP, envvar="SPECREG_STORAGE")


def _rich_echo(text: str) -> None:
    Console().print(text, highlight=False, soft_wrap=True)


def _check_mode(mode: Optional[str]) -> None:
    if mode not in (None, "max", "min"):
        raise BadInput(f"--mode: must be max or min, got {mode!r}")


def exits(command):
    """Turn bad input (specreg.ConfigError, BadInput's base) into exit code 2 and any other error into exit
    code 1, each with a message."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import specreg

        try:
            return command(*args, **kwargs)
        except specreg.ConfigError as error:
            err.print(f"[bold red]error:[/] {error}", highlight=False)
            raise typer.Exit(2) from None
        except (typer.Exit, KeyboardInterrupt):
            raise
        except Exception as error:
            traceback.print_exc()
            err.print(f"[bold red]failed:[/] {type(error).__name__}: {error}", highlight=False)
            raise typer.Exit(1) from None
    return wrapper


@app.command()
@exits
def sweep(
    space: Path = typer.Argument(..., help="The search-space YAML file."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Number of trials (default: the file's)."),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default: the file's `name`)."),
    mlflow: Optional[str] = _mlflow_option(),
    storage: Path = _storage_option(),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent",
                                                 help="Most trials at once (default: as many as fit)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep of that name."),
    smoke: bool = typer.Option(False, "--smoke", help="2 trials, 1 epoch, tiny attack: check the file runs."),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="Ray cluster to join (auto, or ray://host:port); default: "
                                               "a local Ray instance."),
    gpus_per_trial: Optional[float] = typer.Option(None, "--gpus-per-trial",
                                                   help="GPUs per trial, overriding resources.gpu "
                                                        "(fractions pack trials on one GPU)."),
):
    """Run a sweep: one Ray Tune trial per config, searched by Optuna, tracked in MLflow."""
    from .run.sweep import run_sweep

    code = run_sweep(space, samples=samples, name=name, mlflow_uri=mlflow, storage=storage,
                     max_concurrent=max_concurrent, resume=resume, smoke=smoke, address=address,
                     gpus_per_trial=gpus_per_trial, echo=_rich_echo)
    raise typer.Exit(code)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _client(mlflow: Optional[str]):
    from .track import connection

    uri = connection.resolve_uri(mlflow)
    connection.require_store(uri)
    connection.check_reachable(uri)
    return connection.client(uri)


@app.command()
@exits
def runs(
    name: Optional[str] = typer.Argument(None, help="Sweep name (default: every sweep in the store)."),
    sort: Optional[str] = typer.Option(None, "--sort", help="Metric to rank by (in its objective's direction)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Show at most N trials."),
    format: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    mlflow: Optional[str] = _mlflow_option(),
):
    """List the trials of a sweep from MLflow: searched params, objectives and each trial's difference from
    the baseline (the kind none trial; ≈ within noise) as columns."""
    from .results.results import runs_table

    columns, rows = runs_table(_client(mlflow), name, sort, limit, compact=format is Format.table)
    if format is Format.json:
        typer.echo(json.dumps([dict(zip(columns, row)) for row in rows], indent=1))
    elif format is Format.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    else:
        cells = [["" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
        table = Table(*columns)
        for row in cells:
            table.add_row(*row)
        widths = [max(len(str(c)) for c in column) for column in zip(columns, *cells)]
        console = Console()
        if not console.is_terminal:  # a file or a pipe gets every column whole
            console = Console(width=sum(widths) + 3 * len(widths) + 1)
        console.print(table)


@app.command()
@exits
def export(
    name: str = typer.Argument(..., help="Sweep name."),
    out: Path = typer.Option(..., "--out", help="Folder to write best.yaml, pareto.yaml, trials.parquet, "
                                                 "summary.md into."),
    objective: Optional[str] = typer.Option(None, "--objective",
                                            help="Rank by this metric alone (default: the sweep's objectives)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="max or min for --objective (default: the "
                                                            "sweep's direction for it, else max)."),
    mlflow: Optional[str] = _mlflow_option(),
):
    """Export a sweep's best config (trainable with `specreg train`), Pareto front, trials and summary."""
    from .results.results import export as export_sweep

    _check_mode(mode)
    paths = export_sweep(_client(mlflow), name, out, objective, mode)
    for path in paths.values():
        typer.echo(str(path))


def _load_config(path: Path, assignments: list[str]) -> dict:
    from .space.space import read_yaml, set_dotted

    config = read_yaml(path)
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise BadInput(f"--set: expected key=value, got {assignment!r}")
        config = set_dotted(config, key.strip(), yaml.safe_load(value))
    for key in ("root", "path"):  # exported configs hold data paths relative to their own folder
        value = config.get("data", {}).get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (path.parent / value).exists():
            config = set_dotted(config, f"data.{key}", str((path.parent / value).resolve()))
    return config


@app.command()
@exits
def train(
    config: Path = typer.Argument(..., help="An experiment config YAML (e.g. an exported best.yaml)."),
    assignments: list[str] = typer.Option([], "--set", help="Override a value: --set train.lr=0.05 (repeatable)."),
    name: Optional[str] = typer.Option(None, "--name", help="MLflow experiment (default: the file's stem)."),
    mlflow: Optional[str] = _mlflow_option(),
    storage: Path = _storage_option(),
):
    """Train one config outside Ray, tracked in MLflow like a sweep's trial, with a progress bar."""
    from .run.single import train_one

    raise typer.Exit(train_one(_load_config(config, assignments), name or config.stem, mlflow, storage))


@app.command()
@exits
def sync(
    name: str = typer.Argument(..., help="Sweep name."),
    storage: Path = _storage_option(),
):
    """Send what a sweep's trials kept locally while the MLflow server was unreachable, then close the sweep."""
    from .run.sweep import sync as sync_sweep

    raise typer.Exit(sync_sweep(name, storage, echo=typer.echo))


@app.command()
@exits
def ui(
    port: int = typer.Option(5000, "--port", help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (keep 127.0.0.1 unless on a "
                                                         "private network)."),
    mlflow: Optional[str] = _mlflow_option(),
):
    """Start the MLflow UI for the store (Ctrl-C to stop)."""
    from .track import connection

    uri = connection.resolve_uri(mlflow)
    connection.require_store(uri)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port)]
    server_url = f"http://{host}:{port}"
    typer.echo(f"MLflow UI on {connection.ui_url(server_url)} (Ctrl-C to stop); the sweeps' runs:")
    for experiment in connection.client(uri).search_experiments(filter_string=f"tags.`{connection.SWEEP}` != ''"):
        typer.echo(f"  {experiment.name}: {connection.ui_url(server_url, experiment.experiment_id)}")
    # The server's own process group holds its uvicorn workers, job runner and huey consumers: stopping
    # `ui` (Ctrl-C, or SIGTERM, which is made to act the same) stops all of them and frees the port.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = subprocess.Popen(command, start_new_session=True)
    try:
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        _stop_group(server)
    raise typer.Exit(code)


def _stop_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the process group that `process` leads, then SIGKILL to what is left of it after
    `grace` seconds (MLflow's huey consumers outlive a SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        try:
            os.killpg(process.pid, sig)
            while time.monotonic() < deadline:
                process.poll()  # reap the leader, which would otherwise stay in the group as a zombie
                os.killpg(process.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:  # the group is empty
            return


class ReportFormat(str, Enum):
    html = "html"
    md = "md"


@app.command()
@exits
def report(
    name: str = typer.Argument(..., help="Sweep name."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the report (default: ./report-NAME)."),
    format: ReportFormat = typer.Option(ReportFormat.html, "--format",
                                        help="html (one file, figures embedded) or md (figures/ beside it)."),
    eps: Optional[float] = typer.Option(None, "--eps", help="The radius of the clean-versus-robust view "
                                                            "(default: the first robust objective's)."),
    mlflow: Optional[str] = _mlflow_option(),
):
    """Write a sweep's report (figures and tables) and log its figures to the sweep's MLflow run."""
    from .present.report import write_report

    written = write_report(_client(mlflow), name, out or Path(f"report-{name}"), format.value, eps)
    typer.echo(f"{written['report']} ({len(written['figures'])} figures; also logged to the sweep's MLflow run)")


@app.command()
@exits
def confirm(
    name: str = typer.Argument(..., help="Sweep name."),
    top: int = typer.Option(1, "--top", help="Configs to re-run (per --per group; with several objectives, "
                                             "at most this many of the Pareto set)."),
    seeds: int = typer.Option(3, "--seeds", help="Fresh seeds per config."),
    per: Optional[str] = typer.Option(None, "--per", help="Choose the top configs within each value of this "
                                                          "param (e.g. regularizer.kind)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="Rank by this metric alone."),
    mode: Optional[str] = typer.Option(None, "--mode", help="max or min for --objective."),
    mlflow: Optional[str] = _mlflow_option(),
    storage: Path = _storage_option(),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Trials at once."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: local)."),
):
    """Re-run a sweep's best configs with fresh seeds as a child sweep; export then prefers their means."""
    from .results.confirm import run_confirm

    _check_mode(mode)
    raise typer.Exit(run_confirm(name, top=top, seeds=seeds, per=per, objective=objective, mode=mode,
                                 mlflow_uri=mlflow, storage=storage, max_concurrent=max_concurrent, address=address,
                                 echo=_rich_echo))


def main() -> None:
    app()
