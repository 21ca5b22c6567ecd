"""Bad input to `specreg sweep`: exit code 2, a message naming the fault, and nothing created (no MLflow
store or experiment, no Ray storage, no output). Cases already proven in tests/platform are listed in
docs/reliability.md rather than repeated here."""
import copy

import pytest

from reliability_helpers import TINY_BASE, cli, ensure_ray, write_yaml


def _space(**base_changes) -> dict:
    base = copy.deepcopy(TINY_BASE)
    for section, values in base_changes.items():
        base[section] = {**base.get(section, {}), **values}
    return {"name": "bad", "base": base, "search": {"train.lr": {"choice": [0.05, 0.1]}},
            "objectives": [{"metric": "clean_acc", "mode": "max"}], "samples": 2}


def _only(folder, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.mark.parametrize("space, fragments", [
    pytest.param(_space(regularizer={"kind": "spectral-magic"}),
                 ["regularizer.kind", "spectral-magic", "rep-spectral", "spectral-decay"], id="unknown-kind"),
    pytest.param(_space(regularizer={"kind": "rep-spectral", "strength": 0.1, "placement": "middle"}),
                 ["regularizer.placement", "middle", "feature", "upto:"], id="unknown-placement"),
    pytest.param(_space(regularizer={"kind": "rep-spectral", "strength": 0.1, "placement": "upto:7"}),
                 ["regularizer.placement", "upto:7"], id="placement-resolves-to-no-layer"),
    pytest.param(_space(regularizer={"kind": "rep-spectral", "strength": -0.1}),
                 ["regularizer.strength", "-0.1"], id="negative-strength"),
    pytest.param(_space(regularizer={"kind": "rep-spectral", "strength": 0.1, "burnin": 1.5}),
                 ["regularizer.burnin", "1.5"], id="burnin-neither-fraction-nor-epochs"),
    pytest.param(_space(attack={"eps": [0.5, 0.0]}), ["attack.eps", "0.0"], id="eps-not-positive"),
    pytest.param(_space(attack={"samples": 0}), ["attack.samples", "0"], id="attack-samples-below-1"),
])
def test_bad_values_exit_2_naming_the_fault_and_create_nothing(tmp_path, monkeypatch, space, fragments):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "space.yaml", space)
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    _only(tmp_path, "space.yaml")


def test_yaml_syntax_error_names_the_line_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("name: x\nbase:\n  task: supervised\n  data: {name: digits\n")
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2 and "YAML syntax error at line 5" in result.output, result.output
    _only(tmp_path, "space.yaml")


def test_dataset_not_available_offline_exits_2_before_any_trial(tmp_path, monkeypatch):
    """CIFAR-10 in an empty root, with no network to download it from: refused before Ray or MLflow."""
    ensure_ray()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECREG_DATA", raising=False)
    (tmp_path / "empty").mkdir()
    space = _space(data={"name": "cifar10", "root": str(tmp_path / "empty"), "download": False},
                   model={"name": "mlp", "widths": [16]})
    write_yaml(tmp_path / "space.yaml", space)
    result = cli("sweep", "space.yaml")
    assert result.exit_code == 2, result.output
    assert "cifar10" in result.output and str(tmp_path / "empty") in result.output, result.output
    _only(tmp_path, "space.yaml", "empty")
    assert not any((tmp_path / "empty").iterdir())
