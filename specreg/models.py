"""Models with an explicit representation map (`.features`) and readout (`.head`).

Every model normalises its input itself, so data, attacks and perturbations all live in [0, 1] pixel
space. `normalize` picks the statistics: `dataset` (default: the training set's per-channel mean and std,
set by `fit_normalization` when the data loads and stored as buffers), `none`, or fixed `[mean, std]`.
Add a model by writing a builder and registering it in `MODELS`.
"""
import inspect
import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


NORMALIZATIONS = ("dataset", "none")


class Normalize(nn.Module):
    """Per-channel standardisation (not a weight layer). `source` says where its statistics come from:
    `dataset` (filled in by `fit_normalization`), `none` (identity) or `fixed` (given)."""

    def __init__(self, channels: int, normalize="dataset"):
        super().__init__()
        if normalize in NORMALIZATIONS:
            self.source, mean, std = normalize, 0.0, 1.0
        else:
            self.source, (mean, std) = "fixed", _fixed_statistics(normalize)
        self.register_buffer("mean", torch.full((channels,), float(mean)))
        self.register_buffer("std", torch.full((channels,), float(std)))

    def forward(self, x):
        if self.source == "none":
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fixed_statistics(value):
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)) and value[1] > 0):
        raise ValueError(f"model.normalize: must be 'dataset', 'none' or [mean, std] with std > 0, got {value!r}")
    return value


@torch.no_grad()
def fit_normalization(model: nn.Module, x_train: torch.Tensor) -> None:
    """Set every `dataset` Normalize of `model` to the per-channel mean and std of `x_train` (N, C, ...)."""
    dims = [0, *range(2, x_train.dim())]
    std, mean = torch.std_mean(x_train, dim=dims)
    for module in model.modules():
        if isinstance(module, Normalize) and module.source == "dataset":
            module.mean.copy_(mean)
            module.std.copy_(std.clamp(min=1e-6))


class Scale(nn.Module):
    """Multiply by a constant: the readout scale of a mean-field parametrization (not a weight layer)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor

    def extra_repr(self):
        return f"factor={self.factor:.6g}"


class Classifier(nn.Module):
    """features → head; the split is what the regularizers and transfer tasks rely on."""

    def __init__(self, features: nn.Module, head: nn.Module, input_shape: tuple):
        super().__init__()
        self.features = features
        self.head = head
        self.input_shape = tuple(input_shape)

    def forward(self, x):
        return self.head(self.features(x))


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"model.activation: unknown {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _needs_input(name: str, input_shape, ranks) -> None:
    """A builder's check that its input has a rank it can take (1: flat, 3: C×H×W)."""
    if len(input_shape) not in ranks:
        wanted = " or ".join({1: "a flat", 3: "a C×H×W image"}[r] for r in ranks)
        raise ValueError(f"model.name: {name} needs {wanted} input, got {tuple(input_shape)}")


def _readout_factor(readout_scale, width: int) -> float:
    if readout_scale == "1/sqrt(width)":
        return width ** -0.5
    if _is_number(readout_scale) and readout_scale > 0:
        return float(readout_scale)
    raise ValueError(f"model.readout_scale: must be a number > 0 or '1/sqrt(width)', got {readout_scale!r}")


def mlp(input_shape, num_classes, widths=(256,), activation="relu", normalize="dataset", init_std=None,
        readout_scale=1.0):
    """Fully connected network; the representation is the last hidden layer's activation.

    init_std: draw every weight and bias from N(0, init_std²) instead of PyTorch's default init.
    readout_scale: multiply the logits by this (`1/sqrt(width)`: by the last hidden width's inverse root).
    Yang et al.'s SLP is `init_std: 0.01, readout_scale: 1/sqrt(width), normalize: none`."""
    _needs_input("mlp", input_shape, (1, 3))
    layers = [Normalize(input_shape[0], normalize), nn.Flatten()]
    fan_in = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(fan_in, width), _activation(activation)]
        fan_in = width
    factor = _readout_factor(readout_scale, fan_in)
    head = nn.Linear(fan_in, num_classes)
    if factor != 1.0:
        head = nn.Sequential(head, Scale(factor))
    model = Classifier(nn.Sequential(*layers), head, input_shape)
    if init_std is not None:
        if not (_is_number(init_std) and init_std > 0):
            raise ValueError(f"model.init_std: must be a number > 0, got {init_std!r}")
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, init_std)
                nn.init.normal_(module.bias, 0.0, init_std)
    return model


def slp(input_shape, num_classes, width=2000, activation="gelu", normalize="dataset", init_std=None,
        readout_scale=1.0):
    """One hidden layer (the paper's 2000-unit GELU network)."""
    return mlp(input_shape, num_classes, widths=(width,), activation=activation, normalize=normalize,
               init_std=init_std, readout_scale=readout_scale)


def cnn(input_shape, num_classes, channels=(32, 64, 64), activation="relu", padding_mode="zeros",
        normalize="dataset"):
    """A small conv net: 3×3 convs (stride 2 after the first), global average pooling."""
    _needs_input("cnn", input_shape, (3,))
    layers = [Normalize(input_shape[0], normalize)]
    c_in = input_shape[0]
    for i, c_out in enumerate(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1,
                             padding_mode=padding_mode), _activation(activation)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(c_in, num_classes), input_shape)


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, padding_mode):
        super().__init__()
        conv = dict(kernel_size=3, padding=1, bias=False, padding_mode=padding_mode)
        self.conv1 = nn.Conv2d(c_in, c_out, stride=stride, **conv)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, stride=1, **conv)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetFeatures(nn.Module):
    """CIFAR ResNet-18 trunk: 3×3 stem without max-pool, four stages, global average pooling."""

    def __init__(self, in_channels, width=64, blocks=(2, 2, 2, 2), padding_mode="zeros", normalize="dataset"):
        super().__init__()
        self.normalize = Normalize(in_channels, normalize)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False, padding_mode=padding_mode),
            nn.BatchNorm2d(width), nn.ReLU())
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            stage = [BasicBlock(c_in if j == 0 else c_out, c_out, (1 if i == 0 else 2) if j == 0 else 1,
                                padding_mode) for j in range(n)]
            self.add_module(f"stage{i + 1}", nn.Sequential(*stage))
            c_in = c_out
        self.out_features = c_in
        self.num_stages = len(blocks)

    def forward(self, x):
        x = self.stem(self.normalize(x))
        for i in range(self.num_stages):
            x = getattr(self, f"stage{i + 1}")(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def resnet18(input_shape, num_classes, width=64, padding_mode="zeros", normalize="dataset"):
    """ResNet-18 with the CIFAR stem; `padding_mode: circular` makes the FFT conv norm exact."""
    _needs_input("resnet18", input_shape, (3,))
    features = ResNetFeatures(input_shape[0], width=width, padding_mode=padding_mode, normalize=normalize)
    return Classifier(features, nn.Linear(features.out_features, num_classes), input_shape)


MODELS = {"slp": slp, "mlp": mlp, "cnn": cnn, "resnet18": resnet18}


def model_options(name: str) -> tuple:
    """The options model `name` takes: its builder's parameters after (input_shape, num_classes)."""
    return tuple(inspect.signature(MODELS[name]).parameters)[2:]


def build(spec: dict, input_shape, num_classes: int) -> Classifier:
    """Build `spec['name']` with the remaining keys as options."""
    options = dict(spec)
    name = options.pop("name")
    if name not in MODELS:
        raise ValueError(f"model.name: unknown {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes, **options)
