"""The paper recipes in search_spaces/ state the authors' settings (docs/paper_recipe.md); an edit that drifts
from them fails here. Loading only: no data, no training."""
from pathlib import Path

import pytest
from torch import nn

from specreg import models, placement
from specreg.config import penalty_start
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
