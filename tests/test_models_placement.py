import pytest
import torch

from specreg import models, placement


@pytest.fixture(scope="module")
def mlp():
    return models.build({"name": "mlp", "widths": [32, 16]}, (1, 8, 8), 10)


@pytest.fixture(scope="module")
def resnet():
    return models.build({"name": "resnet18", "width": 8}, (3, 32, 32), 10)


GELU_MIN = -0.17  # min over z of z·Φ(z) is −0.16997


@pytest.mark.parametrize("name, spec, shape, width, lowest", [
    ("slp", {"width": 20, "activation": "gelu"}, (1, 8, 8), 20, GELU_MIN),
    ("mlp", {"widths": [16, 8]}, (1, 8, 8), 8, 0.0),
    ("cnn", {"channels": [4, 8]}, (3, 16, 16), 8, 0.0),
    ("resnet18", {"width": 4, "padding_mode": "circular"}, (3, 16, 16), 32, 0.0),
    ("mlp", {"widths": [8]}, (2,), 8, 0.0),
])
def test_models_split_into_features_and_head(name, spec, shape, width, lowest):
    """`features` ends with the last hidden layer's activation (its width, its range); `head` is an affine
    readout holding the one weight layer that `features` does not."""
    model = models.build({"name": name, **spec}, shape, 7)
    x = torch.rand(5, *shape)
    features = model.features(x)
    assert features.shape == (5, width)
    assert features.min() >= lowest  # after the nonlinearity, not before it
    a, b = features[:2], features[2:4]
    torch.testing.assert_close(model.head(0.3 * a + 0.7 * b), 0.3 * model.head(a) + 0.7 * model.head(b))
    layers = placement.resolve(model, "all")
    assert layers[:-1] == placement.resolve(model, "feature") and layers[-1].startswith("head")
    assert model(x).shape == (5, 7)


def test_inputs_are_normalised_inside_the_model_with_the_training_sets_statistics():
    model = models.build({"name": "cnn", "channels": [4]}, (3, 4, 4), 2)
    gen = torch.Generator().manual_seed(0)
    scale, shift = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.5, 0.7])
    x_train = torch.randn(500, 3, 4, 4, generator=gen) * scale[:, None, None] + shift[:, None, None]
    models.fit_normalization(model.features, x_train)
    normalized = model.features[0](x_train)
    per_channel = normalized.transpose(0, 1).reshape(3, -1)  # statistics computed here, independently
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-4)
    assert torch.allclose(model.state_dict()["features.0.mean"], x_train.mean((0, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("normalize, expected", [("none", lambda x: x), ([0.5, 0.25], lambda x: (x - 0.5) / 0.25)])
def test_normalize_none_and_fixed(normalize, expected):
    model = models.build({"name": "mlp", "widths": [4], "normalize": normalize}, (1, 2, 2), 2)
    models.fit_normalization(model.features, torch.rand(10, 1, 2, 2))  # only `dataset` takes the data's
    x = torch.rand(3, 1, 2, 2)
    assert torch.allclose(model.features[0](x), expected(x))


def test_the_authors_slp_parametrization():
    """init N(0, 0.01²) for weights and biases, logits times 1/sqrt(width) (Yang et al., MLP.py)."""
    torch.manual_seed(0)
    spec = {"name": "slp", "width": 2000, "init_std": 0.01, "readout_scale": "1/sqrt(width)", "normalize": "none"}
    model = models.build(spec, (1, 28, 28), 10)
    first, readout = model.features[2], model.head[0]
    for p in (first.weight, first.bias, readout.weight):
        assert abs(p.std().item() - 0.01) < 5e-4 and abs(p.mean().item()) < 5e-4
    x = torch.rand(4, 1, 28, 28)
    by_hand = (torch.nn.functional.gelu(x.flatten(1) @ first.weight.T + first.bias) @ readout.weight.T
               + readout.bias) / 2000 ** 0.5
    assert torch.allclose(model(x), by_hand, atol=1e-6)
    assert placement.resolve(model, "all") == ["features.2", "head.0"]


def test_resnet_has_cifar_stem_and_shortcuts(resnet):
    stem = resnet.features.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in resnet.modules())
    names = placement.resolve(resnet, "feature")
    assert len(names) == 20 and sum("shortcut" in n for n in names) == 3


def test_placement_forms_on_an_mlp(mlp):
    assert placement.resolve(mlp, "feature") == ["features.2", "features.4"]
    assert placement.resolve(mlp, "all") == ["features.2", "features.4", "head"]
    assert placement.resolve(mlp, "upto:1") == ["features.2"]
    assert placement.resolve(mlp, "upto:3") == ["features.2", "features.4", "head"]
    assert placement.resolve(mlp, "layers:head,features.2") == ["features.2", "head"]
    info = placement.weight_layers(mlp)
    assert [i.input_shape for i in info] == [(64,), (32,), (16,)]


def test_placement_forms_on_a_resnet(resnet):
    feature = placement.resolve(resnet, "feature")
    assert placement.resolve(resnet, "all") == feature + ["head"]
    assert placement.resolve(resnet, "stage:0") == ["features.stem.0"]
    stage1 = placement.resolve(resnet, "stage:1")
    assert stage1 == ["features.stem.0"] + [f"features.stage1.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]
    stage2 = placement.resolve(resnet, "stage:2")
    assert stage2[:5] == stage1 and "features.stage2.0.shortcut.0" in stage2 and len(stage2) == 10
    assert placement.resolve(resnet, "stage:4") == feature
    assert placement.resolve(resnet, "upto:2") == feature[:2]
    shapes = {i.name: i.input_shape for i in placement.weight_layers(resnet)}
    assert shapes["features.stage2.0.conv1"] == (8, 32, 32)
    assert shapes["features.stage2.0.conv2"] == (16, 16, 16)


@pytest.mark.parametrize("bad, message", [
    ("upto:4", "only 3 weight layers"), ("stage:1", "resnet18"), ("layers:nope", "no weight layer named"),
    ("upto:0", "not valid"), ("everything", "not valid"),
])
def test_bad_placements_name_the_fault(mlp, bad, message):
    with pytest.raises(placement.PlacementError, match=message):
        placement.resolve(mlp, bad)
