"""Helpers of the platform tests: tiny spaces, the local Ray instance, the command in-process."""
import copy
from pathlib import Path

import ray

from shared_helpers import cli, write_yaml  # noqa: F401 (the test modules import them from here)

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"

# Seconds per trial on 2 cores: digits, one hidden layer of 32, 2 epochs, a 20-point attack.
TINY_BASE = {
    "task": "supervised",
    "data": {"name": "digits"},
    "model": {"name": "mlp", "widths": [32]},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05},
    "regularizer": {"kind": "none", "burnin": 0.5},
    "attack": {"name": "tangent", "samples": 20, "max_queries": 200, "eps": [0.5, 1.0]},
}


def tiny_space(name: str, **changes) -> dict:
    space = {"name": name, "base": copy.deepcopy(TINY_BASE),
             "search": {"train.lr": {"loguniform": [0.01, 0.1]}},
             "objectives": [{"metric": "clean_acc", "mode": "max"}], "samples": 2}
    space.update(changes)
    return space


def ensure_ray() -> None:
    """The tests' local Ray instance (2 CPUs, no GPU even on a machine with one), started once, or again
    after the multi-node and GPU tests. A new one ("local"): Ray's default joins the cluster last started
    on this machine, whoever started it."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                 logging_config=ray.LoggingConfig(log_level="WARNING"))
