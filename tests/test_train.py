"""run_experiment end to end on digits: every regularizer kind, checkpoints, burn-in prefix, divergence."""
import math

import pytest
import torch

import specreg
from specreg import loop, models, regularizers

KINDS = sorted(regularizers.REGULARIZERS)

pytestmark = pytest.mark.usefixtures("one_thread")


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
                "sigma_1"):
        assert key in seen[-1]
    assert result["clean_acc"] > 0.8, result["clean_acc"]
    if kind not in ("none", "spectral-norm"):
        assert seen[-1]["reg_penalty"] > 0
    assert len(result["history"]) == 3 and math.isfinite(result["sigma_sq_sum"])


def dense_conv_sigma(layer, input_shape):
    """σ_max of the conv (bias excluded) as the dense matrix of its action on the standard basis."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    out = torch.nn.functional.conv2d(basis, layer.weight.detach().double(), None, layer.stride, layer.padding)
    return torch.linalg.svdvals(out.reshape(n, -1))[0].item()


@pytest.mark.parametrize("kind", KINDS)
def test_each_regularizer_trains_a_conv_model_through_its_placement(kind, tmp_path):
    """A CNN on digits: `feature` places the regularizer on both convs, training runs with the penalty,
    and the σ logged for each conv is the exact operator norm of the trained kernel."""
    cfg = config(kind, epochs=2)
    cfg["model"] = {"name": "cnn", "channels": [4, 16]}
    cfg["train"]["batch_size"] = 32
    result = specreg.run_experiment(cfg, checkpoint_dir=tmp_path)
    first, last = result["history"]
    assert last["train_loss"] < first["train_loss"]
    if kind not in ("none", "spectral-norm"):
        assert first["reg_penalty"] > 0 and last["reg_penalty"] > 0

    model = models.build(cfg["model"], (1, 8, 8), 10)
    reg = regularizers.build(specreg.validate_config(cfg)["regularizer"]).attach(model)
    assert reg.layer_names == (["features.1", "features.3", "head"] if kind == "all-layer-spectral"
                               else ["features.1", "features.3"])
    reg.activate(model)  # spectral-norm: the checkpoint holds the parametrization
    model.load_state_dict(specreg.load_checkpoint(tmp_path)["model"])
    model.eval()
    for name, shape, position in [("features.1", (1, 8, 8), 1), ("features.3", (4, 8, 8), 2)]:
        layer = model.get_submodule(name)  # sigma_K: the K-th weight layer in forward order
        assert result[f"sigma_{position}"] == pytest.approx(dense_conv_sigma(layer, shape), rel=1e-4), name
        if kind == "spectral-norm":  # torch's constraint: the kernel reshaped to Cout × Cin·3·3 has σ 1
            reshaped = layer.weight.detach().double().reshape(layer.out_channels, -1)
            assert torch.linalg.svdvals(reshaped)[0].item() == pytest.approx(1.0, rel=1e-2)


def test_every_takes_the_penalty_and_its_gradient_exactly_on_the_steps_it_is_due():
    """every=3 over two epochs of 5 batches (steps 0-9): each plain SGD step moves the weights by the
    loss gradient plus, on steps 0, 3, 6 and 9 only, λ·2σ u vᵀ from the dense SVD; reg_penalty is the
    mean of λσ² over those steps."""
    raw = config("rep-spectral", epochs=2, every=3, strength=0.5, placement="upto:1", n_power_iterations=50)
    raw["train"].update(batch_size=8, momentum=0.0, schedule="constant")
    cfg = specreg.validate_config(raw)
    torch.manual_seed(0)
    model = models.build({"name": "mlp", "widths": [6]}, (1, 2, 2), 3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # σ_1 well above σ_2 throughout, so that 50 warm power steps give the exact u, v
        model.features[2].weight.add_(2 * torch.outer(torch.ones(6), torch.ones(4)) / math.sqrt(24))
    reg = regularizers.build(cfg["regularizer"]).attach(model)
    x, y = torch.rand(40, 1, 2, 2, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    steps = []  # (parameters before the step, batch)
    classify = loop.classification_loss(model)

    def loss(xb, yb):
        steps.append(({k: p.detach().clone() for k, p in model.named_parameters()}, xb, yb))
        return classify(xb, yb)

    run = loop.Run(cfg, torch.device("cpu"), {"model": model}, reg, model)
    run.fit(loop.Phase("train", model, loss, x, y, cfg["train"], lambda full: {}, classifier=model))
    assert len(steps) == 10
    after = [params for params, _, _ in steps[1:]] + [{k: p.detach() for k, p in model.named_parameters()}]
    penalties = []
    for t, ((before, xb, yb), new) in enumerate(zip(steps, after)):
        params = {k: p.clone().requires_grad_() for k, p in before.items()}
        logits = torch.func.functional_call(model, params, (xb,))
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, yb), list(params.values()))
        want = {k: p.double() - 0.05 * g.double() for (k, p), g in zip(before.items(), grads)}
        if t % 3 == 0:
            u, s, vh = torch.linalg.svd(before["features.2.weight"].double())
            want["features.2.weight"] -= 0.05 * 0.5 * 2 * s[0] * torch.outer(u[:, 0], vh[0])
            penalties.append(0.5 * s[0].item() ** 2)
        for name, value in want.items():
            torch.testing.assert_close(new[name].double(), value, rtol=0, atol=1e-6, msg=lambda m: f"step {t}: {name}: {m}")
    assert [m["reg_penalty"] for m in run.history] == pytest.approx(
        [sum(penalties[:2]) / 2, sum(penalties[2:]) / 2], rel=1e-5)


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
    for key in ("train_loss", "test_acc", "sigma_1", "reg_penalty"):
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
    assert cached["sigma_1"] == pytest.approx(scratch["sigma_1"], rel=1e-5)


def test_logging_sigma_leaves_spectral_norm_training_unchanged(tmp_path):
    """σ logged after every epoch (eval_every=1) or only after the last: the trained weights and torch's
    own power-iteration vectors are the same bit for bit."""
    trained = []
    for eval_every in (1, 4):
        cfg = config("spectral-norm", epochs=4)
        cfg["train"]["eval_every"] = eval_every
        specreg.run_experiment(cfg, checkpoint_dir=tmp_path / str(eval_every))
        trained.append(specreg.load_checkpoint(tmp_path / str(eval_every))["model"])
    assert any("parametrizations" in key for key in trained[0])
    for key, value in trained[0].items():
        assert torch.equal(value, trained[1][key]), key


def test_run_resolved_trains_a_validated_config_as_run_experiment_does_without_validating_again(monkeypatch):
    """A sweep's trial validates its config once, at its edge, and runs it with run_resolved."""
    from specreg import train

    resolved = specreg.validate_config(config("rep-spectral", epochs=2))
    expected = specreg.run_experiment(resolved)
    monkeypatch.setattr(train, "validate_config", lambda c: pytest.fail("run_resolved validated again"))
    got = specreg.run_resolved(resolved)
    untimed = [[{k: v for k, v in m.items() if k != "epoch_seconds"} for m in r["history"]] for r in (got, expected)]
    assert untimed[0] == untimed[1] and got["clean_acc"] == expected["clean_acc"]


def test_checkpoints_hold_plain_tensors_only(tmp_path):
    specreg.run_experiment(config("rep-spectral", epochs=1), checkpoint_dir=tmp_path)
    state = specreg.load_checkpoint(tmp_path)  # weights_only=True inside
    assert state["epoch"] == 1 and "regularizer" in state


def test_divergence_stops_the_run_with_the_epoch_and_last_metrics():
    """A penalty of strength 1e30 from epoch 3 on blows the weights up: the run stops at epoch 3 and
    reports epoch 2's metrics, all finite."""
    with pytest.raises(specreg.Diverged) as error:
        specreg.run_experiment(config("rep-spectral", epochs=4, burnin=2, strength=1e30))
    assert error.value.epoch == 3
    last = error.value.last_metrics
    assert last["epoch"] == 2 and last["reg_penalty"] == 0.0
    for key in ("train_loss", "train_acc", "test_acc", "sigma_1"):
        assert math.isfinite(last[key]), key


def test_bad_config_fails_before_any_training():
    with pytest.raises(specreg.ConfigError, match="regularizer.strength"):
        specreg.run_experiment(config("rep-spectral", strength=-1.0))


def test_the_attack_block_adds_robustness_metrics():
    cfg = config("rep-spectral", epochs=2)
    cfg["attack"] = {"name": "tangent", "samples": 20, "max_queries": 300, "eps": [0.5, 1.0]}
    result = specreg.run_experiment(cfg)
    for key in ("med_dist", "acc_0.5", "acc_1.0", "adv_auc", "attack_queries_mean"):
        assert key in result
    assert 0.0 <= result["acc_1.0"] <= result["acc_0.5"] <= 1.0
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
