"""The paper recipes in search_spaces/ state the authors' settings (docs/paper_recipe.md); an edit that drifts
from them fails here. Loading only: no data, no training."""
from pathlib import Path

import pytest
import torch
from torch import nn

import specreg
from specreg import models, placement, regularizers
from specreg.config import penalty_start
from specreg_platform.run import burnin
from specreg_platform.space.space import load_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

# Pehlevan-Group/rep-spectral, per file and line (docs/paper_recipe.md, "CIFAR-10 ResNet-18")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # src/data/real_data.py:82
CIFAR_STD = (0.2023, 0.1994, 0.2010)  # src/data/real_data.py:82
STEPS_PER_EPOCH = 49  # 50,000 / 1024, last batch kept (train_reg_resnet.py:99)


@pytest.fixture(scope="module")
def cifar():
    return load_space(SPACES / "cifar10_resnet18.yaml")


def test_cifar10_resnet18_validates_and_runs_on_a_gpu(cifar):
    spec, base = cifar
    assert base["task"] == "supervised" and base["data"]["name"] == "cifar10"
    assert 0 < spec.resources.gpu <= 1
    assert spec.run.shared_burnin


def test_cifar10_resnet18_model_is_theirs(cifar):
    _, base = cifar
    model = base["model"]
    assert model["name"] == "resnet18" and model["width"] == 64  # ResNet.py:168, :375
    assert model["padding_mode"] == "circular"  # architectures/utils.py:91
    assert base["data"]["augment"] == "crop-flip"  # real_data.py:79-80
    mean, std = model["normalize"]  # real_data.py:82, channel averages (one mean and std per model)
    assert mean == pytest.approx(sum(CIFAR_MEAN) / 3, abs=1e-4)
    assert std == pytest.approx(sum(CIFAR_STD) / 3, abs=1e-4)
    assert max(abs(s / std - 1) for s in CIFAR_STD) < 0.008


def test_cifar10_resnet18_training_is_theirs(cifar):
    _, base = cifar
    train = base["train"]
    assert (train["optimizer"], train["lr"], train["momentum"], train["weight_decay"]) == ("sgd", 0.01, 0.9, 1e-4)
    assert train["schedule"] == "constant" and train["batch_size"] == 1024 and train["amp"] is False
    # range(epochs + 1) with --epochs 200, model_e160 trained for 161 epochs (train_reg_resnet.py:134-142)
    assert train["epochs"] == 201
    assert penalty_start({**base, "regularizer": {**base["regularizer"], "kind": "rep-spectral"}}) == 161


def test_cifar10_resnet18_regularizer_cadence_and_layers_are_theirs(cifar):
    spec, base = cifar
    reg = base["regularizer"]
    assert reg["conv_mode"] == "exact" and reg["placement"] == "feature"
    # their dose: steps 0, 24, 48 of the 49 in each regularized epoch (41 epochs) plus one penalty-only step
    # after each of epochs 161..200: 41 * 3 + 40 = 163 penalty gradients
    theirs = 41 * len(range(0, STEPS_PER_EPOCH, 24)) + 40
    first, last = 161 * STEPS_PER_EPOCH, base["train"]["epochs"] * STEPS_PER_EPOCH
    ours = sum(1 for step in range(first, last) if step % reg["every"] == 0)
    assert theirs == 163 and ours == theirs
    points = spec.grid_points()
    arms = {(p["regularizer.kind"], p.get("regularizer.strength")) for p in points}
    assert arms == {("none", None), ("rep-spectral", 1e-2), ("rep-spectral", 5e-3),
                    ("all-layer-spectral", 1e-2), ("all-layer-spectral", 5e-3)}
    assert sorted({p["train.seed"] for p in points}) == [400, 500, 600, 700, 800]
    assert len(points) == 25

    model = models.build(base["model"], (3, 32, 32), 10)
    chosen = placement.resolve(model, "feature")
    convs = [m for name, m in model.named_modules() if name in chosen]
    # their max_layer 4: the stem conv, 16 block convs and 3 downsample convs (ResNet.py:314-337)
    assert len(convs) == 20 and all(isinstance(m, nn.Conv2d) for m in convs)
    assert all(m.padding_mode == "circular" or m.padding == (0, 0) for m in convs)
    assert placement.resolve(model, "all") == chosen + ["head"]  # conv.py:20-27 adds the readout


def test_cifar10_resnet18_attack_is_theirs(cifar):
    _, base = cifar
    attack = base["attack"]
    assert attack["name"] == "tangent" and attack["correct_only"] is True
    assert attack["samples"] == 1000  # --eval-sample-size 1000 (train_resnet.sh:55)
    assert attack["iterations"] == 40 and attack["max_queries"] is None  # --T 40 (eval_black_box_robustness.py:72)
    assert attack["tolerance"] == 1e-5  # eval_black_box_robustness.py:73
    assert (attack["init_evals"], attack["max_evals"]) == (100, 10000)  # black_box.py:132-133


# --- Fashion-MNIST SLP-2000 (docs/paper_recipe.md, "Fashion-MNIST SLP-2000") -------------------------------

FMNIST_SPACES = ("paper_fmnist_slp", "paper_fmnist_slp_dose", "paper_fmnist_slp_readout")


@pytest.fixture(scope="module")
def fmnist():
    return {name: load_space(SPACES / f"{name}.yaml") for name in FMNIST_SPACES}


def resolved(spec, params: dict) -> dict:
    return specreg.validate_config(spec.trial_config(params))


@pytest.mark.parametrize("name", FMNIST_SPACES)
def test_fmnist_slp_model_and_training_are_theirs(fmnist, name):
    _, base = fmnist[name]
    assert base["data"]["name"] == "fashion_mnist"
    torch.manual_seed(0)
    model = models.build(base["model"], (1, 28, 28), 10)
    hidden, readout = model.features[2], model.head[0]
    assert (hidden.in_features, hidden.out_features) == (784, 2000)  # MLP.py:38-51
    assert isinstance(model.features[3], nn.GELU)  # --nl GELU (train_fashion_mnist.sh:18)
    assert model.head[1].factor == pytest.approx(2000 ** -0.5)  # ScaleLayer (MLP.py:24-32, 51)
    weights = torch.cat([hidden.weight.flatten(), hidden.bias, readout.weight.flatten(), readout.bias])
    assert weights.mean().abs() < 1e-4 and weights.std().item() == pytest.approx(0.01, rel=0.01)  # MLP.py:12-21
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(model.features[:2](x), x.flatten(1))  # no normalization (real_data.py:57, 65)
    train = base["train"]
    assert (train["optimizer"], train["lr"], train["momentum"], train["weight_decay"]) == ("sgd", 0.1, 0.9, 1e-4)
    assert (train["batch_size"], train["schedule"]) == (1024, "constant")  # train_fashion_mnist.sh:15-17
    reg = base["regularizer"]
    assert (reg["burnin"], reg["every"], reg["n_power_iterations"]) == (360, 1, 10)  # :11, --reg-freq 1
    attack = base["attack"]
    assert attack["name"] == "tangent" and attack["correct_only"] is True and attack["max_queries"] is None
    assert (attack["init_evals"], attack["max_evals"], attack["tolerance"]) == (100, 10000, 1e-5)
    assert 40 in [*attack["trace"], attack["iterations"]]  # their T = 40 (eval_black_box_robustness.py:72)


def test_fmnist_slp_study_is_four_arms_by_three_seeds_at_their_lambda_and_epochs(fmnist):
    spec, _ = fmnist["paper_fmnist_slp"]
    configs = [resolved(spec, p) for p in spec.grid_points()]
    arms = [(c["train"]["seed"], c["regularizer"]["kind"], c["regularizer"].get("activation_term")) for c in configs]
    assert len(set(arms)) == 12 == 3 * 4
    assert {seed for seed, *_ in arms} == {400, 500, 600}  # the first three of theirs (train_fashion_mnist.sh:25)
    for config in configs:
        assert config["train"]["epochs"] == 400 and config["regularizer"]["strength"] == 1e-3  # :10, :19
        assert config["attack"]["samples"] == 1000 and config["attack"]["iterations"] == 160
        if config["regularizer"]["kind"] != "none":
            assert penalty_start(config) == 360


def test_fmnist_readout_arm_penalizes_their_spectral_layer_alone(fmnist):
    """Their `spectral` sees only lin2 as an nn.Linear of model.model (spectral.py:29-40, MLP.py:51)."""
    spec, _ = fmnist["paper_fmnist_slp_readout"]
    config = resolved(spec, spec.grid_points()[0])
    torch.manual_seed(0)
    model = models.build(config["model"], (1, 28, 28), 10)
    reg = regularizers.build(config["regularizer"]).attach(model)
    assert reg.layer_names == ["head.0"]
    sigma = torch.linalg.svdvals(model.head[0].weight.detach().double())[0].item()
    assert reg.penalty(model).item() == pytest.approx(1e-3 * sigma ** 2, rel=1e-4)
    assert {p["train.seed"] for p in spec.grid_points()} == {400, 500, 600}


def test_fmnist_follow_ups_share_the_main_studys_prefix(fmnist):
    """The dose and readout sweeps run from the main study's 360-epoch prefix of each seed (same burn-in key)."""
    spec, _ = fmnist["paper_fmnist_slp"]
    main = {c["train"]["seed"]: burnin.cache_key(c) for c in (resolved(spec, p) for p in spec.grid_points())}
    for name in ("paper_fmnist_slp_dose", "paper_fmnist_slp_readout"):
        follow_spec, _ = fmnist[name]
        for params in follow_spec.grid_points():
            config = resolved(follow_spec, params)
            assert burnin.cache_key(config) == main[config["train"]["seed"]], name
