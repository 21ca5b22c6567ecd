"""Validation of Ray cluster-launcher configs (`cluster.yaml`) against Ray's own schema."""
from ..space.space import read_yaml


def validate_cluster_config(path) -> dict:
    """Fill in Ray's defaults and validate; return the prepared config.

    Raises BadInput for a missing file or bad YAML, jsonschema.ValidationError (with the path of the bad key)
    or ValueError. Uses Ray's private `ray.autoscaler._private.util`, which `ray up` itself runs; its
    presence is tested.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = read_yaml(path)
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared
