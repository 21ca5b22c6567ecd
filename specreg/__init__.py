"""specreg: spectral regularization up to the feature space, and black-box robustness evaluation.

Yang, Zavatone-Veth & Pehlevan (2024), "Spectral regularization for adversarially-robust
representation learning", arXiv 2405.17181.
"""
from .config import ConfigError, penalty_start, validate_config
from .loop import CHECKPOINT_FILE
from .train import Diverged, load_checkpoint, run_experiment, save_checkpoint

__all__ = ["CHECKPOINT_FILE", "ConfigError", "Diverged", "load_checkpoint", "penalty_start", "run_experiment",
           "save_checkpoint", "validate_config"]
