"""Study: Barlow Twins on Fashion-MNIST with and without rep-spectral on the encoder (issue 5's note).

Each seed pretrains the same encoder twice (regularizer none, then rep-spectral), probes it linearly and
attacks encoder + probe with the hard-label tangent attack. Prints per-run metrics and a markdown table of
mean ± spread (half the max − min range over seeds) for docs/results.md; `--out` keeps the raw results.

    OMP_NUM_THREADS=1 python bench/ssl_study.py [--seeds 0 1 2] [--strength 1.0] [--out ssl_study.json]
"""
import argparse
import json
import os
import platform
import time

import numpy as np
import torch

import specreg

METRICS = ("clean_acc", "knn_acc", "med_dist", "acc_0.5", "acc_1.0", "acc_2.0",
           "adv_auc", "alpha_hat", "sigma_sq_sum")


def config(seed: int, kind: str, args) -> dict:
    return {
        "task": "ssl",
        "data": {"name": "fashion_mnist", "train_subset": args.train_subset},
        "model": {"name": "mlp", "widths": args.widths, "activation": "gelu"},
        "train": {"epochs": args.epochs, "batch_size": 256, "optimizer": "adam", "lr": 1e-3, "seed": seed,
                  "device": "cpu"},
        "ssl": {"method": "barlow", "projector": [512, 512], "offdiag_weight": 5e-3},
        "probe": {"epochs": 30, "lr": 1e-2},
        "regularizer": {"kind": kind, "strength": args.strength if kind != "none" else 0.0,
                        "burnin": args.burnin},
        "attack": {"name": "tangent", "samples": 100, "max_queries": 500, "eps": [0.5, 1.0, 2.0]},
    }


def summary(values) -> str:
    """Mean ± spread (half the range) over seeds."""
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}"


def table(results: dict) -> str:
    """Markdown: each metric under both regularizers and their paired (same-seed) difference."""
    rows = ["| metric | none | rep-spectral | rep-spectral − none (paired) |", "| --- | --- | --- | --- |"]
    for metric in METRICS:
        plain, regularized = ([r[metric] for r in results[kind]] for kind in ("none", "rep-spectral"))
        rows.append(f"| {metric} | {summary(plain)} | {summary(regularized)} | "
                    f"{summary(np.subtract(regularized, plain))} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--burnin", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    started, cpu, results = time.perf_counter(), time.process_time(), {"none": [], "rep-spectral": []}
    for seed in args.seeds:
        for kind in results:
            t0 = time.perf_counter()
            result = specreg.run_experiment(config(seed, kind, args))
            results[kind].append({k: result[k] for k in METRICS})
            print(f"seed {seed} {kind:12s} " + "  ".join(f"{k}={result[k]:.4g}" for k in METRICS)
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\n{len(args.seeds)} seeds: {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
          f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
