"""Self-supervised pretraining (Barlow Twins, SimCLR) of `model.features`, then a linear probe.

The projector head exists only during pretraining and is discarded; the regularizer is attached to the
Classifier `model`, so it sees the encoder (and never the projector). Views are drawn on the device for
the whole batch at once: a random resized crop (with a flip where the dataset allows it) as one
`grid_sample`, brightness / contrast / saturation jitter, random grayscale and pixel noise.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import models, regularizers
from .config import check_model
from .loop import Phase, Run, encoder_metrics
from .probe import knn_accuracy, probe_head, probe_phase

# Datasets whose classes survive a horizontal flip (digits do not), as the dataset registry declares them.
FLIPPABLE = frozenset(name for name, d in data_mod.DATASETS.items() if d.flippable)
NO_AUGMENT = {"crop": 1.0, "flip": False, "jitter": 0.0, "grayscale": 0.0, "noise": 0.0}


def default_augment(data) -> dict:
    """SimCLR-style views for RGB images, crop + jitter + noise for grayscale ones, noise for points."""
    if len(data.input_shape) != 3:
        return {**NO_AUGMENT, "noise": 0.05}
    if data.input_shape[0] == 3:
        return {"crop": 0.2, "flip": data.name in FLIPPABLE, "jitter": 0.4, "grayscale": 0.2, "noise": 0.0}
    return {"crop": 0.4, "flip": data.name in FLIPPABLE, "jitter": 0.4, "grayscale": 0.0, "noise": 0.1}


def augment_settings(spec, data) -> dict:
    """`ssl.augment` resolved: `default`, `none`, or a mapping overriding keys of the default."""
    if spec == "none":
        return dict(NO_AUGMENT)
    if spec == "default":
        return default_augment(data)
    return {**default_augment(data), **{k: v for k, v in spec.items() if v is not None}}


def _luminance(x):
    return (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def resized_crop(x, min_area: float, flip: bool, rand):
    """A random crop of area in [min_area, 1] and aspect ratio in [3/4, 4/3], resized back, mirrored with
    probability 1/2 if `flip`: one affine grid per sample, one bilinear grid_sample for the batch."""
    n = len(x)
    area = min_area + (1 - min_area) * rand(n)
    ratio = ((2 * rand(n) - 1) * math.log(4 / 3)).exp() if min_area < 1 else torch.ones_like(area)
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    mirror = torch.where(rand(n) < 0.5, -1.0, 1.0) if flip else torch.ones_like(area)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * mirror, (2 * rand(n) - 1) * (1 - w)
    theta[:, 1, 1], theta[:, 1, 2] = h, (2 * rand(n) - 1) * (1 - h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x, settings: dict, generator):
    """One random view of every input of the batch, drawn on x's device with `generator`."""
    rand = functools.partial(torch.rand, generator=generator, device=x.device)
    if x.dim() == 4:
        if settings["crop"] < 1 or settings["flip"]:
            x = resized_crop(x, settings["crop"], settings["flip"], rand)
        if settings["jitter"] > 0:
            factor = lambda: 1 + settings["jitter"] * (2 * rand(len(x), 1, 1, 1) - 1)  # noqa: E731
            x = x * factor()  # brightness
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * factor() + mean  # contrast
            if x.shape[1] == 3:
                gray = _luminance(x)
                x = (x - gray) * factor() + gray  # saturation
            x = x.clamp(0, 1)
        if settings["grayscale"] > 0 and x.shape[1] == 3:
            x = torch.where(rand(len(x), 1, 1, 1) < settings["grayscale"], _luminance(x), x)
    if settings["noise"] > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        x = (x + settings["noise"] * noise).clamp(0, 1)
    return x


def projector(in_features: int, widths) -> nn.Sequential:
    """Linear → BatchNorm → ReLU per hidden width, then a linear output (Barlow Twins / SimCLR heads)."""
    layers = []
    for width in widths[:-1]:
        layers += [nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, widths[-1]))


def barlow_twins_loss(z1, z2, offdiag_weight: float):
    """Σ_i (1 − C_ii)² + w Σ_{i≠j} C_ij², C the cross-correlation of the batch-standardized embeddings."""
    z1 = (z1 - z1.mean(0)) / (z1.var(0, unbiased=False) + 1e-5).sqrt()
    z2 = (z2 - z2.mean(0)) / (z2.var(0, unbiased=False) + 1e-5).sqrt()
    c = z1.T @ z2 / len(z1)
    on_diagonal = torch.diagonal(c)
    return (on_diagonal - 1).pow(2).sum() + offdiag_weight * (c.pow(2).sum() - on_diagonal.pow(2).sum())


def nt_xent_loss(z1, z2, temperature: float):
    """SimCLR's NT-Xent: each view must pick its partner among the other 2N − 1 embeddings."""
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -math.inf)
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partners)


def ssl_loss(method: str, spec: dict):
    if method == "barlow":
        return functools.partial(barlow_twins_loss, offdiag_weight=spec["offdiag_weight"])
    return functools.partial(nt_xent_loss, temperature=spec["temperature"])


def experiment(config: dict, device, **run_options) -> dict:
    """Pretrain the encoder on two views per image, then probe it; the final classifier is encoder + probe."""
    spec = config["ssl"]
    data = data_mod.load({"seed": config["train"]["seed"], **config["data"]}, device=device)
    check_model(config, data.input_shape, data.num_classes)
    model = models.build(config["model"], data.input_shape, data.num_classes)
    models.fit_normalization(model.features, data.x_train)
    projection = projector(model.head.in_features, spec["projector"]).to(device)
    model.head = probe_head(model.head)
    model = model.to(device)
    regularizer = regularizers.build(config["regularizer"]).attach(model).to(device)
    run = Run(config, device, {"model": model, "projector": projection}, regularizer, model, **run_options)
    settings, criterion = augment_settings(spec["augment"], data), ssl_loss(spec["method"], spec)

    def loss(xb, yb):
        views = torch.cat([augment(xb, settings, run.augment_generator) for _ in range(2)])
        z = projection(model.features(views)).float()
        with torch.autocast(z.device.type, enabled=False):  # correlations / similarities in fp32
            return criterion(*z.chunk(2)), None

    def evaluate(full):
        return {"pretrain/knn_acc": knn_accuracy(model, data),
                **encoder_metrics(regularizer, model, data.x_test, full)}

    pretrain = Phase("pretrain", nn.ModuleList([model.features, projection]), loss, data.x_train, data.y_train,
                     config["train"], evaluate, classifier=model, drop_last=True)
    if not (run.fit(pretrain) and run.fit(probe_phase(config, model, data))):
        return run.summary()
    # the probe leaves the encoder as pretraining's last epoch left it, so its kNN accuracy is that epoch's
    return run.finish(model, data.x_test, data.y_test, knn_acc=run.summary()["pretrain/knn_acc"])
