import pytest
import torch

from specreg import models, placement


@pytest.fixture(scope="module")
def mlp():
    return models.build({"name": "mlp", "widths": [32, 16]}, (1, 8, 8), 10)


@pytest.fixture(scope="module")
def resnet():
    return models.build({"name": "resnet18", "width": 8}, (3, 32, 32), 10)


@pytest.mark.parametrize("name, spec, shape", [
    ("slp", {"width": 20, "activation": "gelu"}, (1, 8, 8)),
    ("mlp", {"widths": [16, 8]}, (1, 8, 8)),
    ("cnn", {"channels": [4, 8]}, (3, 16, 16)),
    ("resnet18", {"width": 4, "padding_mode": "circular"}, (3, 16, 16)),
    ("mlp", {"widths": [8]}, (2,)),
])
def test_models_split_into_features_and_head(name, spec, shape):
    model = models.build({"name": name, **spec}, shape, 7)
    x = torch.rand(5, *shape)
    features = model.features(x)
    assert features.dim() == 2 and features.shape[0] == 5
    assert torch.allclose(model.head(features), model(x))
    assert model(x).shape == (5, 7)


def test_inputs_are_normalised_inside_the_model():
    model = models.build({"name": "mlp", "widths": [4]}, (1, 2, 2), 2)
    first = model.features[2]
    x = torch.full((1, 1, 2, 2), 0.5)  # the normaliser's mean: the first layer sees zeros
    assert torch.allclose(model.features[:3](x), first.bias)


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
