import pytest

import specreg
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
    (with_(regularizer={"kind": "rep-spectral", "strenght": 1}), ["regularizer.strenght", "unknown key"]),
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


def _literal(model, field):
    import typing

    annotation = model.model_fields[field].annotation
    return typing.get_args(next(a for a in (annotation, *typing.get_args(annotation))
                                if typing.get_origin(a) is typing.Literal))


def test_the_schema_reads_its_names_from_the_registries():
    import specreg

    assert _literal(specreg.ExperimentConfig.model_fields["regularizer"].annotation, "kind") \
        == tuple(specreg.REGULARIZERS)
    assert _literal(specreg.ModelSpec, "name") == tuple(specreg.MODELS)
    assert _literal(specreg.AttackSpec, "name") == tuple(specreg.ATTACKS)
    from specreg.config import KNOWN_INPUT_SHAPES, KNOWN_NUM_CLASSES
    assert set(KNOWN_INPUT_SHAPES) | set(KNOWN_NUM_CLASSES) <= set(specreg.DATASETS)


@pytest.mark.parametrize("kind", __import__("specreg").REGULARIZERS)
def test_every_registered_regularizer_validates(kind):
    assert validate_config(with_(regularizer={"kind": kind}))["regularizer"]["kind"] == kind


@pytest.mark.parametrize("name", __import__("specreg").MODELS)
def test_every_registered_model_validates(name):
    config = validate_config({"data": {"name": "cifar10"}, "model": {"name": name}})
    assert config["model"]["name"] == name


@pytest.mark.parametrize("name", __import__("specreg").ATTACKS)
def test_every_registered_attack_validates(name):
    assert validate_config(with_(attack={"name": name}))["attack"]["name"] == name


@pytest.mark.parametrize("name", __import__("specreg").DATASETS)
def test_every_registered_dataset_validates(name):
    assert validate_config(with_(data={"name": name}))["data"]["name"] == name


@pytest.mark.parametrize("config, key", [
    (with_(regularizer={"kind": "not-registered"}), "regularizer.kind"),
    (with_(model={"name": "not-registered"}), "model.name"),
    (with_(attack={"name": "not-registered"}), "attack.name"),
])
def test_an_unregistered_name_is_refused(config, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(config)


@pytest.mark.parametrize("kind", __import__("specreg").REGULARIZERS)
def test_every_regularizer_declares_options_the_schema_has(kind):
    import specreg

    options = specreg.regularizer_options(kind)
    fields = set(specreg.ExperimentConfig.model_fields["regularizer"].annotation.model_fields)
    assert set(options) <= fields - {"kind", "stage"}, f"{kind}: {sorted(set(options) - fields)}"
    assert ("strength" in options) == (kind not in ("none", "spectral-norm"))


@pytest.mark.parametrize("config, names", [
    (with_(data={"name": "digits", "test_subst": 50}), ["data", "'test_subst'", "did you mean 'test_subset'"]),
    (with_(data={"name": "digits", "root": "~/data"}), ["data", "'root'", "'digits'"]),  # a key of mnist's only
    (with_(data={"name": "digitz"}), ["data", "'digitz'", "did you mean 'digits'"]),
    (with_(attack={"max_evalz": 10}), ["attack", "'max_evalz'", "did you mean 'max_evals'"]),
    (with_(attack={"name": "hsja", "iteration": 40}), ["attack", "'iteration'", "did you mean 'iterations'"]),
    (with_(task="transfer", source={"data": {"name": "digits", "train_subst": 9}, "epochs": 1}),
     ["source.data", "'train_subst'", "did you mean 'train_subset'"]),
])
def test_an_unknown_data_or_attack_key_is_refused_at_validation(config, names):
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize("name", __import__("specreg").DATASETS)
def test_every_option_a_dataset_registers_is_accepted(name):
    import specreg

    options = {key: 1 for key in specreg.dataset_options(name) if key != "name"}
    assert options, name
    config = validate_config(with_(data={"name": name, **options}))
    assert set(config["data"]) == set(specreg.dataset_options(name))


@pytest.mark.parametrize("name", __import__("specreg").ATTACKS)
def test_every_option_an_attack_registers_is_accepted(name):
    import specreg

    options = {key: 1 for key in specreg.attack_options(name) if key not in specreg.AttackSpec.model_fields}
    config = validate_config(with_(attack={"name": name, **options}))
    assert set(options) <= set(config["attack"])
    assert set(config["attack"]) == set(options) | set(specreg.AttackSpec.model_fields)


def _scalars(metrics: dict) -> set:
    return {k for k, v in metrics.items() if isinstance(v, (int, float)) and not specreg.is_sigma_metric(k)}


TINY = {"data": {"name": "digits", "train_subset": 256, "test_subset": 64},
        "model": {"name": "mlp", "widths": [16]}, "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "attack": {"samples": 4, "max_queries": None, "iterations": 1, "eps": [0.5, 1.0], "start_pool": 8,
                   "trace": [1]}}


@pytest.mark.parametrize("extra", [
    {"regularizer": {"kind": "rep-spectral", "strength": 0.1}},
    {"task": "ssl", "ssl": {"method": "barlow", "projector": [16]}, "probe": {"epochs": 1}},
    {"task": "transfer", "source": {"data": TINY["data"], "epochs": 1}, "probe": {"epochs": 1},
     "regularizer": {"kind": "rep-spectral", "stage": "source"}},
    {"task": "transfer", "source": {"data": TINY["data"], "epochs": 1}, "transfer": {"mode": "finetune"},
     "regularizer": {"kind": "rep-spectral", "stage": "target"}},
], ids=["supervised", "ssl", "transfer-probe", "transfer-finetune-target"])
def test_reported_metrics_are_what_a_run_of_each_task_emits(extra):
    import specreg

    config = validate_config({**TINY, **extra})
    declared = specreg.reported_metrics(config)
    epochs = []
    final = specreg.run_experiment(config, on_epoch=epochs.append)
    phases = list(specreg.phase_epochs(config))
    assert list(declared) == [*phases, "final"]
    assert len(epochs) == len(phases)  # one epoch per phase
    for name, metrics in zip(phases, epochs):
        assert _scalars(metrics) == declared[name], name
    assert _scalars(final) == declared["final"]
    if config["task"] == "ssl":
        assert "knn_acc" in declared["final"] and "pretrain/knn_acc" in declared["pretrain"]
