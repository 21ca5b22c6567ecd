"""Which weight layers a regularizer acts on: a searchable string resolved against a model.

Forms: `feature` (every weight layer of `model.features`), `all` (features and readout), `upto:K` (the
first K weight layers in forward order), `stage:K` (ResNet stem and stages 1..K), `layers:A,B` (module
names). Forward order and each layer's input shape come from one traced forward pass.
"""
import re
from dataclasses import dataclass

import torch
from torch import nn

FORMS = ("feature", "all", "upto:K", "stage:K", "layers:NAME,NAME")
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class LayerInfo:
    name: str
    module: nn.Module
    input_shape: tuple  # one sample's shape, without the batch dimension


def weight_layers(model: nn.Module) -> list[LayerInfo]:
    """Linear and Conv2d layers in the order a forward pass calls them, with their input shapes."""
    named = {m: name for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}
    order = []

    def record(module, inputs):
        if module in named and all(info.module is not module for info in order):
            order.append(LayerInfo(named[module], module, tuple(inputs[0].shape[1:])))

    hooks = [m.register_forward_pre_hook(record) for m in named]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *model.input_shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return order


def _is_feature(name: str) -> bool:
    return name.startswith("features.")


def resolve(model: nn.Module, placement: str) -> list[str]:
    """Module names of the weight layers `placement` selects, in forward order."""
    layers = weight_layers(model)
    names = [info.name for info in layers]
    kind, _, arg = placement.partition(":")
    if placement == "feature":
        chosen = [n for n in names if _is_feature(n)]
    elif placement == "all":
        chosen = names
    elif kind == "upto" and re.fullmatch(r"[1-9]\d*", arg):
        k = int(arg)
        if k > len(names):
            raise PlacementError(f"placement {placement!r}: the model has only {len(names)} weight layers")
        chosen = names[:k]
    elif kind == "stage" and re.fullmatch(r"\d+", arg):
        stages = getattr(model.features, "num_stages", None)
        if stages is None:
            raise PlacementError(f"placement {placement!r}: stage:K needs a staged model (resnet18)")
        k = int(arg)
        if k > stages:
            raise PlacementError(f"placement {placement!r}: the model has {stages} stages")
        prefixes = ("features.stem.",) + tuple(f"features.stage{i}." for i in range(1, k + 1))
        chosen = [n for n in names if n.startswith(prefixes)]
    elif kind == "layers" and arg:
        wanted = [a.strip() for a in arg.split(",")]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise PlacementError(f"placement {placement!r}: no weight layer named {unknown}; "
                                 f"the model has {names}")
        chosen = [n for n in names if n in wanted]
    else:
        raise PlacementError(f"placement {placement!r} is not valid; use one of {', '.join(FORMS)}")
    if not chosen:
        raise PlacementError(f"placement {placement!r} selects no weight layer of this model")
    return chosen


def check_syntax(placement: str) -> str:
    """Validate the form of a placement string without a model (for config validation)."""
    kind, _, arg = placement.partition(":")
    ok = (placement in ("feature", "all")
          or (kind in ("upto", "stage") and re.fullmatch(r"[1-9]\d*" if kind == "upto" else r"\d+", arg))
          or (kind == "layers" and all(a.strip() for a in arg.split(","))))
    if not ok:
        raise PlacementError(f"placement {placement!r} is not valid; use one of {', '.join(FORMS)}")
    return placement
