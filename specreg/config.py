"""The experiment config: pydantic models that name the bad key and value on every error."""
import difflib
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from . import attacks, models, regularizers
from . import data as data_mod
from . import placement as placement_mod
from .robustness import DISTANCE_METRICS, radius_metric

TASKS = ("supervised", "ssl", "transfer")
# The names the schema accepts are the registries' (one source: registering an entry adds it here).
REGULARIZER_KINDS = tuple(regularizers.REGULARIZERS)
ATTACK_NAMES = tuple(attacks.ATTACKS)
MODEL_NAMES = tuple(models.MODELS)
# Input shapes of the named datasets, so a placement can be checked against the model before any data loads
# (the dataset registry's facts).
KNOWN_INPUT_SHAPES = {name: d.input_shape for name, d in data_mod.DATASETS.items() if d.input_shape is not None}
KNOWN_NUM_CLASSES = {name: d.num_classes for name, d in data_mod.DATASETS.items() if d.num_classes is not None}


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the value."""


class Strict(BaseModel):
    """A schema model that refuses an unknown key (the platform's search-space schema uses it too)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def did_you_mean(word, choices) -> str:
    """` (did you mean 'x'?)` where one of choices is close to word (difflib), else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _refuse_unknown(spec: BaseModel, allowed, what: str) -> None:
    """A block's keys beyond its declared fields must be among the options its registry entry reads."""
    allowed = set(allowed) | set(type(spec).model_fields)
    unknown = sorted(set(spec.model_extra or {}) - allowed)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} for {what}{did_you_mean(unknown[0], allowed)}; "
                         f"allowed: {', '.join(sorted(allowed))}")


class DataSpec(BaseModel):
    # A loader's own keys pass through to specreg.data; which keys a dataset reads is its registry entry's.
    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="after")
    def _known(self):
        if self.name not in data_mod.DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}{did_you_mean(self.name, data_mod.DATASETS)}; "
                             f"datasets: {', '.join(sorted(data_mod.DATASETS))}")
        _refuse_unknown(self, data_mod.dataset_options(self.name), f"dataset {self.name!r}")
        return self


class ModelSpec(BaseModel):
    # A builder's options pass through to specreg.models; which it takes is its registry entry's (signature).
    model_config = ConfigDict(extra="allow")
    name: Literal[MODEL_NAMES]

    @model_validator(mode="after")
    def _known_options(self):
        _refuse_unknown(self, models.model_options(self.name), f"model {self.name!r}")
        return self


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
    # bf16 autocast on CUDA. Ignored with a warning on a CPU, so that a space written for GPUs also runs
    # where none is.
    # On an H200 it did not pay for the paper's small models (docs/benchmarks_gpu.md).
    amp: bool = False
    # Epochs between evaluations of the encoder's spectral metrics (σ per layer, α̂ of the feature spectrum,
    # about 1.5 s for the SLP-2000 on a CPU); test accuracy is evaluated after every epoch, and everything
    # after a phase's last epoch and at the end of the burn-in.
    eval_every: int = Field(1, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


# regularizer.*: `kind` and the options the registry's classes declare (regularizers.option_fields), so a
# new regularizer's options are declared in its own class.
RegularizerSpec = create_model("RegularizerSpec", __base__=Strict, kind=(Literal[REGULARIZER_KINDS], "none"),
                               **regularizers.option_fields())


class AttackSpec(BaseModel):
    # Attack options pass through to specreg.attacks.run; which ones an attack reads is its registry's.
    model_config = ConfigDict(extra="allow")
    name: Literal[ATTACK_NAMES] = "tangent"
    samples: int = Field(500, ge=1)
    # Queries per point; null: no budget, the attack stops after `iterations` (one of the two is required).
    max_queries: Optional[int] = Field(2000, ge=1)
    eps: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    seed: int = 0
    start_pool: int = Field(1000, ge=0)
    # Attack the first `samples` correctly classified test points (Yang et al.'s protocol) instead of the
    # first `samples` test points with misclassified ones at distance 0.
    correct_only: bool = False

    @model_validator(mode="after")
    def _known_options(self):
        _refuse_unknown(self, attacks.attack_options(self.name), f"attack {self.name!r}")
        return self

    @model_validator(mode="after")
    def _stopping_rule(self):
        if self.max_queries is None and (self.model_extra or {}).get("iterations") is None:
            raise ValueError("max_queries: null needs `iterations` (the attack must stop somewhere)")
        return self

    @field_validator("eps")
    @classmethod
    def _eps(cls, value):
        bad = [e for e in value if not e > 0]
        if bad:
            raise ValueError(f"every eps must be > 0, got {bad}")
        return sorted(value)


class AugmentSpec(Strict):
    """SSL views; a key left out keeps the dataset's default (see specreg.ssl.default_augment)."""
    crop: Optional[float] = Field(None, gt=0, le=1)  # smallest crop area (fraction of the image); 1: no crop
    flip: Optional[bool] = None  # random horizontal flip
    jitter: Optional[float] = Field(None, ge=0, lt=1)  # brightness / contrast / saturation factor range
    grayscale: Optional[float] = Field(None, ge=0, le=1)  # probability (RGB only)
    noise: Optional[float] = Field(None, ge=0)  # std of additive Gaussian pixel noise


class SSLSpec(Strict):
    method: Literal["barlow", "simclr"]
    projector: list[int] = Field(default_factory=lambda: [512, 128], min_length=1)
    temperature: float = Field(0.5, gt=0)  # simclr
    offdiag_weight: float = Field(5e-3, ge=0)  # barlow
    augment: Union[Literal["default", "none"], AugmentSpec] = "default"

    @field_validator("projector")
    @classmethod
    def _dims(cls, value):
        if any(d < 1 for d in value):
            raise ValueError(f"every projector width must be >= 1, got {value}")
        return value


class ProbeSpec(Strict):
    """The linear readout trained on frozen features (Adam, cosine schedule)."""
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(256, ge=1)
    weight_decay: float = Field(0.0, ge=0)


class SourceSpec(Strict):
    data: DataSpec
    epochs: int = Field(ge=1)


class TransferSpec(Strict):
    mode: Literal["probe", "finetune"] = "probe"
    l2sp: float = Field(0.0, ge=0)  # finetune: strength/2 · ||w - w_source||² over the encoder (Li et al. 2018)


# The sections each task reads beyond data/model/train/regularizer/attack; the others must be absent.
TASK_SECTIONS = {"supervised": (), "ssl": ("ssl", "probe"), "transfer": ("source", "transfer", "probe")}


class ExperimentConfig(Strict):
    task: Literal[TASKS] = "supervised"
    data: DataSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    regularizer: RegularizerSpec = Field(default_factory=RegularizerSpec)
    attack: Optional[AttackSpec] = None
    ssl: Optional[SSLSpec] = None
    probe: Optional[ProbeSpec] = None
    source: Optional[SourceSpec] = None
    transfer: Optional[TransferSpec] = None

    @model_validator(mode="after")
    def _default_placement(self):
        reg = self.regularizer
        reg.placement = regularizers.REGULARIZERS[reg.kind].FIXED_PLACEMENT or reg.placement or "feature"
        return self

    @model_validator(mode="after")
    def _task_sections(self):
        wanted = TASK_SECTIONS[self.task]
        for section in ("ssl", "probe", "source", "transfer"):
            if getattr(self, section) is not None and section not in wanted:
                raise ValueError(f"{section}: not used by task {self.task!r}")
        if self.task == "ssl" and self.ssl is None:
            raise ValueError("ssl: required for task 'ssl' (at least {method: barlow | simclr})")
        if self.task == "transfer" and self.source is None:
            raise ValueError("source: required for task 'transfer' ({data: {...}, epochs: N})")
        if "probe" in wanted and self.probe is None:
            self.probe = ProbeSpec()
        if self.task == "transfer" and self.transfer is None:
            self.transfer = TransferSpec()
        return self

    @model_validator(mode="after")
    def _readout_scale(self):
        scale = (self.model.model_extra or {}).get("readout_scale", 1.0)
        if self.task != "supervised" and scale != 1.0:
            raise ValueError(f"model.readout_scale: only for task 'supervised' (got {scale!r}); the probe and "
                             "source heads are plain linear readouts")
        return self

    @model_validator(mode="after")
    def _regularizer_per_task(self):
        reg = self.regularizer
        entry = regularizers.REGULARIZERS[reg.kind]
        if self.task != "transfer":
            if reg.stage is not None:
                raise ValueError(f"regularizer.stage: only for task 'transfer' (got {reg.stage!r})")
            if self.task == "ssl" and entry.PENALIZES_READOUT:
                raise ValueError(f"regularizer.kind: {reg.kind} regularizes the readout, which task 'ssl' does "
                                 "not train; use rep-spectral")
            return self
        reg.stage = reg.stage or "source"
        if not entry.STAGEABLE:
            raise ValueError(f"regularizer.kind: {reg.kind} stays in the model for the rest of the run and "
                             "cannot be confined to one stage of task 'transfer'")
        if reg.stage != "source" and self.transfer.mode == "probe":
            raise ValueError(f"regularizer.stage: {reg.stage!r} regularizes the target phase, but "
                             "transfer.mode 'probe' freezes the encoder there; use source")
        return self


def _keys_at(schema: type[BaseModel], loc) -> list[str]:
    """The keys the schema declares at `loc` (a pydantic error's location), or [] where it is no model."""
    model = schema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def format_validation_error(error: ValidationError, schema: type[BaseModel], root: str = "config",
                            separator: str = "; ") -> str:
    """One line per fault of a pydantic error from validating `schema`: the dotted key (`root` for the whole
    document), the message and the offending value, and for an unknown key the close declared one (the
    platform formats a search-space file's errors with it too)."""
    lines = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or root
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key{did_you_mean(e['loc'][-1], _keys_at(schema, e['loc'][:-1]))}")
            continue
        value = e.get("input")
        shown = "" if isinstance(value, dict) or e["type"] == "missing" else f" (got {value!r})"
        lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return separator.join(lines)


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
        raise ConfigError(format_validation_error(error, ExperimentConfig)) from None
    out = resolved.model_dump()
    for section in ("ssl", "probe", "source", "transfer"):  # absent, not null, where the task does not use them
        if out[section] is None:
            del out[section]
    if out["regularizer"]["stage"] is None:
        del out["regularizer"]["stage"]
    check_burnin(out)
    shape = KNOWN_INPUT_SHAPES.get(out["data"]["name"])
    if shape is not None:
        check_model(out, shape, KNOWN_NUM_CLASSES.get(out["data"]["name"], 10))
    if out["task"] == "transfer":
        check_shapes(shape, KNOWN_INPUT_SHAPES.get(out["source"]["data"]["name"]))
    return out


def check_shapes(target, source) -> None:
    """Transfer needs one input shape for both tasks (None: not known before loading)."""
    if target is not None and source is not None and tuple(target) != tuple(source):
        raise ConfigError(f"source.data: input shape {tuple(source)} differs from the target data's "
                          f"{tuple(target)}")


def phase_epochs(config: dict) -> dict[str, int]:
    """The phases a resolved config trains, in order, with their epochs (run_experiment's epoch count
    runs across them)."""
    if config["task"] == "supervised":
        return {"train": config["train"]["epochs"]}
    if config["task"] == "ssl":
        return {"pretrain": config["train"]["epochs"], "probe": config["probe"]["epochs"]}
    target = config["transfer"]["mode"]
    epochs = config["probe"]["epochs"] if target == "probe" else config["train"]["epochs"]
    return {"pretrain": config["source"]["epochs"], target: epochs}


def reported_metrics(config: dict) -> dict[str, frozenset]:
    """The scalar metrics a run of a resolved config reports, besides `sigma_K` (σ of the feature and
    regularized layers by position in forward order, wherever `alpha_hat` is): per phase (phase_epochs'
    names), those every epoch of it reports; under "final", those of the finished run (the last value of
    every epoch metric, the final evaluation and, with an attack block, the robustness metrics; with the
    attack's `trace`, the distance metrics' values after each traced iteration come apart, as
    `attack_trace`). tests/test_config.py checks these against what run_experiment emits for every task."""
    task, reg = config["task"], config["regularizer"]
    stage = reg.get("stage")
    evaluated = {"alpha_hat"} if config["train"]["eval_every"] == 1 else set()
    common = {"epoch", "epoch_seconds"}

    def phase(prefix, accuracy, test, regularized, encoder):
        names = {f"{prefix}train_loss", f"{prefix}lr", test} | common
        names |= {f"{prefix}train_acc"} if accuracy else set()
        names |= {f"{prefix}reg_penalty"} if regularized else set()
        return frozenset(names | (evaluated if encoder else set()))

    probe = phase("probe/", True, "probe/test_acc", False, False)
    if task == "supervised":
        phases = {"train": phase("", True, "test_acc", True, True)}
    elif task == "ssl":
        phases = {"pretrain": phase("pretrain/", False, "pretrain/knn_acc", True, True), "probe": probe}
    else:
        phases = {"pretrain": phase("pretrain/", True, "pretrain/test_acc", stage != "target", True)}
        phases[config["transfer"]["mode"]] = probe if config["transfer"]["mode"] == "probe" else \
            phase("finetune/", True, "finetune/test_acc", stage != "source", True)
    final = set().union(*phases.values()) | {"alpha_hat", "sigma_sq_sum", "clean_acc"}
    final |= {"knn_acc"} if task in ("ssl", "transfer") else set()
    final |= {"source_acc"} if task == "transfer" else set()
    attack = config.get("attack")
    if attack:
        radii = {radius_metric(e, among_correct) for e in attack["eps"] for among_correct in (False, True)}
        final |= {*DISTANCE_METRICS, *radii, "attack_samples", "attack_queries_mean", "attack_pool_queries",
                  "attack_seconds", "attack_resumed_at", "attack_start_failures", "attack_success_rate"}
    return {**phases, "final": frozenset(final)}


def penalty_start(config: dict) -> int:
    """The epoch (counted across phases) after which the penalty applies: the burn-in's end. For task
    transfer the burn-in counts within the first regularized stage."""
    reg = config["regularizer"]
    phases = list(phase_epochs(config).items())
    first = 1 if config["task"] == "transfer" and reg["stage"] == "target" else 0
    return sum(epochs for _, epochs in phases[:first]) + burnin_epochs(reg["burnin"], phases[first][1])


def check_burnin(config: dict) -> None:
    """A burn-in given in epochs must leave some of its stage to regularize."""
    reg = config["regularizer"]
    if reg["kind"] == "none" or reg["burnin"] < 1:
        return
    phases = list(phase_epochs(config).values())
    stage = phases[1 if config["task"] == "transfer" and reg["stage"] == "target" else 0]
    if reg["burnin"] >= stage:
        raise ConfigError(f"regularizer.burnin: {reg['burnin']} epochs leaves none of the stage's {stage} "
                          "epochs to regularize")


def burnin_epochs(burnin, stage_epochs: int) -> int:
    """Unregularized epochs of a stage: `burnin` epochs if it is >= 1, else that fraction of the stage."""
    return int(burnin) if burnin >= 1 else round(burnin * stage_epochs)


def check_model(config: dict, input_shape, num_classes: int) -> None:
    """Build the model without allocating memory and resolve the placement against it."""
    import torch

    try:
        with torch.device("meta"):
            model = models.build(config["model"], input_shape, num_classes)
    except TypeError as error:
        raise ConfigError(f"model: {error}") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    model = model.to_empty(device="cpu")
    placement = config["regularizer"]["placement"]
    try:
        names = placement_mod.resolve(model, placement)
    except placement_mod.PlacementError as error:
        raise ConfigError(f"regularizer.placement: {error}") from None
    encoder_only = config["task"] == "ssl" or config["regularizer"].get("stage") == "both"
    if encoder_only and not all(name.startswith("features.") for name in names):
        raise ConfigError(f"regularizer.placement: {placement!r} reaches the readout; the regularizer of "
                          "task ssl (and of transfer stage both) acts on the encoder only")
