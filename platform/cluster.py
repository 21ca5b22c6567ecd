"""Validation of Ray cluster-launcher configs (`cluster.yaml`) against Ray's own schema."""
from pathlib import Path

import yaml


def validate_cluster_config(path) -> dict:
    """Fill in Ray's defaults and validate; return the prepared config.

    Raises jsonschema.ValidationError (with the path of the bad key) or ValueError. Uses Ray's private
    `ray.autoscaler._private.util`, which `ray up` itself runs; its presence is tested.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path(path).read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
