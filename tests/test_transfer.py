"""task: transfer on digits, classes 0–4 → 5–9: probe and finetune (L2-SP), stages, resume, config errors."""
import pytest

import specreg


def config(mode="probe", stage="source", l2sp=0.0, source_epochs=2, epochs=2, **reg):
    return {
        "task": "transfer",
        "data": {"name": "digits", "classes": [5, 6, 7, 8, 9]},
        "source": {"data": {"name": "digits", "classes": [0, 1, 2, 3, 4]}, "epochs": source_epochs},
        "model": {"name": "mlp", "widths": [64]},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "seed": 0, "device": "cpu"},
        "transfer": {"mode": mode, "l2sp": l2sp},
        "probe": {"epochs": 20},
        "regularizer": {"kind": "rep-spectral", "strength": 1e-2, "stage": stage, **reg},
    }


def untimed(history):
    return [{k: v for k, v in metrics.items() if k != "epoch_seconds"} for metrics in history]


def test_probe_on_transferred_features_is_well_above_chance():
    seen = []
    result = specreg.run_experiment(config("probe"), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == list(range(1, 23))
    assert {"pretrain/train_acc", "pretrain/test_acc", "pretrain/reg_penalty", "sigma_1"} <= set(seen[1])
    assert {"probe/train_loss", "probe/test_acc"} <= set(seen[-1]) and "sigma_1" not in seen[-1]
    assert result["source_acc"] > 0.8 and result["clean_acc"] > 0.6 and result["knn_acc"] > 0.6, result


@pytest.mark.parametrize("stage", ["source", "target", "both"])
def test_the_stage_says_where_the_penalty_applies(stage):
    seen = []
    specreg.run_experiment(config("finetune", stage), on_epoch=seen.append)
    pretrain, finetune = seen[1], seen[3]
    assert ("pretrain/reg_penalty" in pretrain) == (stage != "target")
    assert ("finetune/reg_penalty" in finetune) == (stage != "source")
    assert all(m[k] > 0 for m in (pretrain, finetune) for k in m if k.endswith("reg_penalty"))
    assert "finetune/test_acc" in finetune and "sigma_1" in finetune


def test_l2sp_keeps_the_finetuned_encoder_near_the_source_weights(tmp_path):
    anchored = config("finetune", l2sp=10.0, epochs=3)
    specreg.run_experiment(anchored, checkpoint_dir=tmp_path / "source", stop_after_epochs=2)
    held = specreg.run_experiment(anchored, checkpoint_dir=tmp_path / "held")
    free = specreg.run_experiment(config("finetune", epochs=3), checkpoint_dir=tmp_path / "free")
    anchor = specreg.load_checkpoint(tmp_path / "held")["anchor"]

    def drift(name):  # squared distance of a run's encoder from the source encoder
        model = specreg.load_checkpoint(tmp_path / name)["model"]
        return sum(float((model[f"features.{k}"] - v).pow(2).sum()) for k, v in anchor.items())

    assert drift("source") == 0  # the anchor is the encoder at the end of the source phase
    assert drift("held") < 0.5 * drift("free")
    assert held["clean_acc"] > 0.6 and free["clean_acc"] > 0.6


@pytest.mark.parametrize("stop", [1, 3])  # mid-source pretraining, mid-finetune (anchor restored)
def test_resume_equals_training_straight_through(tmp_path, stop):
    cfg = config("finetune", "both", l2sp=1.0, epochs=3, every=2)
    straight = specreg.run_experiment(cfg)
    specreg.run_experiment(cfg, checkpoint_dir=tmp_path, stop_after_epochs=stop)
    resumed = specreg.run_experiment(cfg, resume_from=tmp_path)
    assert untimed(resumed["history"]) == untimed(straight["history"])
    assert resumed["clean_acc"] == straight["clean_acc"] and resumed["source_acc"] == straight["source_acc"]


def test_the_attack_runs_on_the_target_classifier():
    cfg = config("probe")
    cfg["attack"] = {"name": "tangent", "samples": 10, "max_queries": 100, "eps": [0.5, 1.0]}
    result = specreg.run_experiment(cfg)
    assert "acc_0.5" in result and result["attack_samples"] == 10
    assert result["clean_acc"] == pytest.approx(result["probe/test_acc"], abs=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"regularizer": {"kind": "rep-spectral", "stage": "target"}}, "regularizer.stage"),
    ({"regularizer": {"kind": "spectral-norm"}}, "spectral-norm"),
    ({"regularizer": {"kind": "rep-spectral", "stage": "both", "placement": "all"}, "transfer": {"mode": "finetune"}},
     "regularizer.placement"),
    ({"source": None}, "source"),
    ({"ssl": {"method": "barlow"}}, "ssl"),
    ({"source": {"data": {"name": "cifar10"}, "epochs": 1}}, "input shape"),
])
def test_bad_transfer_configs_fail_before_any_training(change, message):
    cfg = {**config(), **change}
    if cfg["source"] is None:
        del cfg["source"]
    with pytest.raises(specreg.ConfigError, match=message):
        specreg.validate_config(cfg)


def test_task_sections_are_refused_elsewhere():
    cfg = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "probe": {"epochs": 3}}
    with pytest.raises(specreg.ConfigError, match="probe"):
        specreg.validate_config(cfg)
    supervised = specreg.validate_config({"data": {"name": "digits"}, "model": {"name": "mlp"}})
    assert not {"ssl", "probe", "source", "transfer"} & set(supervised) and "stage" not in supervised["regularizer"]
