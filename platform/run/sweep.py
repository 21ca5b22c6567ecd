"""`specreg sweep`: validate the space, connect to Ray, track the sweep in MLflow, run it, summarise it.

Everything the user can get wrong is checked before the first thing is created (the MLflow experiment,
the sweep's storage folder): `BadInput` then means exit code 2 with nothing written.
"""
import importlib.util
import json
import logging
import math
import os
import urllib.parse
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ..track import connection, journal, sweep_records, tracking
from ..base.errors import BadInput
from .monitor import SweepMonitor
from ..space.space import SweepSpec, check_name, load_space, total_epochs
from .trainable import CONTEXT, ERROR, FINAL, OUTCOME, run_trial

CONTEXT_FILE = "specreg-sweep.json"   # in the sweep's storage folder: what --resume needs
CACHE_DIR = "burnin-cache"
ATTACK_DIR = "attack-state"  # in a sweep's folder: each running attack's progress, so a retried trial continues it
REPEAT = "specreg_repeat"   # Optuna user attribute of an asked config that an earlier trial already had
MAX_ASKS = 1000             # asks for a new config before the searcher stops (the space is used up)


def through_client(address: str | None) -> bool:
    """Whether `address` joins a cluster through Ray Client (ray://), from a machine outside it."""
    return bool(address) and address.startswith("ray://")


def connect(address: str | None) -> None:
    """Join the cluster at address, or start a new local Ray instance (reused if this process has one).

    address=None means "local": Ray's own default would silently join the last cluster started on this
    machine, whoever started it. A cluster that cannot be joined is bad input (nothing is created yet).
    """
    if ray.is_initialized():
        return
    client = through_client(address)
    if client and importlib.util.find_spec("grpc") is None:
        raise BadInput(f"--address {address}: Ray Client needs Ray's client extra (grpcio): "
                       "pip install 'ray[client]'")
    if not address:  # a new local instance gets a token, as Ray does by default, without Ray's warning
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
                 logging_config=ray.LoggingConfig(log_level="WARNING"))
    except ConnectionError as error:
        hint = ""
        if client and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray sends its token only to a cluster it found itself (auto), never to an explicit address.
            hint = (" If the cluster uses token authentication (the default of clusters Ray 2.60 starts), "
                    "set RAY_AUTH_MODE=token and give its token in RAY_AUTH_TOKEN or ~/.ray/auth_token.")
        raise BadInput(f"--address {address}: cannot join the Ray cluster: {error}.{hint}") from None


def check_client_tracking(address: str | None, uri: str) -> None:
    """Through Ray Client to another machine, trials run and log on the cluster's nodes, which cannot see a
    SQLite store on this one (they would each write a store of their own at that path)."""
    if not through_client(address) or connection.sqlite_path(uri) is None:
        return
    if urllib.parse.urlsplit(address).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise BadInput(f"--mlflow: the trials of a sweep joined through {address} log from the cluster, which "
                       f"cannot see the SQLite store {connection.sqlite_path(uri)} on this machine; pass the "
                       "cluster's tracking server (e.g. --mlflow http://HEAD:5000)")


def check_resources(spec: SweepSpec) -> int:
    """Refuse a trial that no node can hold (it would stay PENDING forever); return how many fit at once."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    gpus = [n.get("GPU", 0.0) for n in nodes]
    if gpu > 0 and sum(gpus) == 0:
        raise BadInput(f"resources.gpu: {gpu} GPU per trial requested, but the cluster has no GPU "
                       "(set gpu: 0 or pass --gpus-per-trial 0)")
    if gpu > max(gpus):
        raise BadInput(f"resources.gpu: {gpu} GPUs per trial, but no node has more than {max(gpus):g}")
    most_cpus = max(n.get("CPU", 0.0) for n in nodes)
    if cpu > most_cpus:
        raise BadInput(f"resources.cpu: {cpu} CPUs per trial, but no node has more than {most_cpus:g}")
    fit = sum(math.floor(n.get("CPU", 0.0) / cpu + 1e-9) for n in nodes)
    if gpu > 0:
        fit = min(fit, sum(math.floor(g / gpu + 1e-9) for g in gpus))
    return max(1, fit)


def check_data(base: dict) -> None:
    """Refuse a dataset that is neither on disk nor downloadable (every trial would fail)."""
    import specreg

    try:
        specreg.check_available(base["data"])
    except specreg.DatasetNotFound as error:
        raise BadInput(f"base.data: {error}") from None


def make_sampler(spec: SweepSpec):
    seed = spec.sampler.seed
    if spec.sampler.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.sampler.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # random; grid points are enqueued, never sampled


class SweepSearch(OptunaSearch):
    """OptunaSearch that never suggests a config twice, tells Optuna an early-stopped trial was pruned (not
    complete with a truncated value), and records a trial that errored, was marked FAIL, and then finished
    after --resume."""

    def suggest(self, trial_id):
        """A config no earlier trial had. A repeat is told to Optuna as a failed trial marked REPEAT, and a
        random draw replaces it: the sampler's model has not changed, so it would propose the same again."""
        sampler = self._ot_study.sampler
        try:
            for _ in range(MAX_ASKS):
                config = super().suggest(trial_id)
                asked = self._ot_trials[trial_id]
                if not any(t.params == asked.params for t in self._ot_study.get_trials(deepcopy=False)
                           if t.number != asked.number and not t.user_attrs.get(REPEAT)):
                    return config
                asked.set_user_attr(REPEAT, True)
                self._ot_study.tell(asked, state=optuna.trial.TrialState.FAIL)
                del self._ot_trials[trial_id]
                self._ot_study.sampler = optuna.samplers.RandomSampler(seed=asked.number)
            return Searcher.FINISHED  # the space holds no config that has not run
        finally:
            self._ot_study.sampler = sampler

    def on_trial_complete(self, trial_id, result=None, error=False):
        final = bool(result) and bool(result.get(FINAL)) and not error
        if trial_id not in self._completed_trials:
            super().on_trial_complete(trial_id, result if final else None, error)
        elif final:
            asked = self._ot_trials[trial_id]
            values = [result[m] for m in (self.metric if isinstance(self.metric, list) else [self.metric])]
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=asked.params, distributions=asked.distributions, values=values))


def first_points(spec: SweepSpec) -> list[dict]:
    """The configs enqueued before the sampler's own: every grid point, or the baseline (kind `none`)
    where it is a choice, so that every trial can be compared with it."""
    if spec.sampler.name == "grid":
        return spec.grid_points()[:spec.num_samples()]
    kind = spec.search.get("regularizer.kind")
    return [{"regularizer.kind": "none"}] if kind and kind.finite and "none" in kind.values else []


def make_searcher(spec: SweepSpec) -> SweepSearch:
    single = len(spec.objectives) == 1
    points = first_points(spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return SweepSearch(space=spec.define_by_run, metric=spec.metrics[0] if single else spec.metrics,
                       mode=spec.modes[0] if single else spec.modes, sampler=make_sampler(spec),
                       points_to_evaluate=points or None)


def make_scheduler(spec: SweepSpec, base: dict):
    """ASHA over the epochs a trial trains across its phases (and one report more), else FIFO."""
    if spec.scheduler.name == "asha":
        return ASHAScheduler(metric=spec.metrics[0], mode=spec.modes[0], time_attr="training_iteration",
                             max_t=total_epochs(base) + 1, grace_period=spec.scheduler.grace_period,
                             reduction_factor=spec.scheduler.reduction_factor)
    return FIFOScheduler()


def trial_dirname(trial) -> str:
    return trial.trial_id


def _parent_params(spec: SweepSpec) -> dict:
    params = {f"search.{k}": p.describe() for k, p in spec.search.items()}
    params.update({"sampler.name": spec.sampler.name, "sampler.seed": spec.sampler.seed,
                   "scheduler.name": spec.scheduler.name, "samples": spec.num_samples(),
                   "objectives": ", ".join(f"{o.metric}:{o.mode}" for o in spec.objectives),
                   "seeds": spec.seeds or "base", "resources.cpu": spec.resources.cpu,
                   "resources.gpu": spec.resources.gpu, "run.max_failures": spec.run.max_failures,
                   "run.shared_burnin": spec.run.shared_burnin})
    return params


def _start_tracking(spec: SweepSpec, base: dict, uri: str, space_text: str) -> dict:
    """Create the experiment and the sweep's parent run; return the constants every trial gets."""
    mlflow = connection.client(uri)
    experiment_id = connection.ensure_experiment(mlflow, spec.name, uri)
    commit = tracking.git_commit()
    parent = tracking.RunLog.open(mlflow, experiment_id, spec.name, {
        **tracking.run_tags(base, "sweep", spec.name, commit),
        sweep_records.OBJECTIVES: json.dumps([o.model_dump() for o in spec.objectives]),
        sweep_records.SEARCH_KEYS: json.dumps(list(spec.search)), sweep_records.SEEDS: json.dumps(spec.seeds or []),
        connection.NOTE: spec.description})
    parent.log_params(_parent_params(spec))
    parent.log_files({"space.yaml": space_text.encode()})
    return {"spec": spec.model_dump(by_alias=True), "mlflow_uri": uri, "experiment_id": experiment_id,
            "parent_run_id": parent.run_id, "sweep": spec.name, "commit": commit}


def _finish_tracking(context: dict, spec: SweepSpec, interrupted: bool) -> list:
    """Close what is still open, log the best config and the Pareto front on the parent run."""
    mlflow = connection.client(context["mlflow_uri"])
    parent = tracking.RunLog(mlflow, context["parent_run_id"])
    sweep = sweep_records.Sweep(spec.name, context["experiment_id"], parent.run_id,
                          [o.model_dump() for o in spec.objectives], list(spec.search), spec.seeds or [])
    records = sweep_records.trials(mlflow, sweep)
    for record in records:
        if record.status == "RUNNING":
            tracking.close_trial_runs(mlflow, context["experiment_id"], record.trial_id, "KILLED", "killed")
    ranked = sweep_records.rankable(records, spec.metrics)
    if ranked:
        front = sweep_records.pareto(ranked, sweep.objectives)
        top = sweep_records.best(ranked, spec.metrics[0], spec.modes[0])
        parent.log_metrics({f"best/{m}": top.metrics[m] for m in spec.metrics})
        parent.set_tags({"specreg.best_run_id": top.run_id, "specreg.pareto_run_ids": json.dumps(
            [r.run_id for r in front])})
        parent.log_files({file: text.encode() for file, text in
                          sweep_records.front_files(mlflow, top, front, spec.metrics).items()})
    else:
        front = []
    summary = sweep_records.summary_markdown(sweep, records, ranked, sweep.objectives, front,
                                       sweep_records.differences(mlflow, records, spec.metrics))
    parent.set_tags({connection.NOTE: f"{spec.description}\n\n{summary}".strip()})
    if interrupted:
        parent.end("KILLED", "killed")
    elif not any(r.status == "FINISHED" for r in records):
        parent.end("FAILED", "failed", "no trial finished")
    else:
        parent.end("FINISHED", "finished")
    return front


def run_sweep(space_path, *, samples=None, name=None, mlflow_uri=None, storage="specreg-runs",
              max_concurrent=None, resume=False, smoke=False, address=None, gpus_per_trial=None,
              echo=print) -> int:
    """Run (or resume) a sweep; return the exit code."""
    spec, base = load_space(space_path, samples=samples, smoke=smoke)
    updates = {}
    if name is not None:
        updates["name"] = check_name(name)
    if gpus_per_trial is not None:
        if gpus_per_trial < 0:
            raise BadInput(f"--gpus-per-trial: must be >= 0, got {gpus_per_trial}")
        updates["resources"] = spec.resources.model_copy(update={"gpu": gpus_per_trial})
    spec = spec.model_copy(update=updates)
    if max_concurrent is not None and max_concurrent < 1:
        raise BadInput(f"--max-concurrent: must be at least 1, got {max_concurrent}")
    storage = Path(storage).resolve()
    sweep_dir = storage / spec.name
    if resume and not (tune.Tuner.can_restore(str(sweep_dir)) and (sweep_dir / CONTEXT_FILE).is_file()):
        raise BadInput(f"--resume: there is no sweep named {spec.name!r} in {storage}")
    if not resume and sweep_dir.exists():
        raise BadInput(f"a sweep named {spec.name!r} already exists in {storage}; continue it with --resume "
                       "or choose another --name")
    uri = connection.resolve_uri(mlflow_uri)
    check_client_tracking(address, uri)
    connection.check_reachable(uri)
    check_data(base)
    connect(address)
    fit = check_resources(spec)

    if resume:
        context = json.loads((sweep_dir / CONTEXT_FILE).read_text())
        if context["spec"] != spec.model_dump(by_alias=True) or context["mlflow_uri"] != uri:
            echo(f"note: resuming with the space and tracking URI the sweep started with ({context['mlflow_uri']})")
        spec = SweepSpec.model_validate(context["spec"])
    else:
        context = _start_tracking(spec, base, uri, Path(space_path).read_text())
        # one burn-in cache per storage folder: its keys hash everything a prefix depends on, so sweeps that
        # share a prefix (a study and its follow-ups) train it once
        context.update({"cache_dir": str(Path(storage) / CACHE_DIR), "cpus": spec.resources.cpu,
                        "offline_dir": str(sweep_dir / journal.OFFLINE_DIR),  # read by `sync`, below
                        "attack_dir": str(sweep_dir / ATTACK_DIR)})
        sweep_dir.mkdir(parents=True)
        (sweep_dir / CONTEXT_FILE).write_text(json.dumps(context))
    concurrent = max_concurrent or spec.run.max_concurrent or min(fit, spec.num_samples())
    trainable = tune.with_resources(run_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    echo(f"sweep {spec.name}: {spec.num_samples()} trials, up to {concurrent} at a time; "
         f"MLflow {context['mlflow_uri']} (experiment {spec.name}); Ray results {sweep_dir}")
    if resume:  # the searcher, the scheduler and the monitor come back from the sweep's saved state
        try:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_errored=True,
                                       param_space={CONTEXT: context})
        except (ModuleNotFoundError, AttributeError) as error:  # Tune pickles classes by module and name
            raise BadInput(f"--resume: sweep {spec.name!r} was started by specreg at commit "
                           f"{context.get('commit') or '(unknown)'}, "
                           f"whose saved state names code this version does not have ({error}); resume it "
                           "with that version (a git worktree at that commit)") from None
        connection.retry(connection.client(context["mlflow_uri"]).update_run, context["parent_run_id"], "RUNNING")
    else:
        monitor = SweepMonitor(context["mlflow_uri"], context["experiment_id"], spec.metrics, list(spec.search))
        tuner = tune.Tuner(
            trainable, param_space={CONTEXT: context},
            tune_config=tune.TuneConfig(search_alg=make_searcher(spec),
                                        scheduler=make_scheduler(spec, base),
                                        num_samples=spec.num_samples(), max_concurrent_trials=concurrent,
                                        reuse_actors=True, trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(storage), verbose=0, callbacks=[monitor],
                                      failure_config=tune.FailureConfig(max_failures=spec.run.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    # Trials checkpoint every epoch by design; Tune's warning about frequent state snapshots is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own start-up lines (its settings table, the results folder again, a TensorBoard hint into Ray's
    # session folder) say nothing the sweep's line above does not; its older reporter at verbose=0 is silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        grid = tuner.fit()  # returns on Ctrl-C too, with the sweep's state saved
    except BaseException:
        _finish_tracking(context, spec, interrupted=True)
        raise
    interrupted = grid.num_terminated + grid.num_errors < spec.num_samples()
    for result in grid:
        if result.metrics.get(OUTCOME) == "invalid":
            echo(f"trial {result.metrics.get('trial_id', '')}: not retried, its config is invalid: "
                 f"{result.metrics.get(ERROR, '')}")
    offline = sweep_dir / journal.OFFLINE_DIR
    if any(offline.glob("*.jsonl")) or not journal.reachable(context["mlflow_uri"]):
        echo(f"sweep {spec.name}: the MLflow tracking server {context['mlflow_uri']} became unreachable; "
             f"the trials' results wait in {offline}; once it is back, send them with: specreg sync "
             f"{spec.name} --storage {storage}")
        return 1
    front = _finish_tracking(context, spec, interrupted)
    if interrupted:
        echo(f"sweep {spec.name} interrupted; continue it with: specreg sweep {space_path} --name {spec.name} "
             f"--storage {storage} --resume")
        return 1
    return _report_end(echo, spec, context, sweep_dir, front)


def _report_end(echo, spec: SweepSpec, context: dict, sweep_dir: Path, front: list) -> int:
    if not front:
        echo(f"sweep {spec.name}: no trial finished; see the Ray logs in {sweep_dir}")
        return 1
    label = "best trial" if len(spec.objectives) == 1 else "Pareto front"
    echo(f"sweep {spec.name} done; {label}:")
    for record in front if len(spec.objectives) > 1 else front[:1]:
        values = ", ".join(f"{m}={record.metrics[m]:.4g}" for m in spec.metrics)
        echo(f"  {record.trial_id}: {values}  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                             for k, v in record.searched.items()))
    echo(f"look at it: specreg runs {spec.name} (every trial against the baseline) | specreg ui | specreg export {spec.name} --out DIR "
         f"(MLflow {context['mlflow_uri']})")
    return 0


def sync(name: str, storage="specreg-runs", echo=print) -> int:
    """Send a sweep's offline writes (kept while its tracking server was unreachable), then close it."""
    sweep_dir = Path(storage).resolve() / check_name(name)
    if not (sweep_dir / CONTEXT_FILE).is_file():
        raise BadInput(f"there is no sweep named {name!r} in {Path(storage).resolve()}")
    context = json.loads((sweep_dir / CONTEXT_FILE).read_text())
    connection.check_reachable(context["mlflow_uri"])
    mlflow = connection.client(context["mlflow_uri"])
    count = journal.sync_offline(mlflow, sweep_dir / journal.OFFLINE_DIR)
    spec = SweepSpec.model_validate(context["spec"])
    if connection.retry(mlflow.get_run, context["parent_run_id"]).info.status == "RUNNING":
        _finish_tracking(context, spec, interrupted=False)
    echo(f"sweep {name}: sent the offline writes of {count} runs to {context['mlflow_uri']}")
    return 0
