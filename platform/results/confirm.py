"""`specreg confirm`: re-run a sweep's best configs with fresh seeds as a child sweep, and read the result back.

A sweep's best trial is partly luck. The child sweep (named `<sweep>-confirm`, `-confirm2`, …) runs the
chosen configs as a grid over the one config section they differ in, each repeated over N seeds that the
parent never used, through the ordinary sweep machinery (`sweep.run_sweep`). Links, as tags:
the parent sweep run lists its confirmations (`specreg.confirmed_by`), the child sweep run names its parent
(`specreg.confirms`), and each child config run names the parent trial runs it re-ran
(`specreg.confirms_run`). `prefer_confirmed` then gives export and report the confirmed seed means.
"""
import copy
import json
import tempfile
from pathlib import Path

import yaml

from . import results
from ..track import connection, sweep_records, tracking
from ..base.errors import BadInput
from ..track.sweep_records import CONFIRMED_BY, CONFIRMS, CONFIRMS_RUN  # the links' tags, read back by sweep_records
from ..space.space import flatten


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def choose(records: list[sweep_records.TrialRecord], objectives: list[dict], top: int,
           per: str | None = None) -> list[sweep_records.TrialRecord]:
    """The top `top` trials by the first objective (the Pareto set with several, capped at `top`),
    within each value of the param `per` when given."""
    ranked = sweep_records.rankable(records, [o["metric"] for o in objectives])
    if per is not None and not any(per in r.params for r in ranked):
        raise BadInput(f"--per: {per!r} is not a param of the trials (e.g. regularizer.kind)")
    groups: dict[str, list] = {}
    for record in ranked:
        groups.setdefault(record.params.get(per, "") if per else "", []).append(record)
    first = objectives[0]
    sign = -1 if first["mode"] == "max" else 1
    chosen = []
    for group in groups.values():
        pool = sweep_records.pareto(group, objectives) if len(objectives) > 1 else group
        chosen += sorted(pool, key=lambda r: sign * r.metrics[first["metric"]])[:top]
    return chosen


def fresh_seeds(sweep: sweep_records.Sweep, records: list[sweep_records.TrialRecord], count: int) -> list[int]:
    """`count` seeds above every seed the sweep used."""
    used = set(sweep.seeds) | {int(r.params["train.seed"]) for r in records if "train.seed" in r.params}
    start = max(used, default=-1) + 1
    return list(range(start, start + count))


def varying_section(configs: list[dict], search_keys: list[str]) -> str:
    """The top-level config section that holds every difference between the configs (seeds aside)."""
    flats = [{k: v for k, v in flatten(c).items() if k != "train.seed"} for c in configs]
    keys = set().union(*flats)
    differing = {k for k in keys if len({_canonical(f.get(k)) for f in flats}) > 1}
    sections = sorted({k.split(".")[0] for k in differing})
    if len(sections) > 1:
        raise BadInput(f"the chosen configs differ in several config sections ({', '.join(sections)}); "
                       "confirm runs them as a grid over one section: use --top 1 or --per to narrow them")
    if sections:
        return sections[0]
    return search_keys[0].split(".")[0] if search_keys else "regularizer"


def child_space(parent_space: dict, name: str, configs: list[dict], section: str, seeds: list[int],
                objectives: list[dict]) -> dict:
    """The child sweep's search space: the chosen configs as a grid over `section`, over fresh seeds, with the
    parent's objectives (whatever metric chose the configs)."""
    values = list({_canonical(c[section]): c[section] for c in configs}.values())
    return {"name": name, "description": f"Confirmation of {parent_space['name']}: {len(values)} configs "
                                         f"re-run with seeds {seeds}.",
            "base": copy.deepcopy(configs[0]), "search": {section: {"grid": values}},
            "objectives": objectives, "sampler": {"name": "grid"}, "seeds": seeds,
            "resources": parent_space.get("resources", {}), "run": parent_space.get("run", {})}


def child_name(mlflow, name: str, storage: Path) -> str:
    """`<name>-confirm`, or the first `<name>-confirmN` that neither MLflow nor the storage holds."""
    for index in range(1, 1000):
        candidate = f"{name}-confirm" + (str(index) if index > 1 else "")
        if connection.retry(mlflow.get_experiment_by_name, candidate) is None and not (storage / candidate).exists():
            return candidate
    raise BadInput(f"{name}: too many confirmations already")


def parent_space(mlflow, sweep: sweep_records.Sweep) -> dict:
    """The search space the sweep ran (its parent run's `space.yaml`)."""
    return sweep_records.yaml_artifact(mlflow, sweep.parent_run_id, "space.yaml")


def run_confirm(name: str, *, top: int, seeds: int, per: str | None = None, objective: str | None = None,
                mode: str | None = None, mlflow_uri: str | None = None, storage="specreg-runs",
                max_concurrent: int | None = None, address: str | None = None, echo=print) -> int:
    """Choose the configs, run the child sweep, link it to the parent; return the exit code."""
    from ..run.sweep import run_sweep  # Ray and Optuna (about 2 s): loaded only where a confirmation runs

    if top < 1 or seeds < 1:
        raise BadInput(f"--top and --seeds must be at least 1, got {top} and {seeds}")
    uri = connection.resolve_uri(mlflow_uri)
    connection.require_store(uri)
    connection.check_reachable(uri)
    mlflow = connection.client(uri)
    sweep = sweep_records.find_sweep(mlflow, name)
    objectives = results.ranking_objectives(sweep, objective, mode)
    records = sweep_records.trials(mlflow, sweep)
    chosen = choose(records, objectives, top, per)
    if not chosen:
        raise BadInput(f"sweep {name!r} has no finished trial with {', '.join(o['metric'] for o in objectives)}")
    configs = [sweep_records.run_config(mlflow, r.run_id) for r in chosen]
    section = varying_section(configs, sweep.search_keys)
    storage = Path(storage).resolve()
    child = child_name(mlflow, name, storage)
    space = child_space(parent_space(mlflow, sweep), child, configs, section, fresh_seeds(sweep, records, seeds),
                        sweep.objectives)
    echo(f"confirming {len(chosen)} configs of {name} ({', '.join(r.trial_id for r in chosen)}) "
         f"with seeds {space['seeds']} as sweep {child}")
    with tempfile.TemporaryDirectory() as staging:
        path = Path(staging) / f"{child}.yaml"
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        code = run_sweep(path, mlflow_uri=uri, storage=storage, max_concurrent=max_concurrent, address=address,
                         echo=echo)
    link(mlflow, sweep, child, chosen, configs, section)
    echo(f"export now prefers the confirmed means: specreg export {name} --out DIR; report: specreg report {child}")
    return code


def link(mlflow, sweep: sweep_records.Sweep, child: str, chosen, configs, section: str) -> None:
    """Tag the child sweep's runs with what they confirm, and the parent sweep with its confirmation."""
    child_sweep = sweep_records.find_sweep(mlflow, child)
    tracking.RunLog(mlflow, child_sweep.parent_run_id).set_tags({CONFIRMS: sweep.name})
    for record in sweep_records.trials(mlflow, child_sweep):
        value = _canonical(record.searched.get(section))
        parents = [r.run_id for r, c in zip(chosen, configs) if _canonical(c[section]) == value]
        tracking.RunLog(mlflow, record.run_id).set_tags({CONFIRMS_RUN: json.dumps(parents)})
    tags = connection.retry(mlflow.get_run, sweep.parent_run_id).data.tags
    names = json.loads(tags.get(CONFIRMED_BY, "[]"))
    tracking.RunLog(mlflow, sweep.parent_run_id).set_tags({CONFIRMED_BY: json.dumps([*names, child])})
