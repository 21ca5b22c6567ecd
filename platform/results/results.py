"""`specreg runs` and `specreg export`: a sweep's trials as a table, and its best config, Pareto front and
every trial written to a folder, with confirmed seed means preferred where `specreg confirm` ran."""
import json
import math
from dataclasses import replace
from pathlib import Path

import specreg

from ..track import connection
from ..base.errors import BadInput
from ..track.sweep_records import (CONFIRMED_BY, CONFIRMS_RUN, Sweep, TrialRecord, all_sweeps, baseline, best,
                                   compared, differences, find_sweep, front_files, pareto, rankable,
                                   summary_markdown, trial_record, trial_runs, trials, write_parquet)


def runs_table(mlflow, name: str | None = None, sort: str | None = None, limit: int | None = None,
               compact: bool = False):
    """(columns, rows) of the trials of one sweep, or of every sweep in the store, with each trial's
    differences from its sweep's baseline: as text (`compact`), else as numbers with their interval."""
    sweeps = [find_sweep(mlflow, name)] if name else all_sweeps(mlflow)
    by_sweep = {s.name: trials(mlflow, s) for s in sweeps}
    records = [r for s in sweeps for r in by_sweep[s.name]]
    versus = {run_id: found for s in sweeps
              for run_id, found in differences(mlflow, by_sweep[s.name], [o["metric"] for o in s.objectives]).items()}
    keys = list(dict.fromkeys(k for s in sweeps for k in s.search_keys))
    modes = {o["metric"]: o["mode"] for s in sweeps for o in s.objectives}
    metrics = list(dict.fromkeys([*modes, *([sort] if sort else [])]))
    if sort:
        valued = [r for r in records if math.isfinite(r.metrics.get(sort, math.nan))]
        if specreg.is_attack_metric(sort) and len({r.threat_model for r in valued}) > 1:
            raise BadInput(f"--sort {sort}: the trials were attacked under different threat models "
                           f"({', '.join(sorted({r.threat_model for r in valued}))}); rank one sweep at a time")
        valued.sort(key=lambda r: r.metrics[sort], reverse=modes.get(sort, "max") == "max")
        records = valued + [r for r in records if r not in valued]
    if limit is not None:
        records = records[:limit]
    deltas = compared(metrics) if versus else []
    columns = ["sweep", "trial", "status", "outcome", *keys, *metrics]
    columns += [f"Δ {m} (pp)" for m in deltas] if compact else [
        f"Δ {m}{end}" for m in deltas for end in ("", " low", " high", " within noise")]

    bases = {base.run_id for found in by_sweep.values() if (base := baseline(found))}

    def delta(record, metric) -> list:
        found = versus.get(record.run_id, {}).get(metric)
        if compact:
            return ["baseline" if record.run_id in bases else str(found) if found else None]
        return [found.mean, found.low, found.high, found.within_noise] if found else [None] * 4

    # a key that was not searched in a trial shows the value the trial used, as its MLflow params do
    rows = [[r.sweep, r.trial_id, r.status, r.outcome, *(r.searched.get(k, r.params.get(k)) for k in keys),
             *(r.metrics.get(m) for m in metrics), *(v for m in deltas for v in delta(r, m))] for r in records]
    return columns, rows


def ranking_objectives(sweep: Sweep, objective: str | None, mode: str | None) -> list[dict]:
    """The sweep's objectives, or `objective` alone (its mode: `mode`, else the sweep's, else max)."""
    if not objective:
        return sweep.objectives
    listed = {o["metric"]: o["mode"] for o in sweep.objectives}
    return [{"metric": objective, "mode": mode or listed.get(objective, "max")}]


def confirmations(mlflow, sweep: Sweep) -> dict[str, tuple[str, TrialRecord]]:
    """{parent trial run id: (child sweep name, the child's finished config record)}; the latest wins."""
    tags = connection.retry(mlflow.get_run, sweep.parent_run_id).data.tags
    found = {}
    for name in json.loads(tags.get(CONFIRMED_BY, "[]")):
        try:
            child = find_sweep(mlflow, name)
        except BadInput:
            continue  # the child sweep was deleted
        for run in trial_runs(mlflow, child):  # one query: the records and their links (tags)
            if run.info.status == "FINISHED":
                confirmed = trial_record(name, run)
                for parent_run in json.loads(run.data.tags.get(CONFIRMS_RUN, "[]")):
                    found[parent_run] = (name, confirmed)
    return found


def prefer_confirmed(mlflow, sweep: Sweep, records: list[TrialRecord]) -> list[TrialRecord]:
    """The records with each confirmed config's metrics replaced by its confirmed seed means (and marked)."""
    found = confirmations(mlflow, sweep)
    return [replace(r, metrics=found[r.run_id][1].metrics, confirmed_by=found[r.run_id][0])
            if r.run_id in found else r for r in records]


def export(mlflow, name: str, out_dir, objective: str | None = None, mode: str | None = None) -> dict:
    """Write best.yaml, pareto.yaml, trials.parquet and summary.md; return their paths."""
    sweep = find_sweep(mlflow, name)
    objectives = ranking_objectives(sweep, objective, mode)
    records = prefer_confirmed(mlflow, sweep, trials(mlflow, sweep))
    metrics = [o["metric"] for o in objectives]
    ranked = rankable(records, metrics)
    if any(r.confirmed_by for r in ranked):  # rank the configs that survived reseeding by their confirmed means
        ranked = [r for r in ranked if r.confirmed_by]
    if not ranked:
        raise BadInput(f"sweep {name!r} has no finished trial with {', '.join(metrics)}")
    out = Path(out_dir)
    top = best(ranked, metrics[0], objectives[0]["mode"])
    front = pareto(ranked, objectives)
    # Everything is read from the store first, so a store whose artifacts cannot be read leaves no folder behind.
    texts = {
        **front_files(mlflow, top, front, metrics, out),
        "summary.md": summary_markdown(sweep, records, ranked, objectives, front,
                                       differences(mlflow, records, metrics)),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {file: out / file for file in ("best.yaml", "pareto.yaml", "trials.parquet", "summary.md")}
    for file, text in texts.items():
        paths[file].write_text(text)
    write_parquet(records, paths["trials.parquet"])
    return paths
