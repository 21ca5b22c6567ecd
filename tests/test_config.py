import pytest

from specreg import ConfigError, validate_config

BASE = {"data": {"name": "digits"}, "model": {"name": "mlp", "widths": [16]}}


def with_(**sections):
    return {**BASE, **sections}


def test_defaults_are_filled_and_placement_defaults_per_kind():
    config = validate_config(with_(regularizer={"kind": "rep-spectral", "strength": 0.1}))
    assert config["regularizer"]["placement"] == "feature"
    assert config["train"]["optimizer"] == "sgd" and config["attack"] is None
    assert validate_config(with_(regularizer={"kind": "all-layer-spectral"}))["regularizer"]["placement"] == "all"


@pytest.mark.parametrize("config, names", [
    (with_(regularizer={"kind": "rep-specral"}), ["regularizer.kind", "rep-specral", "rep-spectral"]),
    (with_(regularizer={"kind": "rep-spectral", "strength": -1}), ["regularizer.strength", "-1"]),
    (with_(regularizer={"kind": "rep-spectral", "burnin": 1.5}), ["regularizer.burnin", "1.5"]),
    (with_(regularizer={"kind": "rep-spectral", "burnin": 10}), ["regularizer.burnin", "10 epochs"]),
    (with_(model={"name": "mlp", "normalize": "datset"}), ["model.normalize", "datset"]),
    (with_(model={"name": "slp", "init_std": 0}), ["model.init_std", "0"]),
    (with_(model={"name": "slp", "readout_scale": "sqrt"}), ["model.readout_scale", "sqrt"]),
    (with_(attack={"max_queries": None}), ["max_queries", "iterations"]),
    (with_(regularizer={"kind": "rep-spectral", "placement": "upto:7"}), ["regularizer.placement", "upto:7"]),
    (with_(regularizer={"kind": "rep-spectral", "placement": "top"}), ["regularizer.placement", "top", "upto:K"]),
    (with_(regularizer={"kind": "rep-spectral", "strenght": 1}), ["regularizer.strenght", "Extra"]),
    (with_(attack={"eps": [-0.5, 1.0]}), ["attack.eps", "-0.5"]),
    (with_(attack={"eps": []}), ["attack.eps"]),
    (with_(attack={"samples": 0}), ["attack.samples", "0"]),
    (with_(attack={"name": "pgd"}), ["attack.name", "pgd"]),
    (with_(train={"optimizer": "lamb"}), ["train.optimizer", "lamb"]),
    (with_(train={"device": "tpu"}), ["train.device", "tpu"]),
    ({**BASE, "model": {"name": "mlp", "width": 3}}, ["model", "width"]),
    ({"data": {"name": "synthetic-xor"}, "model": {"name": "resnet18"}}, ["resnet18", "image"]),
    ({**BASE, "extra": 1}, ["extra"]),
])
def test_bad_values_name_the_key_and_value(config, names):
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize("burnin, epochs, start", [(0.9, 400, 360), (360, 400, 360), (360, 370, 360), (0.5, 7, 4)])
def test_burnin_as_a_fraction_or_as_epochs(burnin, epochs, start):
    from specreg import penalty_start

    config = validate_config(with_(train={"epochs": epochs}, regularizer={"kind": "rep-spectral", "burnin": burnin}))
    assert penalty_start(config) == start


def test_readout_scale_is_refused_where_the_head_is_replaced():
    ssl = with_(task="ssl", ssl={"method": "barlow"}, model={"name": "slp", "readout_scale": 0.5})
    with pytest.raises(ConfigError, match="readout_scale"):
        validate_config(ssl)
