"""Search-space files: their schema, their validation, and the define-by-run space they give Optuna.

A file holds a base experiment config, a `search` block of dotted keys into it, the objectives and the
run settings. `load_space` checks all of it (every key against the library's schema and registries, and
`specreg.validate_config` on the base config with each searched value substituted) before anything is
started, and raises `BadInput` naming the key, the value and the closest valid key.
"""
import copy
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from specreg import Strict, did_you_mean, format_validation_error, is_sigma_metric

from ..base.errors import BadInput

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Sections whose builder options may be searched even where the base config leaves them at defaults.
OPEN_SECTIONS = ("data", "model")


def check_name(name: str) -> str:
    """A sweep name becomes a directory and an experiment name: letters, digits, `_`, `.`, `-` only."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise BadInput(f"name: {name!r} is not a valid sweep name (letters, digits, '_', '.', '-'; "
                       "no path separators or '..')")
    return name


# --- dotted keys -------------------------------------------------------------------------------------

def get_dotted(config: dict, key: str):
    """Value at a dotted key; KeyError if any part is missing."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def set_dotted(config: dict, key: str, value) -> dict:
    """A deep copy of config with value at the dotted key (missing sections are created)."""
    out = copy.deepcopy(config)
    node = out
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# --- schema ------------------------------------------------------------------------------------------

def encode(value):
    """A searched value as Optuna takes it: scalars as they are, lists and mappings as JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


class Param(Strict):
    """One searched key: exactly one distribution, optionally conditional on other keys (`when`)."""
    choice: Optional[list] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    integer: Optional[tuple[int, int]] = Field(None, alias="int")
    grid: Optional[list] = None
    when: dict[str, list] = {}

    @field_validator("when", mode="before")
    @classmethod
    def _listify(cls, value):
        return {k: v if isinstance(v, list) else [v] for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _one_distribution(self):
        given = [name for name in ("choice", "uniform", "loguniform", "integer", "grid")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, int, grid "
                             f"(got {', '.join(given) or 'none'})")
        if self.kind in ("choice", "grid") and not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        if self.kind in ("uniform", "loguniform", "int"):
            low, high = self.values
            if low >= high:
                raise ValueError(f"inverted range [{low}, {high}]: the low bound must be below the high bound")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform bounds must be > 0, got [{low}, {high}]")
        return self

    @property
    def kind(self) -> str:
        for name in ("choice", "uniform", "loguniform", "grid"):
            if getattr(self, name) is not None:
                return name
        return "int"

    @property
    def values(self) -> list:
        """The listed values, or the two bounds of a range."""
        return list(getattr(self, "integer" if self.kind == "int" else self.kind))

    @property
    def finite(self) -> bool:
        return self.kind in ("choice", "grid")

    def _encoded(self) -> list:
        """Optuna takes only scalars as categories: lists and mappings travel as JSON text."""
        return [encode(v) for v in self.values]

    def decode(self, raw):
        """A suggested value back in its config form."""
        encoded = self._encoded()
        return self.values[encoded.index(raw)] if isinstance(raw, str) and raw in encoded else raw

    def distribution(self):
        """The Optuna distribution `suggest` samples from (for rebuilding a study from finished trials)."""
        from optuna import distributions

        if self.finite:
            return distributions.CategoricalDistribution(self._encoded())
        low, high = self.values
        if self.kind == "int":
            return distributions.IntDistribution(low, high)
        return distributions.FloatDistribution(low, high, log=self.kind == "loguniform")

    def suggest(self, trial, name: str):
        if self.finite:
            return trial.suggest_categorical(name, self._encoded())
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(name, low, high)
        return trial.suggest_float(name, low, high, log=self.kind == "loguniform")

    def describe(self) -> str:
        text = f"{self.kind} {self.values}"
        if self.when:
            text += " when " + ", ".join(f"{k} in {v}" for k, v in self.when.items())
        return text


class Objective(Strict):
    metric: str
    mode: Literal["max", "min"] = "max"


class Sampler(Strict):
    name: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    seed: int = 0


class Scheduler(Strict):
    name: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class Resources(Strict):
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class RunSettings(Strict):
    max_failures: int = Field(2, ge=0)
    shared_burnin: bool = True
    max_concurrent: Optional[int] = Field(None, ge=1)


class SweepSpec(Strict):
    name: str
    description: str = ""
    base: dict
    search: dict[str, Param] = {}
    objectives: list[Objective] = Field(min_length=1)
    sampler: Sampler = Sampler()
    scheduler: Scheduler = Scheduler()
    samples: Optional[int] = Field(None, ge=1)
    resources: Resources = Resources()
    seeds: Optional[list[int]] = Field(None, min_length=1)
    run: RunSettings = RunSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        try:
            return check_name(value)
        except BadInput as error:
            raise ValueError(str(error).removeprefix("name: ")) from None

    @field_validator("seeds")
    @classmethod
    def _unique(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    def order(self) -> list[str]:
        """Searched keys with every key after the keys its `when` refers to (file order otherwise)."""
        done: list[str] = []
        visiting: set[str] = set()

        def visit(key):
            if key in done:
                return
            if key in visiting:
                raise BadInput(f"search.{key}.when: the conditions form a cycle")
            visiting.add(key)
            for ref in self.search[key].when:
                if ref in self.search:
                    visit(ref)
            visiting.discard(key)
            done.append(key)

        for key in self.search:
            visit(key)
        return done

    def _active(self, key: str, chosen: dict) -> bool:
        """Whether every `when` condition of key holds given the values chosen so far (else the base's)."""
        for ref, allowed in self.search[key].when.items():
            if ref in self.search:
                if ref not in chosen or self.search[ref].decode(chosen[ref]) not in allowed:
                    return False
            elif get_dotted(self.base, ref) not in allowed:
                return False
        return True

    def define_by_run(self, trial) -> None:
        """Optuna define-by-run space: a conditional key is only sampled where its conditions hold."""
        chosen = {}
        for key in self.order():
            if self._active(key, chosen):
                chosen[key] = self.search[key].suggest(trial, key)

    def grid_points(self) -> list[dict]:
        """Every assignment of a grid sweep, in file order (inactive conditional keys left out)."""
        points = [{}]
        for key in self.order():
            values, grown = self.search[key]._encoded(), []
            for point in points:
                grown += [dict(point, **{key: v}) for v in values] if self._active(key, point) else [point]
            points = grown
        return points

    def trial_config(self, params: dict) -> dict:
        """The base config with a trial's searched values applied (not yet validated)."""
        config = copy.deepcopy(self.base)
        for key, raw in params.items():
            config = set_dotted(config, key, self.search[key].decode(raw))
        return config

    def seed_list(self, resolved: dict) -> list[int]:
        return list(self.seeds) if self.seeds else [resolved["train"]["seed"]]

    def num_samples(self) -> int:
        """The trials to run: `samples` (default: every grid point, else 16), and no more than the distinct
        configs of a space of listed values (no config runs twice)."""
        if self.sampler.name == "grid":
            points = len(self.grid_points())
            return min(self.samples or points, points)
        wanted = self.samples or 16
        if all(p.finite for p in self.search.values()) and math.prod(len(p.values) for p in self.search.values()) <= wanted:
            return min(wanted, len(self.grid_points()))  # the product bounds the count: list only small spaces
        return wanted

    def smoke(self) -> "SweepSpec":
        """Two trials of one epoch with a tiny attack: a check that the file runs."""
        base = set_dotted(self.base, "train.epochs", 1)
        if base.get("regularizer", {}).get("burnin", 0) >= 1:  # a burn-in in epochs: 1, then 1 regularized
            base = set_dotted(set_dotted(base, "train.epochs", 2), "regularizer.burnin", 1)
        attack = base.get("attack")
        if attack:
            base = set_dotted(base, "attack.samples", min(attack.get("samples", 20), 20))
            base = set_dotted(base, "attack.max_queries", min(attack.get("max_queries") or 200, 200))
            if attack.get("iterations") is not None:
                base = set_dotted(base, "attack.iterations", min(attack["iterations"], 2))
        return self.model_copy(update={
            "name": f"{self.name}-smoke", "base": base, "samples": 2, "scheduler": Scheduler(),
            "seeds": self.seeds[:1] if self.seeds else None})


# --- loading and validation ----------------------------------------------------------------------------

def reported_metrics(resolved_base: dict) -> set[str]:
    """Metric names a trial of this base config reports (besides `sigma_K`): the library's, per task."""
    import specreg

    return set(specreg.reported_metrics(resolved_base)["final"])


def epoch_metrics(resolved_base: dict) -> set[str]:
    """Metric names every epoch of every phase reports (what ASHA can compare trials on), with `clean_acc`
    where an epoch's `test_acc` stands for it (trainable.objective_values)."""
    import specreg

    phases = [set(names) for phase, names in specreg.reported_metrics(resolved_base).items() if phase != "final"]
    names = set.intersection(*phases)
    return names | {"clean_acc"} if "test_acc" in names else names


def total_epochs(resolved: dict) -> int:
    """The epochs a run trains, counted across its phases as the library counts them (pretraining and a
    probe or finetune, for example): the last epoch's `epoch`."""
    import specreg

    return sum(specreg.phase_epochs(resolved).values())


def is_reported(metric: str, resolved_base: dict) -> bool:
    return metric in reported_metrics(resolved_base) or is_sigma_metric(metric)


def _unknown(key: str, value, what: str, allowed) -> BadInput:
    return BadInput(f"{key} = {value!r}: unknown {what}{did_you_mean(key.split('.')[-1], allowed)}; "
                    f"allowed: {', '.join(sorted(map(str, allowed)))}")


def _choices(annotation) -> tuple:
    """The values a Literal field (or an Optional one) allows; () for any other field."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return next((_choices(a) for a in typing.get_args(annotation) if _choices(a)), ())


def _submodel(annotation):
    """The pydantic model inside a field's annotation (through Optional and Union), or None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def check_keys(config: dict, schema=None, prefix: str = "") -> None:
    """Refuse a key that the config's schema (a pydantic model) forbids, suggesting the closest valid one;
    the blocks whose keys the schema passes through are checked against the library's registries."""
    import specreg

    schema = schema or specreg.ExperimentConfig
    for key, value in config.items():
        field = schema.model_fields.get(key)
        if field is None and schema.model_config.get("extra") == "forbid":
            raise _unknown(prefix + key, value, "key", schema.model_fields)
        choices = _choices(field.annotation) if field is not None else ()
        if isinstance(value, str) and choices and value not in choices:
            raise BadInput(f"{prefix}{key} = {value!r}: not one of {', '.join(map(str, choices))}"
                           f"{did_you_mean(value, choices)}")
        if field is not None and isinstance(value, dict) and _submodel(field.annotation):
            check_keys(value, _submodel(field.annotation), f"{prefix}{key}.")
            check_options(f"{prefix}{key}", _submodel(field.annotation), value)


def check_options(key: str, schema, block: dict) -> None:
    """A dataset, model or attack block against the datasets, the model builders' parameters and the
    attack options the library registers (a missing or mistyped name is left to the schema)."""
    import specreg

    name = block.get("name")
    if schema is specreg.DataSpec and isinstance(name, str):
        if name not in specreg.DATASETS:
            raise BadInput(f"{key}.name = {name!r}: unknown dataset{did_you_mean(name, specreg.DATASETS)}; "
                           f"datasets: {', '.join(sorted(specreg.DATASETS))}")
        allowed = specreg.dataset_options(name)
        what = f"key for dataset {name!r}"
    elif schema is specreg.ModelSpec and name in specreg.MODELS:
        allowed = {"name", *specreg.model_options(name)}
        what = f"option of model {name!r}"  # the builder's parameters after (input_shape, num_classes)
    elif schema is specreg.AttackSpec and (name := block.get("name", schema.model_fields["name"].default)) \
            in specreg.ATTACKS:
        allowed = {*schema.model_fields, *specreg.attack_options(name)}
        what = f"option of attack {name!r}"
    else:
        return
    unknown = sorted(block.keys() - allowed)
    if unknown:
        raise _unknown(f"{key}.{unknown[0]}", block[unknown[0]], what, allowed)


def check_attack(resolved: dict) -> None:
    """The attack options' values, as the attack itself checks them before its first query."""
    import specreg

    attack = resolved.get("attack")
    if attack:
        options = {k: v for k, v in attack.items() if k not in specreg.AttackSpec.model_fields}
        try:
            specreg.validate_attack(attack["name"], attack["max_queries"], options)
        except ValueError as error:
            raise BadInput(f"attack: {error}") from None


def validated(config: dict, where: str) -> dict:
    """The resolved config; BadInput naming where, the key, the value and the closest valid key."""
    import specreg

    try:
        check_keys(config)
        resolved = specreg.validate_config(config)
        check_attack(resolved)
    except specreg.ConfigError as error:  # BadInput's base
        raise BadInput(f"{where}: {error}") from None
    return resolved


def check(spec: SweepSpec) -> dict:
    """Every check that needs the library; return the resolved base config."""
    base = validated(spec.base, "base")
    keys = spec.order()
    for key in keys:
        param, where = spec.search[key], f"search.{key}"
        if key.startswith("attack."):
            raise BadInput(f"{where}: the attack is the threat model and must be fixed within a sweep")
        if key == "train.seed" and spec.seeds:
            raise BadInput(f"{where}: searched while `seeds:` repeats every config over seeds; use one")
        try:
            get_dotted(base, key)
        except KeyError:
            if key.split(".")[0] not in OPEN_SECTIONS:
                raise BadInput(f"{where}: not a key of the config") from None
        for value in param.values:
            validated(set_dotted(spec.base, key, value), f"{where}: value {value!r} is invalid")
        for ref, allowed in param.when.items():
            if ref in spec.search:
                if spec.search[ref].finite and not set(map(json.dumps, allowed)) & set(
                        map(json.dumps, spec.search[ref].values)):
                    raise BadInput(f"{where}.when.{ref}: {allowed} never occurs in its values "
                                   f"{spec.search[ref].values}")
            else:
                try:
                    fixed = get_dotted(base, ref)
                except KeyError:
                    raise BadInput(f"{where}.when: {ref!r} is neither searched nor a key of the config") from None
                if fixed not in allowed:
                    raise BadInput(f"{where}.when.{ref}: the config fixes it at {fixed!r}, which is never in "
                                   f"{allowed}")
        if spec.sampler.name == "grid" and not param.finite:
            raise BadInput(f"{where}: sampler grid needs listed values (choice or grid), got {param.kind}")
        if param.kind == "grid" and spec.sampler.name != "grid":
            raise BadInput(f"{where}: a grid distribution needs `sampler: {{name: grid}}`")
    for index, objective in enumerate(spec.objectives):
        if not is_reported(objective.metric, base):
            known = ", ".join(sorted(reported_metrics(base)))
            raise BadInput(f"objectives.{index}.metric: no trial reports {objective.metric!r} "
                           f"(reported: {known}, sigma_K)")
    if len(set(spec.metrics)) != len(spec.metrics):
        raise BadInput(f"objectives: a metric is listed twice ({spec.metrics})")
    if spec.scheduler.name == "asha":
        first = spec.metrics[0]
        if len(spec.objectives) > 1:
            raise BadInput("scheduler: asha needs a single objective (with several, early-stopped trials "
                           "would enter the Pareto front with truncated values); use name: none")
        if first not in epoch_metrics(base) and not is_sigma_metric(first):
            raise BadInput(f"scheduler: asha compares trials every epoch, but {first!r} is only known "
                           "at the end; use an objective reported every epoch or name: none")
        if spec.seeds and len(spec.seeds) > 1:
            raise BadInput("scheduler: asha cannot stop a trial that repeats its config over seeds")
        if spec.scheduler.grace_period >= total_epochs(base):
            raise BadInput(f"scheduler.grace_period: {spec.scheduler.grace_period} is not below the "
                           f"{total_epochs(base)} epochs a trial trains (across its phases)")
    return base


def read_yaml(path) -> dict:
    """The mapping a YAML file holds (a search space, an experiment config); BadInput naming the file, and
    the line and column of a syntax error. The platform's one YAML loader."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{path}: YAML syntax error{line}: {error.problem}") from None
    except yaml.YAMLError as error:
        raise BadInput(f"{path}: YAML error: {error}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a mapping at the top level")
    return raw


def load_space(path, samples: Optional[int] = None, smoke: bool = False) -> tuple[SweepSpec, dict]:
    """Read and validate a search-space file; return the spec and its resolved base config."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        message = format_validation_error(error, SweepSpec, "file", separator="\n")
        raise BadInput(f"{path}:\n{message}") from None
    if smoke:
        spec = spec.smoke()
    if samples is not None:
        if samples < 1:
            raise BadInput(f"--samples: must be at least 1, got {samples}")
        spec = spec.model_copy(update={"samples": samples})
    return spec, check(spec)

