"""run_experiment end to end on digits: every regularizer kind, checkpoints, burn-in prefix, divergence."""
import math

import pytest
import torch

import specreg
from specreg import regularizers

KINDS = sorted(regularizers.REGULARIZERS)


def config(kind="none", epochs=3, **reg):
    return {
        "data": {"name": "digits"},
        "model": {"name": "mlp", "widths": [48]},
        "train": {"epochs": epochs, "batch_size": 128, "lr": 0.05, "seed": 0, "device": "cpu"},
        "regularizer": {"kind": kind, "strength": 1e-2 if kind != "none" else 0.0, **reg},
    }


@pytest.mark.parametrize("kind", KINDS)
def test_three_epochs_with_each_regularizer(kind):
    seen = []
    result = specreg.run_experiment(config(kind), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    for key in ("train_loss", "train_acc", "test_acc", "reg_penalty", "alpha_hat", "epoch_seconds",
                "sigma/features.2"):
        assert key in seen[-1]
    assert result["clean_acc"] > 0.8, result["clean_acc"]
    if kind not in ("none", "spectral-norm"):
        assert seen[-1]["reg_penalty"] > 0
    assert len(result["history"]) == 3 and math.isfinite(result["sigma_sq_sum"])


def test_strong_rep_spectral_lowers_the_feature_spectral_norms():
    plain = specreg.run_experiment(config("none", epochs=4))
    regularized = specreg.run_experiment(config("rep-spectral", epochs=4, strength=1.0))
    assert regularized["sigma_sq_sum"] < 0.5 * plain["sigma_sq_sum"], (regularized["sigma_sq_sum"],
                                                                        plain["sigma_sq_sum"])


def test_burnin_delays_the_penalty():
    seen = []
    specreg.run_experiment(config("rep-spectral", epochs=4, burnin=0.5), on_epoch=seen.append)
    assert [m["reg_penalty"] > 0 for m in seen] == [False, False, True, True]


def test_resume_from_a_checkpoint_equals_training_straight_through(tmp_path):
    cfg = config("rep-spectral", epochs=4, every=3)
    straight = specreg.run_experiment(cfg)
    specreg.run_experiment(cfg, checkpoint_dir=tmp_path, stop_after_epochs=2)
    resumed = specreg.run_experiment(cfg, resume_from=tmp_path)
    for key in ("train_loss", "test_acc", "sigma/features.2", "reg_penalty"):
        assert resumed[key] == straight[key], key
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["rep-spectral", "spectral-decay", "spectral-norm"])
def test_shared_burnin_prefix_equals_training_from_scratch(tmp_path, kind):
    cfg = config(kind, epochs=4, burnin=0.5)
    scratch = specreg.run_experiment(cfg)
    prefix = config("none", epochs=4)
    specreg.run_experiment(prefix, checkpoint_dir=tmp_path, stop_after_epochs=2)
    cached = specreg.run_experiment(cfg, resume_from=tmp_path)
    for key in ("train_loss", "test_acc", "reg_penalty"):
        assert cached[key] == scratch[key], key
    # logged norms are warm-started from different histories: equal to power-iteration accuracy
    assert cached["sigma/features.2"] == pytest.approx(scratch["sigma/features.2"], rel=1e-5)


def test_checkpoints_hold_plain_tensors_only(tmp_path):
    specreg.run_experiment(config("rep-spectral", epochs=1), checkpoint_dir=tmp_path)
    state = specreg.load_checkpoint(tmp_path)  # weights_only=True inside
    assert state["epoch"] == 1 and "regularizer" in state


def test_divergence_stops_the_run_with_the_epoch_and_last_metrics():
    cfg = config("none", epochs=5)
    cfg["train"].update(lr=1e6, momentum=0.0)
    with pytest.raises(specreg.Diverged) as error:
        specreg.run_experiment(cfg)
    assert error.value.epoch >= 1
    assert all(math.isfinite(v) for k, v in error.value.last_metrics.items() if isinstance(v, float))


def test_bad_config_fails_before_any_training():
    with pytest.raises(specreg.ConfigError, match="regularizer.strength"):
        specreg.run_experiment(config("rep-spectral", strength=-1.0))


def test_the_attack_block_adds_robustness_metrics():
    cfg = config("rep-spectral", epochs=2)
    cfg["attack"] = {"name": "tangent", "samples": 20, "max_queries": 300, "eps": [0.5, 1.0]}
    result = specreg.run_experiment(cfg)
    for key in ("adv_dist_median", "adv_acc_eps_0.5", "adv_acc_eps_1.0", "adv_auc", "attack_queries_mean"):
        assert key in result
    assert 0.0 <= result["adv_acc_eps_1.0"] <= result["adv_acc_eps_0.5"] <= 1.0
    assert result["attack_queries_mean"] <= 300


def test_amp_on_a_cpu_warns_and_trains_as_without_it():
    """train.amp asks for bf16 autocast, which runs on CUDA only: on a CPU the run says so and trains in
    float32, exactly as with amp off."""
    plain = specreg.run_experiment(config("rep-spectral", epochs=1))
    amp = config("rep-spectral", epochs=1)
    amp["train"]["amp"] = True
    with pytest.warns(UserWarning, match="train.amp is ignored on cpu"):
        asked = specreg.run_experiment(amp)
    assert asked["history"][-1]["train_loss"] == plain["history"][-1]["train_loss"]
