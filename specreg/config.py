"""The experiment config: pydantic models that name the bad key and value on every error."""
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import placement as placement_mod

REGULARIZER_KINDS = ("none", "rep-spectral", "all-layer-spectral", "spectral-decay", "spectral-norm", "jacobian")
ATTACK_NAMES = ("tangent", "hsja", "boundary-search")
# Input shapes of the named datasets, so a placement can be checked against the model before any data loads.
KNOWN_INPUT_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                      "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "synthetic-xor": (2,),
                      "synthetic-sin": (2,)}
KNOWN_NUM_CLASSES = {"cifar100": 100, "synthetic-xor": 2, "synthetic-sin": 2}


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the value."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # loader-specific keys are checked by specreg.data
    name: str


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # builder options are checked by specreg.models
    name: Literal["slp", "mlp", "cnn", "resnet18"]


class TrainSpec(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_size: int = Field(30, ge=1)  # epochs between decays for schedule=step
    gamma: float = Field(0.1, gt=0, le=1)
    seed: int = 0
    device: str = "auto"
    amp: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


class RegularizerSpec(Strict):
    kind: Literal[REGULARIZER_KINDS] = "none"
    strength: float = Field(0.0, ge=0)
    placement: Optional[str] = None  # default per kind: `feature`; all-layer-spectral always uses `all`
    every: int = Field(1, ge=1)
    burnin: float = Field(0.0, ge=0, lt=1)
    n_power_iterations: int = Field(1, ge=1)
    target_exponent: float = Field(1.0, gt=0)
    tau: int = Field(10, ge=1)
    conv_mode: Literal["exact", "reshape"] = "exact"
    activation_term: bool = False  # rep-spectral on MLPs: add the bound's activation-derivative term
    projections: int = Field(1, ge=1)  # jacobian: random projections per step
    refresh_samples: int = Field(2048, ge=2)  # spectral-decay: sample size for the per-epoch eigenbasis

    @field_validator("placement")
    @classmethod
    def _placement(cls, value):
        return None if value is None else placement_mod.check_syntax(value)


class AttackSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # attack options pass through to specreg.attacks.run
    name: Literal[ATTACK_NAMES] = "tangent"
    samples: int = Field(500, ge=1)
    max_queries: int = Field(2000, ge=1)
    eps: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    seed: int = 0
    start_pool: int = Field(1000, ge=0)

    @field_validator("eps")
    @classmethod
    def _eps(cls, value):
        bad = [e for e in value if not e > 0]
        if bad:
            raise ValueError(f"every eps must be > 0, got {bad}")
        return sorted(value)


class ExperimentConfig(Strict):
    task: Literal["supervised"] = "supervised"
    data: DataSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    regularizer: RegularizerSpec = Field(default_factory=RegularizerSpec)
    attack: Optional[AttackSpec] = None

    @model_validator(mode="after")
    def _strength_needed(self):
        reg = self.regularizer
        if reg.kind == "all-layer-spectral":
            reg.placement = "all"
        elif reg.placement is None:
            reg.placement = "feature"
        return self


def _format(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "config"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{key}: {e['msg']}{shown}")
    return "; ".join(lines)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a config and return it with every default filled in; raise ConfigError naming the fault.

    Where the dataset's input shape is known without loading it, the model is built on the meta device
    and the placement resolved, so a placement that selects no layer fails here, not mid-sweep.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    try:
        resolved = ExperimentConfig.model_validate(config)
    except ValidationError as error:
        raise ConfigError(_format(error)) from None
    out = resolved.model_dump()
    shape = KNOWN_INPUT_SHAPES.get(out["data"]["name"])
    if shape is not None:
        check_model(out, shape, KNOWN_NUM_CLASSES.get(out["data"]["name"], 10))
    return out


def check_model(config: dict, input_shape, num_classes: int) -> None:
    """Build the model without allocating memory and resolve the placement against it."""
    import torch

    from . import models

    try:
        with torch.device("meta"):
            model = models.build(config["model"], input_shape, num_classes)
    except TypeError as error:
        raise ConfigError(f"model: {error}") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    model = model.to_empty(device="cpu")
    try:
        placement_mod.resolve(model, config["regularizer"]["placement"])
    except placement_mod.PlacementError as error:
        raise ConfigError(f"regularizer.placement: {error}") from None
