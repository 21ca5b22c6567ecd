"""What the sweep platform costs, and what the shared burn-in saves.

1. Overhead: the quickstart's 8 trials through `specreg sweep --max-concurrent 1` (shared burn-in off, so
   both sides train the same epochs) against the same 8 resolved configs run back to back in one process
   with `specreg.run_experiment` (one torch thread on both sides, as `resources.cpu: 1` gives a trial).
2. Shared burn-in: a 12-trial strength x placement grid with burn-in 0.8, once with the shared prefix and
   once with independent trials (both one trial at a time); the figure is the ratio of trial-seconds
   (the sum of the trials' MLflow run durations).

    python bench/sweep_overhead.py                 # both parts; writes docs/benchmarks_sweep.md
    python bench/sweep_overhead.py --part burnin   # one part (the doc is written only for both)
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

ROOT = Path(__file__).resolve().parents[1]
BURNIN_BASE = {
    "task": "supervised",
    "data": {"name": "digits"},
    "model": {"name": "mlp", "widths": [1024, 1024, 1024], "activation": "gelu"},
    "train": {"epochs": 30, "batch_size": 32, "lr": 0.05, "weight_decay": 1.0e-4},
    "regularizer": {"kind": "rep-spectral", "burnin": 0.8},
    "attack": {"name": "tangent", "samples": 50, "max_queries": 300, "eps": [0.25, 0.5, 1.0]},
}


def sweep(space: dict, work: Path, *args: str) -> tuple[float, float, list]:
    """Run `specreg sweep` in a fresh store; return its wall seconds, the seconds before the first trial
    and after the last (Ray and MLflow start-up, summary), and the trial records."""
    from specreg_platform import results, tracking

    path = work / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    store = work / "mlruns.db"
    started = time.time()
    subprocess.run([shutil.which("specreg"), "sweep", str(path), "--mlflow", str(store), "--storage",
                    str(work / "runs"), *args], check=True, cwd=work, stdout=subprocess.DEVNULL)
    ended = time.time()
    mlflow = tracking.client(tracking.resolve_uri(str(store)))
    trials = results.trials(mlflow, results.find_sweep(mlflow, space["name"]))
    fixed = (min(t.start_ms for t in trials) / 1000 - started) + (ended - max(t.end_ms for t in trials) / 1000)
    return ended - started, fixed, trials


def overhead(work: Path) -> dict:
    import specreg
    from specreg_platform import results, tracking

    space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    space.update(name="bench-quickstart", run={"shared_burnin": False})
    sweep_seconds, fixed, trials = sweep(space, work, "--max-concurrent", "1")
    mlflow = tracking.client(tracking.resolve_uri(str(work / "mlruns.db")))
    configs = [results.run_config(mlflow, t.run_id) for t in trials]
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
            "overhead": sweep_seconds / baseline - 1, "per_trial_overhead": (sweep_seconds - fixed) / baseline - 1,
            "in_trial_overhead": trial_seconds / baseline - 1}


def compute_seconds(store: Path, trial, after_epoch: int) -> float:
    """A trial's regularized epochs plus its attack: what resuming from a prefix cannot save."""
    from specreg_platform import tracking

    mlflow = tracking.client(tracking.resolve_uri(str(store)))
    epochs = mlflow.get_metric_history(trial.run_id, "epoch_seconds")
    return sum(m.value for m in epochs if m.step > after_epoch) + trial.metrics["attack_seconds"]


def shared_burnin(work: Path) -> dict:
    figures = {}
    for shared in (True, False):
        space = {"name": f"bench-burnin-{'shared' if shared else 'independent'}", "base": BURNIN_BASE,
                 "search": {"regularizer.strength": {"grid": [1.0e-3, 1.0e-2, 1.0e-1]},
                            "regularizer.placement": {"grid": ["upto:1", "upto:2", "feature", "all"]}},
                 "objectives": [{"metric": "clean_acc", "mode": "max"}, {"metric": "adv_acc_eps_0.5", "mode": "max"}],
                 "sampler": {"name": "grid"}, "run": {"shared_burnin": shared}}
        folder = work / space["name"]
        folder.mkdir()
        wall, _, trials = sweep(space, folder, "--max-concurrent", "1")
        durations = sorted(t.duration_s for t in trials)
        figures[shared] = {"wall_s": wall, "trial_s": sum(durations), "trials": len(trials),
                           "longest_s": durations[-1], "others_mean_s": sum(durations[:-1]) / (len(durations) - 1)}
        if shared:
            prefix = round(BURNIN_BASE["regularizer"]["burnin"] * BURNIN_BASE["train"]["epochs"])
            resumed = sorted(trials, key=lambda t: t.duration_s)[:-1]
            figures[shared]["floor_s"] = durations[-1] + sum(
                compute_seconds(folder / "mlruns.db", t, prefix) for t in resumed)
    return {"shared": figures[True], "independent": figures[False],
            "ratio": figures[True]["trial_s"] / figures[False]["trial_s"],
            "floor": figures[True]["floor_s"] / figures[False]["trial_s"]}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2 ** 20
    import mlflow
    import optuna
    import ray

    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB; Python {platform.python_version()}, torch "
            f"{torch.__version__}, Ray {ray.__version__}, Optuna {optuna.__version__}, MLflow {mlflow.__version__}")


def write_doc(path: Path, over: dict, burn: dict, loads: tuple) -> None:
    text = f"""# Sweep platform benchmarks

Measured by `python bench/sweep_overhead.py` on: {machine()}.
Load average (1 min) at the start and end of the run: {loads[0]:.1f} and {loads[1]:.1f}. Other work on the
machine does not slow both sides alike: Ray runs its trial workers at niceness 15, the plain runs at 0.

## Overhead of `specreg sweep` (target: under 15% on trials of at least 20 s)

The quickstart's {over['trials']} trials (digits, MLP 1024-1024, 40 epochs, a 200-point tangent attack;
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

## Shared burn-in (target: at most 0.35x the trial-seconds of independent trials)

12 trials: rep-spectral strength (1e-3, 1e-2, 1e-1) x placement (upto:1, upto:2, feature, all) on a
3-hidden-layer MLP (1024 units, GELU) on digits, 30 epochs with burn-in 0.8 (24 unregularized epochs), a
50-point tangent attack; one trial at a time.

| | trial-seconds | wall seconds |
|---|---|---|
| shared burn-in (prefix trained once, 11 trials resume from it) | {burn['shared']['trial_s']:.1f} | {burn['shared']['wall_s']:.1f} |
| independent trials | {burn['independent']['trial_s']:.1f} | {burn['independent']['wall_s']:.1f} |

Ratio: **{burn['ratio']:.3f}x** ({'within' if burn['ratio'] <= 0.35 else 'over'} the target). Per trial: the one that trained the prefix took
{burn['shared']['longest_s']:.1f} s and the 11 that resumed from it {burn['shared']['others_mean_s']:.1f} s on
average, against {burn['independent']['trial_s'] / burn['independent']['trials']:.1f} s for an independent trial.
What a resumed trial still pays is its regularized epochs, which cost more than plain ones (the spectral
penalty's power iterations and backward pass), and its attack: with no platform cost at all inside the
resumed trials (their regularized epochs and attack only, from their MLflow metrics) the ratio would be
{burn['floor']:.3f}x; the rest is per-trial work (MLflow, checkpoints, artifacts and figures).
"""
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["overhead", "burnin", "all"], default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks_sweep.md")
    args = parser.parse_args()
    start_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="specreg-bench-") as tmp:
        work = Path(tmp)
        over = burn = None
        if args.part in ("overhead", "all"):
            (work / "overhead").mkdir()
            over = overhead(work / "overhead")
            print({k: round(v, 3) for k, v in over.items()}, flush=True)
        if args.part in ("burnin", "all"):
            (work / "burnin").mkdir()
            burn = shared_burnin(work / "burnin")
            print(burn, flush=True)
    if over and burn:
        write_doc(args.out, over, burn, (start_load, os.getloadavg()[0]))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
