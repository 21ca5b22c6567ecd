"""The Ray Tune function trainable: one trial is one config, trained over every seed of the sweep.

The trial tracks itself in MLflow from the worker it runs on, reports every epoch to Tune, and attaches a
checkpoint (the training state plus which seeds are done) to an epoch's report when CHECKPOINT_SECONDS
have passed since the last one and to the last epoch of every seed: every epoch for real models, a few per
trial for toy ones whose epochs take less than persisting a checkpoint. A retried trial resumes from its
last checkpoint. Objectives only known at the end are reported as NaN until the final report.
"""
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from . import burnin
from ..track import connection, journal, run_files, tracking
from ..space.space import SweepSpec, set_dotted, total_epochs

CONTEXT = "_specreg"        # the param_space key holding the sweep's constants
STATE = "platform.json"     # in every checkpoint: the seeds already done, epoch metrics not yet in MLflow
TRAIN_DIR = "train"         # in every checkpoint: run_experiment's state
FINAL = "specreg_final"     # in a trial's last report only
OUTCOME = "specreg_outcome"
ERROR = "specreg_error"     # in the last report of a trial whose config is invalid: why
CHECKPOINT_SECONDS = 10.0


def searched(config: dict) -> dict:
    """A trial config's searched values (everything but the sweep's constants)."""
    return {k: v for k, v in config.items() if k != CONTEXT}


def objective_values(spec: SweepSpec, metrics: dict) -> dict:
    """Every objective for a Tune report: its value (an epoch's test accuracy standing for `clean_acc`),
    or NaN where it is not known yet."""
    out = {}
    for metric in spec.metrics:
        if metric in metrics:
            out[metric] = metrics[metric]
        elif metric == "clean_acc" and "test_acc" in metrics:
            out[metric] = metrics["test_acc"]
        else:
            out[metric] = math.nan
    return out


def worst_values(spec: SweepSpec) -> dict:
    """What a diverged trial tells the searcher: the worst value of every objective."""
    return {o.metric: -math.inf if o.mode == "max" else math.inf for o in spec.objectives}


def run_trial(config: dict) -> None:
    """Tune entry point."""
    import specreg

    context = config[CONTEXT]
    spec = SweepSpec.model_validate(context["spec"])
    values = {key: spec.search[key].decode(raw) for key, raw in searched(config).items()}
    try:
        resolved = specreg.validate_config(spec.trial_config(searched(config)))
    except specreg.ConfigError as error:  # searched values that are valid one by one but not together
        tune.report({**worst_values(spec), FINAL: 1, OUTCOME: "invalid", ERROR: str(error)})
        return
    torch.set_num_threads(max(1, int(context["cpus"])))
    if not report_if_finished(context, spec):
        Trial(context, spec, resolved, values).run()


def report_if_finished(context: dict, spec: SweepSpec) -> bool:
    """A trial that finished in MLflow after Ray last saved the sweep's state (the driver was killed in
    between) is restarted by --resume: report its tracked result instead of training it again."""
    mlflow = connection.client(context["mlflow_uri"])
    query = (f"tags.`{connection.PARENT}` = '{context['parent_run_id']}' and "
             f"tags.`{connection.TRIAL_ID}` = '{tune.get_context().get_trial_id()}' and attributes.status = 'FINISHED'")
    found = connection.retry(mlflow.search_runs, [context["experiment_id"]], query, max_results=1)
    if not found:
        return False
    metrics = found[0].data.metrics
    tune.report({**metrics, **objective_values(spec, metrics), FINAL: 1, OUTCOME: "finished",
                 "mlflow_run_id": found[0].info.run_id})
    return True


class Trial:
    """One trial inside a Tune worker: its MLflow runs, its seeds, its checkpoints."""

    def __init__(self, context: dict, spec: SweepSpec, resolved: dict, values: dict):
        self.context, self.spec, self.resolved = context, spec, resolved
        self.seeds = spec.seed_list(resolved)
        self.multi = len(self.seeds) > 1
        self.work = Path(tempfile.mkdtemp(prefix="specreg-trial-"))
        self.state = {"results": []}
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                shutil.copytree(directory, self.work, dirs_exist_ok=True)
            self.state = json.loads((self.work / STATE).read_text())
        self.mlflow = connection.client(context["mlflow_uri"])
        self.trial_id = tune.get_context().get_trial_id()
        self.name = tracking.run_name(resolved, values)
        self.config_run = self._open(self.name, context["parent_run_id"], "trial", resolved,
                                     {connection.TRIAL_ID: self.trial_id})
        runtime = ray.get_runtime_context()
        self.config_run.set_tags({connection.SEARCHED: json.dumps(values), connection.NODE: runtime.get_node_id(),
                                  connection.RESOURCES: json.dumps(runtime.get_assigned_resources())})
        params = dict(resolved)
        if self.multi:
            params = set_dotted(params, "train", {k: v for k, v in resolved["train"].items() if k != "seed"})
            params["seeds"] = self.seeds
        self.config_run.log_params(tracking.run_params(params))
        for run_id, pending in self.state.pop("pending", {}).items():  # buffered when the trial stopped
            unsent = tracking.RunLog(self.mlflow, run_id)
            unsent.pending = journal.not_yet_sent(self.mlflow, run_id, pending)  # a failed attempt flushed
            unsent.flush()
        self.current = self.config_run  # the run being trained: a seed's run with several seeds
        self.checkpointed = time.monotonic()

    def _open(self, name: str, parent: str, role: str, resolved: dict, match: dict) -> tracking.RunLog:
        tags = {**tracking.run_tags(resolved, role, self.context["sweep"], self.context["commit"]),
                connection.PARENT: parent, **match}
        run = tracking.RunLog.open(self.mlflow, self.context["experiment_id"], name, tags,
                                   match={connection.PARENT: parent, **match})
        if self.context.get("offline_dir"):  # in the sweep's storage: where writes wait out a tracking outage
            run.offline_dir = Path(self.context["offline_dir"])
        return run

    def run(self) -> None:
        import specreg

        try:  # the device ("auto": CUDA where this worker sees a GPU) is tracked where a failure is recorded
            self.config_run.set_tags({connection.DEVICE: str(specreg.resolve_device(self.resolved["train"]["device"]))})
            for index in range(len(self.state["results"]), len(self.seeds)):
                seed = self.seeds[index]
                seed_config = set_dotted(self.resolved, "train.seed", seed)
                if self.multi:
                    self.current = self._open(
                        f"{self.name} seed {seed}", self.config_run.run_id, "seed", seed_config,
                        {connection.TRIAL_ID: self.trial_id, connection.SEED: seed})
                    self.current.log_params(tracking.run_params(seed_config))
                result = self._train(seed_config, self.current)
                for step, metrics in tracking.final_metrics(result):
                    self.current.log_metrics(metrics, step=step)
                self.current.log_files(run_files.result_files(seed_config, result, self.work / TRAIN_DIR))
                self.state["results"].append(tracking.scalars(result))
                if self.multi:
                    self.current.end("FINISHED", "finished")
                    self.current = self.config_run
                    shutil.rmtree(self.work / TRAIN_DIR, ignore_errors=True)
                    self._report({**tracking.scalars(result), "seed": seed}, checkpoint=True)
            final = self.state["results"][0]
            if self.multi:
                final = tracking.aggregate(self.state["results"])
                self.config_run.log_metrics(final, step=int(final["epoch"]))
                self.config_run.log_files({"config.yaml": run_files.config_yaml(
                    set_dotted(self.resolved, "train.seed", self.seeds[0]))})
            self.config_run.end("FINISHED", "finished")
            self._report({**final, FINAL: 1, OUTCOME: "finished"}, checkpoint=False)
        except specreg.Diverged as error:
            self._end("FAILED", "diverged", f"diverged at epoch {error.epoch}")
            tune.report({**worst_values(self.spec), FINAL: 1, OUTCOME: "diverged",
                         "mlflow_run_id": self.config_run.run_id})
        except ValueError as error:  # a bad value fails the same way again: the trial ends, not retried
            message = f"{type(error).__name__}: {error}"
            self._end("FAILED", "invalid", message)
            tune.report({**worst_values(self.spec), FINAL: 1, OUTCOME: "invalid", ERROR: message,
                         "mlflow_run_id": self.config_run.run_id})
        except Exception as error:  # Tune retries the trial from its checkpoint, reopening these runs
            self._end("FAILED", "failed", f"{type(error).__name__}: {error}")
            raise
        except BaseException:  # Tune stopped the trial: send what is buffered; the driver ends the runs
            self.current.flush()
            raise
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _end(self, status: str, outcome: str, error: str) -> None:
        """End the seed run being trained (if any) and the trial's run."""
        if self.current is not self.config_run:
            self.current.end(status, outcome, error)
        self.config_run.end(status, outcome, error)

    def _train(self, config: dict, log: tracking.RunLog) -> dict:
        import specreg

        train_dir = self.work / TRAIN_DIR
        resume = train_dir if (train_dir / "state.pt").is_file() else None
        prefix = specreg.penalty_start(config)
        if (resume is None and self.spec.run.shared_burnin and self.context["cache_dir"]
                and 0 < prefix < total_epochs(config)):
            resume, trained = burnin.ensure(self.context["cache_dir"], config)
            log.set_tags({"specreg.burnin": "trained" if trained else "cached", "specreg.burnin_key": resume.name})
            for metrics in burnin.history(resume):
                log.log_epoch(metrics, step=metrics["epoch"])
            log.flush()
        seed = config["train"]["seed"]

        def on_epoch(metrics: dict) -> None:
            log.log_epoch(metrics, step=metrics["epoch"])
            due = time.monotonic() - self.checkpointed >= CHECKPOINT_SECONDS
            self._report({**tracking.scalars(metrics), "seed": seed},
                         checkpoint=due or metrics["epoch"] == total_epochs(config))

        # The attack's progress lives in the sweep's storage (this worker's folder is temporary), where a retry
        # of the trial, resumed from its last checkpoint, continues it (sweeps started before it: none).
        attack_state = None
        if self.context.get("attack_dir"):
            attack_state = Path(self.context["attack_dir"]) / f"{self.trial_id}-seed{seed}.pt"
        return specreg.run_resolved(config, on_epoch=on_epoch, checkpoint_dir=train_dir, resume_from=resume,
                                    attack_state=attack_state)

    def _report(self, metrics: dict, checkpoint: bool) -> None:
        """Report to Tune, with the checkpoint to resume from if asked."""
        report = {**metrics, **objective_values(self.spec, metrics),
                  "mlflow_run_id": self.config_run.run_id}
        if not checkpoint:
            tune.report(report)
            return
        pending = {self.current.run_id: self.current.pending} if self.current.pending else {}
        (self.work / STATE).write_text(json.dumps({**self.state, "pending": pending}))
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(self.work))
        self.checkpointed = time.monotonic()
