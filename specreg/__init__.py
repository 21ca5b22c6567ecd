"""specreg: spectral regularization up to the feature space, and black-box robustness evaluation.

Yang, Zavatone-Veth & Pehlevan (2024), "Spectral regularization for adversarially-robust
representation learning", arXiv 2405.17181.

This top level is the library's one door: the platform (`specreg_platform`) imports only the names in
`__all__`, never a submodule.
"""
from .attacks import ATTACKS, attack_options
from .attacks import validate as validate_attack
from .config import (AttackSpec, ConfigError, DataSpec, ExperimentConfig, ModelSpec, Strict, did_you_mean,
                     format_validation_error, penalty_start, phase_epochs, reported_metrics, validate_config)
from .data import DATASETS, DatasetNotFound, check_available, dataset_options
from .loop import CHECKPOINT_FILE, resolve_device
from .models import MODELS, model_options
from .regularizers import REGULARIZERS, is_sigma_metric, regularizer_options
from .robustness import is_attack_metric, metric_radius, radius_metric
from .train import Diverged, load_checkpoint, run_experiment, run_resolved, save_checkpoint

__all__ = [
    # running an experiment
    "run_experiment", "run_resolved", "Diverged", "load_checkpoint", "save_checkpoint", "CHECKPOINT_FILE",
    "resolve_device",
    # the experiment schema and the facts read from a resolved config
    "validate_config", "ConfigError", "ExperimentConfig", "DataSpec", "ModelSpec", "AttackSpec",
    "Strict", "format_validation_error", "did_you_mean",
    "phase_epochs", "penalty_start", "reported_metrics",
    # the registries and the options each entry reads
    "REGULARIZERS", "regularizer_options", "MODELS", "model_options", "DATASETS", "dataset_options",
    "check_available", "DatasetNotFound", "ATTACKS", "attack_options", "validate_attack",
    # the names of reported metrics
    "radius_metric", "metric_radius", "is_attack_metric", "is_sigma_metric",
]
