"""Input normalization on Fashion-MNIST: the training set's statistics (the default), none, and the fixed
(x − 0.5)/0.25 that every model used before, side by side on the same SLP, seeds and batches.

    python bench/normalization.py [--epochs 6] [--seeds 0 1 2]

The fixed map sends a black background (most of an F-MNIST image) to −2, far from the data's own mean
(0.29); the default standardizes each channel with the mean and std computed once when the data loads.
"""
import argparse
import statistics

import torch

import specreg

NORMALIZATIONS = {"dataset": "dataset", "none": "none", "fixed (0.5, 0.25)": [0.5, 0.25]}


def test_accuracy(normalize, seed: int, epochs: int) -> list[float]:
    config = {"data": {"name": "fashion_mnist"},
              "model": {"name": "slp", "width": 512, "activation": "gelu", "normalize": normalize},
              "train": {"epochs": epochs, "batch_size": 128, "lr": 0.05, "schedule": "constant", "seed": seed,
                        "eval_every": epochs}}
    return [m["test_acc"] for m in specreg.run_experiment(config)["history"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves = {name: [test_accuracy(value, seed, args.epochs) for seed in args.seeds]
              for name, value in NORMALIZATIONS.items()}
    print(f"| normalization | test accuracy after epoch 1 / 3 / {args.epochs} (%, mean over seeds {args.seeds}) |")
    print("|---|---|")
    for name, runs in curves.items():
        cells = [statistics.mean(run[e - 1] for run in runs) for e in (1, 3, args.epochs)]
        print(f"| {name} | " + " / ".join(f"{100 * c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
