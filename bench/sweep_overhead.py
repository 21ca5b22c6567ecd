"""What the sweep platform costs, and what the shared burn-in saves.

1. Overhead: 8 trials of the quickstart's search made longer (`overhead_space`) through `specreg sweep
   --max-concurrent 1` (shared burn-in off, so both sides train the same epochs) against the same 8
   resolved configs run back to back in one process with `specreg.run_experiment` (one torch thread on
   both sides, as `resources.cpu: 1` gives a trial).
2. Shared burn-in: a 12-trial strength x placement grid with burn-in 0.8, with the shared prefix, then
   with independent trials, then with the shared prefix again (one trial at a time; the two shared runs
   bracket the independent one, so a change of machine load during the part falls on both sides alike);
   the figure is the ratio of trial-seconds (the sum of the trials' MLflow run durations).

    python bench/sweep_overhead.py                 # both parts; writes docs/benchmarks_sweep.md
    python bench/sweep_overhead.py --part burnin   # one part; rewrites only its section of the doc
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from host import cpu_model

ROOT = Path(__file__).resolve().parents[1]
BURNIN_BASE = {
    "task": "supervised",
    "data": {"name": "digits"},
    "model": {"name": "mlp", "widths": [1024, 1024, 1024], "activation": "gelu"},
    "train": {"epochs": 30, "batch_size": 32, "lr": 0.05, "weight_decay": 1.0e-4},
    "regularizer": {"kind": "rep-spectral", "burnin": 0.8},
    "attack": {"name": "tangent", "samples": 50, "max_queries": 300, "eps": [0.25, 0.5, 1.0]},
}


def sweep(space: dict, work: Path, *args: str) -> tuple:
    """Run `specreg sweep` in a fresh store; return its wall seconds, the seconds before the first trial
    and after the last (Ray and MLflow start-up, summary), the trial records and the store's client."""
    from specreg_platform.track import connection, sweep_records

    path = work / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    store = work / "mlruns.db"
    started = time.time()
    subprocess.run([shutil.which("specreg"), "sweep", str(path), "--mlflow", str(store), "--storage",
                    str(work / "runs"), *args], check=True, cwd=work, stdout=subprocess.DEVNULL)
    ended = time.time()
    mlflow = connection.client(connection.resolve_uri(str(store)))
    trials = sweep_records.trials(mlflow, sweep_records.find_sweep(mlflow, space["name"]))
    fixed = (min(t.start_ms for t in trials) / 1000 - started) + (ended - max(t.end_ms for t in trials) / 1000)
    return ended - started, fixed, trials, mlflow


def overhead_space() -> dict:
    """The quickstart's search with trials long enough for the target (at least 20 s each): a wider MLP,
    more epochs and queries than the quickstart itself, whose trials take a few seconds."""
    space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    base = space["base"]
    base["model"]["widths"] = [1024, 1024]
    base["train"].update(epochs=40, batch_size=32)
    base["attack"]["max_queries"] = 2000
    space.update(name="bench-quickstart", run={"shared_burnin": False})
    return space


def describe(space: dict) -> str:
    """One line naming what the overhead part's trials run."""
    base = space["base"]
    return (f"{base['data']['name']}, {base['model']['name'].upper()} "
            f"{'-'.join(map(str, base['model']['widths']))}, {base['train']['epochs']} epochs at batch "
            f"{base['train']['batch_size']}, a {base['attack']['samples']}-point {base['attack']['name']} attack "
            f"of {base['attack']['max_queries']} queries")


def overhead(work: Path) -> dict:
    import specreg
    from specreg_platform.track import sweep_records

    space = overhead_space()
    sweep_seconds, fixed, trials, mlflow = sweep(space, work, "--max-concurrent", "1")
    configs = [sweep_records.run_config(mlflow, t.run_id) for t in trials]
    torch.set_num_threads(1)
    durations = []
    for config in configs:
        started = time.perf_counter()
        specreg.run_experiment(config)
        durations.append(time.perf_counter() - started)
    baseline = sum(durations)
    trial_seconds = sum(t.duration_s for t in trials)
    return {"sweep_s": sweep_seconds, "fixed_s": fixed, "baseline_s": baseline, "trial_s": trial_seconds,
            "min_run_s": min(durations), "mean_run_s": baseline / len(durations), "trials": len(trials),
            "described": describe(space),
            "overhead": sweep_seconds / baseline - 1, "per_trial_overhead": (sweep_seconds - fixed) / baseline - 1,
            "in_trial_overhead": trial_seconds / baseline - 1}


def compute_seconds(mlflow, trial, after_epoch: int) -> float:
    """A trial's regularized epochs plus its attack: what resuming from a prefix cannot save."""
    epochs = mlflow.get_metric_history(trial.run_id, "epoch_seconds")
    return sum(m.value for m in epochs if m.step > after_epoch) + trial.metrics["attack_seconds"]


def burnin_sweep(work: Path, shared: bool, label: str) -> dict:
    """One run of the 12-trial grid; its trial-seconds, wall seconds and per-trial figures."""
    space = {"name": f"bench-burnin-{label}", "base": BURNIN_BASE,
             "search": {"regularizer.strength": {"grid": [1.0e-3, 1.0e-2, 1.0e-1]},
                        "regularizer.placement": {"grid": ["upto:1", "upto:2", "feature", "all"]}},
             "objectives": [{"metric": "clean_acc", "mode": "max"}, {"metric": "acc_0.5", "mode": "max"}],
             "sampler": {"name": "grid"}, "run": {"shared_burnin": shared}}
    folder = work / space["name"]
    folder.mkdir()
    load = os.getloadavg()[0]
    wall, _, trials, mlflow = sweep(space, folder, "--max-concurrent", "1")
    figures = {"wall_s": wall, "trial_s": sum(t.duration_s for t in trials), "trials": len(trials),
               "loads": (load, os.getloadavg()[0])}
    if shared:
        marks = {t.run_id: mlflow.get_run(t.run_id).data.tags.get("specreg.burnin") for t in trials}
        prefix = round(BURNIN_BASE["regularizer"]["burnin"] * BURNIN_BASE["train"]["epochs"])
        trained = [t for t in trials if marks[t.run_id] == "trained"]
        resumed = [t for t in trials if marks[t.run_id] == "cached"]
        assert len(trained) == 1 and len(resumed) == len(trials) - 1, f"the prefix is trained once: {marks}"
        compute = [compute_seconds(mlflow, t, prefix) for t in resumed]
        figures.update(prefix_s=trained[0].duration_s,
                       resumed_mean_s=sum(t.duration_s for t in resumed) / len(resumed),
                       resumed_compute_s=sum(compute) / len(compute),
                       floor_s=sum(t.duration_s for t in trained) + sum(compute))
    return figures


def shared_burnin(work: Path) -> dict:
    first = burnin_sweep(work, True, "shared-1")
    independent = burnin_sweep(work, False, "independent")
    second = burnin_sweep(work, True, "shared-2")
    mean = {key: (first[key] + second[key]) / 2 for key in first if key not in ("trials", "loads")}
    return {"shared_runs": [first, second], "shared": mean, "independent": independent,
            "ratio": mean["trial_s"] / independent["trial_s"], "floor": mean["floor_s"] / independent["trial_s"]}


def machine() -> str:
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2 ** 20
    import mlflow
    import optuna
    import ray

    return (f"{cpu_model()}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}, torch "
            f"{torch.__version__}, Ray {ray.__version__}, Optuna {optuna.__version__}, MLflow {mlflow.__version__}")


def code_state() -> str:
    """The commit measured, and the library files that differed from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--", "specreg", "platform").splitlines()]
    note = f" with uncommitted changes to {', '.join(changed)}" if changed else ""
    return f"commit {git('rev-parse', '--short', 'HEAD').strip()}{note}"


def measured_on(loads: tuple) -> str:
    return (f"Measured on: {machine()}; {code_state()}. Load average (1 min) at the start and end of the "
            f"part: {loads[0]:.1f} and {loads[-1]:.1f}.")


HEADER = """# Sweep platform benchmarks

Measured by `python bench/sweep_overhead.py` (each part rewrites its own section: `--part overhead`,
`--part burnin`). Other work on the machine does not slow both sides alike: Ray runs its trial workers at
niceness 15, plain processes at 0.
"""


def overhead_section(over: dict) -> str:
    return f"""## Overhead of `specreg sweep` (target: under 15% on trials of at least 20 s)

{measured_on(over['loads'])}

{over['trials']} trials of the quickstart's search, made longer ({over['described']};
shared burn-in off) through `specreg sweep --max-concurrent 1`, against the same resolved configs run back
to back in one process with `specreg.run_experiment`; one torch thread on both sides.

| | seconds |
|---|---|
| `specreg sweep` wall time | {over['sweep_s']:.1f} |
| of which before the first trial and after the last (Ray start, a new MLflow store, the first worker's imports; the summary) | {over['fixed_s']:.1f} |
| sum of the trials' own durations (MLflow run start to end) | {over['trial_s']:.1f} |
| the same configs back to back in one process | {over['baseline_s']:.1f} |
| shortest / mean single run in that process | {over['min_run_s']:.1f} / {over['mean_run_s']:.1f} |

Overhead per trial (the command's time between its first trial's start and last trial's end, against the
plain runs): **{100 * over['per_trial_overhead']:.1f}%** ({'within' if over['per_trial_overhead'] < 0.15 else 'over'}
the target), of which {100 * over['in_trial_overhead']:.1f}% inside
the trials (MLflow runs, buffered epoch metrics, checkpoints reported to Tune, the artifacts and figures
uploaded at the end). Counting the once-per-sweep start-up too, the whole command took
{100 * over['overhead']:.1f}% longer than the plain runs.

Concurrency (ray#46965, OptunaSearch running trials one at a time): Ray 2.60 keeps as many trials pending
as `max_concurrent_trials` allows for a wrapped searcher, and `specreg sweep` always sets it (by default to
as many trials as the cluster holds); `tests/platform/test_platform_sweep.py::test_trials_run_concurrently`
checks that trials of a 2-at-a-time sweep overlap.
"""


def burnin_section(burn: dict) -> str:
    first, second = burn["shared_runs"]
    shared, independent = burn["shared"], burn["independent"]
    loads = (first["loads"][0], second["loads"][1])
    floor_note = (": the rest of the gap to the target is the library's regularized epochs and attack"
                  if burn["floor"] > 0.35 else "")
    return f"""## Shared burn-in (target: at most 0.35x the trial-seconds of independent trials)

{measured_on(loads)} Per sweep (start, end): {first['loads'][0]:.1f}, {first['loads'][1]:.1f} (shared);
{independent['loads'][0]:.1f}, {independent['loads'][1]:.1f} (independent); {second['loads'][0]:.1f}, {second['loads'][1]:.1f} (shared again).

12 trials: rep-spectral strength (1e-3, 1e-2, 1e-1) x placement (upto:1, upto:2, feature, all) on a
3-hidden-layer MLP (1024 units, GELU) on digits, 30 epochs with burn-in 0.8 (24 unregularized epochs), a
50-point tangent attack; one trial at a time. The shared sweep ran before and after the independent one.

| | trial-seconds | wall seconds |
|---|---|---|
| shared burn-in, first run (prefix trained once, 11 trials resume from it) | {first['trial_s']:.1f} | {first['wall_s']:.1f} |
| independent trials | {independent['trial_s']:.1f} | {independent['wall_s']:.1f} |
| shared burn-in, second run | {second['trial_s']:.1f} | {second['wall_s']:.1f} |

Ratio (mean of the two shared runs over the independent run): **{burn['ratio']:.3f}x** ({'within' if burn['ratio'] <= 0.35 else 'over'} the target);
{first['trial_s'] / independent['trial_s']:.3f}x and {second['trial_s'] / independent['trial_s']:.3f}x for each shared run. Per trial: the one that trained the prefix took
{shared['prefix_s']:.1f} s and the 11 that resumed from it {shared['resumed_mean_s']:.1f} s on average, against
{independent['trial_s'] / independent['trials']:.1f} s for an independent trial. Of a resumed trial's
{shared['resumed_mean_s']:.2f} s, {shared['resumed_compute_s']:.2f} s are its regularized epochs and its attack (from its MLflow metrics); the
other {shared['resumed_mean_s'] - shared['resumed_compute_s']:.2f} s are the per-trial work around them: opening the MLflow run, data and model set-up
and the prefix checkpoint's restore, a checkpoint written each epoch, the final spectrum and clean accuracy,
the artifacts (config, model, distances, spectrum) and two figures. With none of that per-trial work in the
resumed trials the ratio would be {burn['floor']:.3f}x{floor_note}. The trial that trains the prefix also pays the
worker's one-off imports (torch's compiler stack at the first optimizer, matplotlib, MLflow's artifact store),
which the independent sweep pays once in twelve trials.

The prefix is trained once per key: the first trial that needs it trains it under a file lock in the
sweep's storage, and a trial that needs it meanwhile blocks on that lock (no CPU, no second training) and
then resumes from it; the waiting trial keeps its Ray slot, and its wait counts in its trial-seconds (here,
one trial at a time, no trial waits). Trials run in reused Ray actors (`reuse_actors=True`), so only the
first trial of an actor starts a worker process.
"""


def replace_section(text: str, heading: str, section: str) -> str:
    """text with the section that starts with `heading` replaced (appended if it has none)."""
    parts = text.split("\n## ")
    for index, part in enumerate(parts):
        if ("## " + part if index else part).startswith(heading):
            parts[index] = section.removeprefix("## ").rstrip("\n") + "\n"
            return "\n## ".join(parts)
    return text.rstrip("\n") + "\n\n" + section


def write_doc(path: Path, over: dict | None, burn: dict | None) -> None:
    """Rewrite the sections of the parts measured, keep the others."""
    old = path.read_text() if path.is_file() else ""
    text = HEADER + ("\n## " + old.split("\n## ", 1)[1] if "\n## " in old else "")
    if over:
        text = replace_section(text, "## Overhead of", overhead_section(over))
    if burn:
        text = replace_section(text, "## Shared burn-in", burnin_section(burn))
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["overhead", "burnin", "all"], default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_sweep.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="specreg-bench-") as tmp:
        work = Path(tmp)
        over = burn = None
        if args.part in ("overhead", "all"):
            (work / "overhead").mkdir()
            load = os.getloadavg()[0]
            over = overhead(work / "overhead")
            over["loads"] = (load, os.getloadavg()[0])
            print(over, flush=True)
        if args.part in ("burnin", "all"):
            (work / "burnin").mkdir()
            burn = shared_burnin(work / "burnin")
            print(burn, flush=True)
    write_doc(args.out, over, burn)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
