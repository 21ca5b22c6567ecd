"""The platform reads the library's registries and reported metrics instead of keeping its own lists (no Ray,
no MLflow)."""
import copy
import importlib

import pytest

import specreg
from specreg_platform.base import figures
from specreg_platform.space import space
from specreg_platform.base.errors import BadInput

from platform_helpers import TINY_BASE, tiny_space, write_yaml


def test_figure_kinds_are_the_registered_regularizers_in_order():
    assert figures.KINDS == tuple(specreg.REGULARIZERS)
    assert [figures.color(kind) for kind in specreg.REGULARIZERS] == list(figures.PALETTE[:len(specreg.REGULARIZERS)])


def test_a_newly_registered_regularizer_gets_its_own_colour_without_editing_figures(monkeypatch):
    new = ("zz-new-kind", "zz-other-kind")
    for kind in new:
        monkeypatch.setitem(specreg.REGULARIZERS, kind, specreg.REGULARIZERS["none"])
    try:
        importlib.reload(figures)
        assert figures.KINDS[-2:] == new
        colours = [figures.color(kind) for kind in specreg.REGULARIZERS]
        markers = [figures.marker(kind) for kind in specreg.REGULARIZERS]
        assert len(set(colours)) == len(colours) == len(set(markers))
    finally:
        monkeypatch.undo()
        importlib.reload(figures)
    assert figures.KINDS == tuple(specreg.REGULARIZERS)

SSL = {**copy.deepcopy(TINY_BASE), "task": "ssl", "ssl": {"method": "barlow"}}


def _load(tmp_path, base, metric, **changes):
    return space.load_space(write_yaml(tmp_path / "space.yaml", tiny_space(
        "objectives", base=base, objectives=[{"metric": metric, "mode": "max"}], **changes)))


def test_knn_acc_is_an_objective_for_ssl_and_refused_where_the_task_does_not_report_it(tmp_path):
    spec, base = _load(tmp_path, SSL, "knn_acc")
    assert spec.metrics == ["knn_acc"] and base["task"] == "ssl"
    with pytest.raises(BadInput, match="no trial reports 'knn_acc'"):
        _load(tmp_path, TINY_BASE, "knn_acc")


def test_asha_needs_a_metric_every_phase_reports_every_epoch(tmp_path):
    asha = {"scheduler": {"name": "asha", "grace_period": 1}}
    _load(tmp_path, TINY_BASE, "clean_acc", **asha)  # supervised: an epoch's test_acc stands for clean_acc
    with pytest.raises(BadInput, match="only known at the end"):  # ssl: the pretraining epochs have no accuracy
        _load(tmp_path, SSL, "clean_acc", **asha)


@pytest.mark.parametrize("task", ["supervised", "ssl", "transfer"])
def test_every_registry_feeds_the_schema_and_every_reported_metric_is_an_objective(tmp_path, task):
    """The schema accepts every registered name; every metric the library says a task reports may be named
    as an objective, and a name it does not report is refused."""
    literal = space._choices
    schema = specreg.ExperimentConfig.model_fields
    assert literal(schema["regularizer"].annotation.model_fields["kind"].annotation) == tuple(specreg.REGULARIZERS)
    assert literal(specreg.ModelSpec.model_fields["name"].annotation) == tuple(specreg.MODELS)
    assert literal(specreg.AttackSpec.model_fields["name"].annotation) == tuple(specreg.ATTACKS)
    for name in specreg.DATASETS:  # every registered dataset with every key it declares
        keys = {key: 1 for key in specreg.dataset_options(name) if key != "name"}
        assert specreg.validate_config({**TINY_BASE, "data": {"name": name, **keys}})["data"]["name"] == name
    extra = {"ssl": {"ssl": {"method": "simclr"}}, "transfer": {"source": {"data": {"name": "digits"}, "epochs": 2}},
             "supervised": {}}[task]
    base = {**copy.deepcopy(TINY_BASE), "task": task, **extra}
    if task == "transfer":
        base["regularizer"] = {"kind": "none"}
    resolved = specreg.validate_config(base)
    reported = specreg.reported_metrics(resolved)
    assert list(reported) == [*specreg.phase_epochs(resolved), "final"]
    assert space.reported_metrics(resolved) == set(reported["final"])
    for metric in sorted(reported["final"]):
        spec, _ = _load(tmp_path, base, metric)
        assert spec.metrics == [metric]
    assert ("knn_acc" in reported["final"]) == (task != "supervised")
    with pytest.raises(BadInput, match="no trial reports"):
        _load(tmp_path, base, "not_a_metric")


TRANSFER = {**copy.deepcopy(TINY_BASE), "task": "transfer", "regularizer": {"kind": "none"},
            "source": {"data": {"name": "digits"}, "epochs": 4}, "transfer": {"mode": "finetune"},
            "train": {**TINY_BASE["train"], "epochs": 3}}


def test_asha_counts_epochs_across_phases(tmp_path):
    from specreg_platform.run import sweep

    asha = {"scheduler": {"name": "asha", "grace_period": 5}}
    spec, base = _load(tmp_path, TRANSFER, "alpha_hat", **asha)  # 5 >= train.epochs (3), < 4 + 3
    assert space.total_epochs(base) == 7 == base["source"]["epochs"] + base["train"]["epochs"]
    assert sweep.make_scheduler(spec, base)._max_t == 7 + 1
    with pytest.raises(BadInput, match="grace_period: 7 is not below the 7 epochs"):
        _load(tmp_path, TRANSFER, "alpha_hat", scheduler={"name": "asha", "grace_period": 7})


def test_progress_counts_epochs_across_phases_and_shows_each_phase():
    from specreg_platform.run import single

    ssl = specreg.validate_config({**SSL, "probe": {"epochs": 5}})
    assert space.total_epochs(ssl) == ssl["train"]["epochs"] + 5 == 7
    assert single.status({"epoch": 1, "train_loss": 0.5, "test_acc": 0.25}) == "loss 0.5000  test acc 0.2500"
    assert single.status({"epoch": 1, "pretrain/train_loss": 0.5, "pretrain/knn_acc": 0.75}) \
        == "pretrain/loss 0.5000  pretrain/kNN acc 0.7500"


@pytest.mark.parametrize("base, start", [
    ({**TINY_BASE, "regularizer": {"kind": "rep-spectral", "burnin": 0.5}}, 1),  # 0.5 of 2 epochs
    ({**TINY_BASE, "train": {**TINY_BASE["train"], "schedule": "constant"},
      "regularizer": {"kind": "jacobian", "burnin": 1}}, 1),
    ({**TRANSFER, "regularizer": {"kind": "rep-spectral", "burnin": 0.5, "stage": "target"}}, 4 + 2),  # source, 0.5 of 3
], ids=["fraction-cosine", "epochs-constant", "transfer-target"])
def test_the_burnin_key_is_the_one_computed_before_burnin_epochs_went(base, start):
    """The key as burnin.cache_key computed it when burnin.burnin_epochs still passed penalty_start through:
    prefixes cached before the change stay valid."""
    import hashlib
    import json

    from specreg_platform.run import burnin

    resolved = specreg.validate_config(base)
    config = copy.deepcopy(resolved)
    config["regularizer"], config["attack"] = {"kind": "none"}, None
    if config["train"]["schedule"] != "cosine":
        del config["train"]["epochs"]
    payload = {"config": config, "epochs": start, "library": burnin.library_digest()}
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    assert burnin.cache_key(resolved) == old
    assert not hasattr(burnin, "burnin_epochs")
