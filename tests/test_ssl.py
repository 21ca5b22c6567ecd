"""task: ssl on digits: Barlow Twins / SimCLR pretraining, the probe, the attack on encoder + probe, resume."""
import math
import re

import pytest
import torch

import specreg
from specreg import models, regularizers, robustness, ssl
from specreg.data import load

NAME = re.compile(r"[A-Za-z0-9_./]+")


def config(method="barlow", epochs=2, probe=30, **reg):
    return {
        "task": "ssl",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "widths": [64]},
        "train": {"epochs": epochs, "batch_size": 128, "optimizer": "adam", "lr": 1e-3, "seed": 0, "device": "cpu"},
        "ssl": {"method": method, "projector": [64, 32]},
        "probe": {"epochs": probe},
        "regularizer": {"kind": "rep-spectral", "strength": 1e-2, **reg},
    }


def untimed(history):
    return [{k: v for k, v in metrics.items() if k != "epoch_seconds"} for metrics in history]


def spy(monkeypatch, module, name):
    """Wrap module.name so that every value it returns is kept in the returned list."""
    made, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: made.append(real(*args, **kwargs)) or made[-1])
    return made


@pytest.mark.parametrize("method", ["barlow", "simclr"])
def test_pretraining_then_probe_reaches_well_above_chance(method):
    seen = []
    result = specreg.run_experiment(config(method), on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == list(range(1, 33))
    pretrain, probe = seen[:2], seen[2:]
    assert {"pretrain/train_loss", "pretrain/reg_penalty", "pretrain/knn_acc", "sigma_1",
            "alpha_hat"} <= set(pretrain[-1])
    assert {"probe/train_loss", "probe/train_acc", "probe/test_acc"} <= set(probe[-1])
    assert pretrain[-1]["pretrain/reg_penalty"] > 0 and pretrain[1]["pretrain/train_loss"] < pretrain[0]["pretrain/train_loss"]
    assert all(NAME.fullmatch(key) for m in seen for key in m)
    assert result["clean_acc"] > 0.6 and result["knn_acc"] > 0.6, (result["clean_acc"], result["knn_acc"])
    assert math.isfinite(result["alpha_hat"]) and math.isfinite(result["sigma_sq_sum"])


def test_the_projector_is_never_regularized(monkeypatch):
    regs, heads = spy(monkeypatch, regularizers, "build"), spy(monkeypatch, ssl, "projector")
    seen = []
    specreg.run_experiment(config(epochs=1, probe=1, strength=1.0), on_epoch=seen.append)
    regularizer, projector = regs[0], heads[0]
    assert regularizer.layer_names == ["features.2"]
    assert [key for key in seen[0] if specreg.is_sigma_metric(key)] == ["sigma_1"]
    penalized = [norm.layer.weight for norm in regularizer.norms]
    assert not {id(w) for w in penalized} & {id(p) for p in projector.parameters()}
    params = list(projector.parameters()) + penalized
    grads = torch.autograd.grad(regularizer.penalty(None), params, allow_unused=True)
    assert all(g is None for g in grads[:-len(penalized)]) and all(g.abs().sum() > 0 for g in grads[-len(penalized):])


@pytest.mark.parametrize("reg", [{"kind": "all-layer-spectral"}, {"kind": "rep-spectral", "placement": "all"},
                                 {"kind": "rep-spectral", "placement": "layers:head"}])
def test_a_regularizer_reaching_past_the_encoder_is_refused(reg):
    cfg = config()
    cfg["regularizer"] = reg
    with pytest.raises(specreg.ConfigError, match="regulari"):
        specreg.validate_config(cfg)


def test_the_attack_runs_on_encoder_plus_probe(monkeypatch):
    attacked, real = [], robustness.evaluate
    monkeypatch.setattr(robustness, "evaluate", lambda model, *args: attacked.append(model) or real(model, *args))
    heads = spy(monkeypatch, ssl, "projector")
    cfg = config(epochs=1, probe=20)
    cfg["attack"] = {"name": "tangent", "samples": 10, "max_queries": 100, "eps": [0.5, 1.0]}
    result = specreg.run_experiment(cfg)
    model, = attacked
    assert isinstance(model, models.Classifier) and model.head[-1].out_features == 10
    assert all(m is not heads[0] for m in model.modules())  # the projector is discarded
    assert "acc_1.0" in result and 0 < result["attack_queries_mean"] <= 100
    # the attacked classifier's clean accuracy on raw images is the probe's accuracy on frozen features
    assert result["clean_acc"] == pytest.approx(result["probe/test_acc"], abs=1e-6)


@pytest.mark.parametrize("stop", [1, 2, 4])  # mid-pretraining, at the phase boundary, mid-probe
def test_resume_equals_training_straight_through(tmp_path, stop):
    cfg = config(epochs=2, probe=4, every=2)
    straight = specreg.run_experiment(cfg)
    specreg.run_experiment(cfg, checkpoint_dir=tmp_path, stop_after_epochs=stop)
    assert specreg.load_checkpoint(tmp_path)["phase"] == ("pretrain" if stop <= 2 else "probe")
    resumed = specreg.run_experiment(cfg, resume_from=tmp_path)
    for key in ("pretrain/train_loss", "pretrain/knn_acc", "sigma_1", "probe/test_acc", "clean_acc"):
        assert resumed[key] == straight[key], key
    assert untimed(resumed["history"]) == untimed(straight["history"])


def test_shared_burnin_prefix_equals_pretraining_from_scratch(tmp_path):
    cfg = config(epochs=2, probe=2, burnin=0.5)
    scratch = specreg.run_experiment(cfg)
    prefix = config(epochs=2, probe=2)
    prefix["regularizer"] = {"kind": "none"}
    specreg.run_experiment(prefix, checkpoint_dir=tmp_path, stop_after_epochs=1)
    cached = specreg.run_experiment(cfg, resume_from=tmp_path)
    for key in ("pretrain/train_loss", "pretrain/reg_penalty", "sigma_1", "clean_acc"):
        assert cached[key] == scratch[key], key


def test_views_are_random_crops_flips_and_noise_drawn_per_sample():
    data = load({"name": "digits"})
    x = data.x_train[:64]
    generator = torch.Generator().manual_seed(0)
    assert ssl.augment_settings("default", data)["flip"] is False  # digits are not mirror-symmetric
    assert torch.equal(ssl.augment(x, ssl.augment_settings("none", data), generator), x)
    settings = ssl.augment_settings({"noise": 0.0}, data)
    a, b = (ssl.augment(x, settings, generator) for _ in range(2))
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1 and not torch.equal(a, b)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    flipped = ssl.resized_crop(x, 1.0, True, rand)  # full-size crops: each sample is itself or its mirror
    same = (flipped - x).abs().flatten(1).amax(1) < 1e-5
    mirrored = (flipped - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < len(x)


def test_the_losses_prefer_matching_views():
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    other = z[torch.randperm(256, generator=torch.Generator().manual_seed(1))]
    assert ssl.barlow_twins_loss(z, z, 5e-3) < 0.1 * ssl.barlow_twins_loss(z, other, 5e-3)
    assert ssl.nt_xent_loss(z, z, 0.5) < ssl.nt_xent_loss(z, other, 0.5)
