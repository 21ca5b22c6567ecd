"""`specreg train`: one run outside Ray, tracked in MLflow the same way as a sweep's trial."""
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..track import connection, run_files, sweep_records, tracking
from ..space.space import check_name, total_epochs, validated


SHOWN = {"train_loss": "loss", "test_acc": "test acc", "knn_acc": "kNN acc"}


def status(metrics: dict) -> str:
    """An epoch's loss and test accuracy for the progress bar, under its phase's prefix (`pretrain/`, …)."""
    shown = []
    for key, value in metrics.items():
        prefix, _, name = key.rpartition("/")
        if name in SHOWN:
            shown.append(f"{prefix + '/' if prefix else ''}{SHOWN[name]} {value:.4f}")
    return "  ".join(shown)


def train_one(config: dict, name: str, mlflow_uri: str | None, storage: Path) -> int:
    """Validate (as a sweep validates its base), train and track one config; return the exit code
    (BadInput on bad input)."""
    import specreg

    resolved = validated(config, "config")
    check_name(name)
    uri = connection.resolve_uri(mlflow_uri)
    connection.check_reachable(uri)
    mlflow = connection.client(uri)
    commit = tracking.git_commit()
    experiment_id = connection.ensure_experiment(mlflow, name, uri)
    run = tracking.RunLog.open(mlflow, experiment_id, name, tracking.run_tags(resolved, "train", name, commit))
    run.log_params(tracking.run_params(resolved))
    checkpoint_dir = Path(storage).resolve() / "train" / f"{name}-{run.run_id[:12]}"
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}")]
    try:
        with Progress(*columns) as progress:
            task = progress.add_task("epochs", total=total_epochs(resolved), status="")

            def on_epoch(metrics: dict) -> None:
                run.log_epoch(metrics, step=metrics["epoch"])
                last = metrics["epoch"] == total_epochs(resolved) and resolved["attack"]
                progress.update(task, completed=metrics["epoch"], status="attacking…" if last else status(metrics))

            result = specreg.run_resolved(resolved, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir)
    except specreg.Diverged as error:
        run.end("FAILED", "diverged", str(error))
        print(f"diverged: {error} (MLflow run {run.run_id})")
        return 1
    except Exception as error:
        run.end("FAILED", "failed", f"{type(error).__name__}: {error}")
        raise
    except BaseException:
        run.end("KILLED", "killed")
        raise
    for step, metrics in tracking.final_metrics(result):
        run.log_metrics(metrics, step=step)
    run.log_files(run_files.result_files(resolved, result, checkpoint_dir))
    run.end("FINISHED", "finished")
    shown = {k: v for k, v in tracking.scalars(result).items() if k in ("clean_acc", "med_dist", "adv_auc")
             or sweep_records.is_robust_accuracy(k)}
    print("done: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()) + f" (MLflow run {run.run_id}, {uri})")
    return 0
