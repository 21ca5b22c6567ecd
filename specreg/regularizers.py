"""The regularizer family. Add one by subclassing `Regularizer` and registering it in `REGULARIZERS`: the
class declares the options it adds (`FIELDS`), those it reads (`OPTIONS`) and its facts, and the config
schema is assembled from the registry (docs/architecture.md, "Adding an entry", has a worked example).

A regularizer is an `nn.Module` so its state (warm power-iteration vectors, eigenbases) follows the
model to its device and into checkpoints. The training loop calls, in order: `attach(model)` once,
`activate(model)` when the burn-in ends, then per epoch `start_epoch(model, x_train)` and per
regularized step `arm()` right before the model's forward pass on the batch and `penalty(model, batch)`
right after it.
"""
import re
from typing import Annotated, Literal, Optional, Union

import torch
from pydantic import AfterValidator, Field
from torch import nn

from . import spectral
from .placement import check_syntax, resolve, weight_layers


def _whole_or_fraction(value):
    if value >= 1 and not float(value).is_integer():
        raise ValueError(f"must be a fraction below 1 or a whole number of epochs, got {value!r}")
    return int(value) if value >= 1 else float(value)


def sigma_metric(position: int) -> str:
    """The metric name of σ_max of the weight layer at this 1-based position in forward order."""
    return f"sigma_{position}"


def is_sigma_metric(name: str) -> bool:
    return re.fullmatch(r"sigma_[1-9]\d*", name) is not None


class Regularizer(nn.Module):
    """No penalty. Also the base class: it logs σ_max of the layers it is placed on."""

    # The regularizer.* options a class adds to the config schema: name -> (type, default or pydantic Field).
    # The schema is the union over the registry's classes (a name is declared by one class only), so a kind
    # may carry another kind's option in a shared base config (a sweep varies `kind`) and a typo is refused.
    # These are the training loop's and every kind's.
    FIELDS = {
        "strength": (float, Field(0.0, ge=0)),
        # Default `feature` (FIXED_PLACEMENT overrides it).
        "placement": (Optional[Annotated[str, AfterValidator(check_syntax)]], None),
        "every": (int, Field(1, ge=1)),
        # Unregularized epochs first: a fraction (< 1) of the regularized stage's epochs, or a whole number of
        # epochs (>= 1); 0.9 of 400 and 360 both start the penalty after epoch 360.
        "burnin": (Annotated[Union[int, float], Field(ge=0), AfterValidator(_whole_or_fraction)], 0.0),
        "conv_mode": (Literal["exact", "reshape"], "exact"),  # how σ of a conv layer is computed
        "stage": (Optional[Literal["source", "target", "both"]], None),  # task transfer only (default: source)
    }
    # The options (regularizer.*) this kind and the training loop read besides `kind`; a tracked run logs
    # only these (stage too, in task transfer).
    OPTIONS: tuple[str, ...] = ()
    # Facts the config checks: a placement the kind always uses; whether it penalizes the readout (task
    # ssl trains none); whether it can be confined to one stage of task transfer.
    FIXED_PLACEMENT: Optional[str] = None
    PENALIZES_READOUT = False
    STAGEABLE = True

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        self.strength = float(spec.get("strength", 0.0))
        self.layer_names: list[str] = []

    def attach(self, model: nn.Module) -> "Regularizer":
        infos = {info.name: info for info in weight_layers(model)}
        self.layer_names = resolve(model, self.spec.get("placement") or "feature")
        self._shapes = {name: infos[name].input_shape for name in infos}
        self._logged = [name for name in infos if name in self.layer_names or name.startswith("features.")]
        # σ's metric name counts weight layers in forward order as `upto:K` does (sigma_1, sigma_2, ...):
        # short, so a narrow MLflow column tells the layers apart, where module paths share their start.
        self.sigma_names = {name: sigma_metric(position) for position, name in enumerate(infos, 1)
                            if name in self._logged}
        self.feature_sigmas = [self.sigma_names[name] for name in self._logged if name.startswith("features.")]
        self.monitors = nn.ModuleList(  # separate from any penalty's state: logging never shifts training
            spectral.OperatorNorm(infos[name].module, self._shapes[name], mode=self.spec.get("conv_mode", "exact"),
                                  seed=1000 + i)
            for i, name in enumerate(self._logged))
        return self

    def activate(self, model: nn.Module) -> None:
        """Called once when the burn-in ends (and again on resume past it)."""

    def start_epoch(self, model: nn.Module, x_train: torch.Tensor) -> None:
        """Called at the start of each regularized epoch."""

    def arm(self) -> None:
        """Called right before the forward pass of a step that takes the penalty."""

    def penalty(self, model: nn.Module, batch=None) -> torch.Tensor:
        return torch.zeros((), device=next(model.parameters()).device)

    @torch.no_grad()
    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """Converged σ_max of every feature layer and every placed layer, by module name (logged under
        `sigma_names`; Σσ² sums the feature layers').

        Each call iterates to convergence from the previous call's vectors, which takes few steps when
        the weights moved by one epoch, where a cold start would take hundreds. The layers are read in
        eval mode, so that a parametrized weight (spectral-norm) does not advance its own power
        iteration: logging never changes training.
        """
        layers = [monitor.layer for monitor in self.monitors]
        modes = [(m, m.training) for layer in layers for m in layer.modules()]
        for layer in layers:
            layer.eval()
        try:
            return {name: float(monitor(converge=True)) for name, monitor in zip(self._logged, self.monitors)}
        finally:
            for m, training in modes:
                m.training = training


class RepSpectral(Regularizer):
    """λ · Σ σ_max(W_l)² over the placed layers (default: every weight layer up to the features)."""

    FIELDS = {
        "n_power_iterations": (int, Field(1, ge=1)),
        "activation_term": (bool, False),  # on MLPs: add the bound's activation-derivative term
    }
    OPTIONS = ("strength", "placement", "every", "burnin", "n_power_iterations", "conv_mode", "activation_term")

    def attach(self, model):
        super().attach(model)
        modules = dict(model.named_modules())
        self.norms = nn.ModuleList(
            spectral.OperatorNorm(modules[name], self._shapes[name], mode=self.spec.get("conv_mode", "exact"),
                                  n_power_iterations=self.spec.get("n_power_iterations", 1), seed=i)
            for i, name in enumerate(self.layer_names))
        self._fused = [norm.fuse() for norm in self.norms if isinstance(norm.layer, nn.Linear)]
        self._preactivations = []
        if self.spec.get("activation_term"):
            self._hook_activations(model)
        return self

    def _hook_activations(self, model):
        """Keep each feature nonlinearity's input z to add the bound's E[max_i φ'(z_i)²] term."""
        activations = [m for m in model.features.modules() if isinstance(m, (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU))]
        if not activations:
            raise ValueError("regularizer.activation_term: the model's features have no nonlinearity")

        def keep(module, inputs):
            if module.training and torch.is_grad_enabled():
                self._preactivations.append((module, inputs[0]))

        for m in activations:
            m.register_forward_pre_hook(keep)
        model.features.register_forward_pre_hook(lambda module, inputs: self._preactivations.clear())

    def arm(self):
        """A Linear layer's power step then runs in its forward pass, and σ's gradient joins the
        layer's own weight gradient: 1.3 of the 2.9 ms the penalty added to a batch-32 MLP step."""
        for norm in self._fused:
            norm.arm()

    def penalty(self, model, batch=None):
        total = sum(norm.take() ** 2 for norm in self.norms)
        if self._preactivations:
            for module, z in self._preactivations:
                slope, = torch.autograd.grad(module.forward(z).sum(), z, create_graph=True)  # forward(): no hooks
                total = total + slope.pow(2).flatten(1).amax(dim=1).mean()
            self._preactivations.clear()
        return self.strength * total


class AllLayerSpectral(RepSpectral):
    """The end-to-end baseline (Yoshida & Miyato 2017): every weight layer, readout included."""

    OPTIONS = ("strength", "every", "burnin", "n_power_iterations", "conv_mode", "activation_term")
    FIXED_PLACEMENT = "all"
    PENALIZES_READOUT = True

    def __init__(self, spec):
        super().__init__({**spec, "placement": "all"})


class SpectralDecay(Regularizer):
    """Shape the representation's covariance spectrum toward λ_n ∝ n^(−α) (Nassar et al. 2020).

    The eigenbasis is refreshed once per epoch from a larger sample; each step reads the batch
    eigenvalues as v_nᵀ C_batch v_n, which is cheaper and steadier than a batch eigendecomposition.
    The penalty follows `eigen_val_regulate` in josuenassar/power_law, ModelDefs/utils.py (lines cited
    in `penalty`); `tau` is their `start` (`eig_start`), a 0-based index.
    """

    FIELDS = {
        "target_exponent": (float, Field(1.0, gt=0)),
        "tau": (int, Field(10, ge=0)),  # 0-based rank of the anchor eigenvalue (Nassar et al.'s eig_start)
        "refresh_samples": (int, Field(2048, ge=2)),  # sample size for the per-epoch eigenbasis
    }
    OPTIONS = ("strength", "placement", "every", "burnin", "target_exponent", "tau", "refresh_samples")

    def attach(self, model):
        super().attach(model)
        placement = self.spec.get("placement") or "feature"
        modules = dict(model.named_modules())
        self._target = model.features if placement == "feature" else modules[self.layer_names[-1]]
        self.register_buffer("basis", torch.empty(0))
        self._output = None

        def keep(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                self._output = output

        self._target.register_forward_hook(keep)
        return self

    @torch.no_grad()
    def start_epoch(self, model, x_train):
        was_training = model.training
        model.eval()
        n = min(len(x_train), self.spec.get("refresh_samples", 2048))
        self._output = None
        representation = self._capture(model, x_train[:n]).flatten(1).double()
        model.train(was_training)
        centered = representation - representation.mean(0)
        covariance = centered.T @ centered / (n - 1)
        _, vectors = torch.linalg.eigh(covariance)
        # Directions past the sample's rank are left out. Theirs are all D eigenvectors (utils.py:176) of the
        # whole training set (trainers.py:167, 240): far more samples than dimensions, so none lie past it.
        rank = min(n - 1, covariance.shape[0])
        tau = self.spec.get("tau", 10)
        if tau + 1 >= rank:
            raise ValueError(f"spectral-decay: tau={tau} leaves no eigenvalue to regulate: the representation "
                             f"has rank {rank} on {n} samples (tau is the 0-based index of the anchor)")
        self.basis = vectors.flip(1)[:, :rank].float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        basis = state_dict.get(prefix + "basis")
        if basis is not None:
            self.basis = torch.empty_like(basis, device=self.basis.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _capture(self, model, x):
        out = {}
        handle = self._target.register_forward_hook(lambda m, i, o: out.__setitem__("z", o))
        try:
            model(x)
        finally:
            handle.remove()
        return out["z"]

    def penalty(self, model, batch=None):
        if self._output is None or self.basis.numel() == 0:
            raise RuntimeError("spectral-decay: penalty() needs a training forward pass and start_epoch() first")
        z = self._output.flatten(1).float()
        self._output = None
        centered = z - z.mean(0)
        # utils.py:230-233: the batch covariance (divided by N - 1) read along the basis vectors
        projected = (centered @ self.basis).pow(2).sum(0) / max(len(z) - 1, 1)
        eigs = projected.sort(descending=True).values  # utils.py:238: compared by rank, not by basis order
        tau, alpha = self.spec.get("tau", 10), self.spec.get("target_exponent", 1.0)
        index = torch.arange(len(eigs), device=z.device, dtype=z.dtype)
        # utils.py:241-242 and 246: the anchor is eigs[tau] (0-based), held constant; the target at index n
        # is eigs[tau]·((tau + 1)/(n + 1))^α
        target = eigs[tau].detach() * ((tau + 1) / (index + 1)) ** alpha
        # utils.py:244-247: every index after the anchor whose eigenvalue is positive (a zero is skipped,
        # not divided by; the sort makes the target positive wherever the eigenvalue is)
        regulated = (index > tau) & (eigs > 0)
        ratio = torch.where(regulated, eigs / torch.where(regulated, target, 1.0) - 1, 0.0)
        # utils.py:248: divided by the representation's dimension
        return self.strength * (ratio.pow(2) + ratio.clamp(min=0)).sum() / z.shape[1]


class SpectralNormConstraint(Regularizer):
    """The hard-constraint baseline: torch's spectral-norm parametrization on the placed layers."""

    OPTIONS = ("placement", "burnin")
    STAGEABLE = False  # the parametrization stays for the rest of the run

    def activate(self, model):
        modules = dict(model.named_modules())
        for name in self.layer_names:
            module = modules[name]
            if not nn.utils.parametrize.is_parametrized(module, "weight"):
                nn.utils.parametrizations.spectral_norm(module)


class Jacobian(Regularizer):
    """Random-projection estimate of ‖∂features/∂x‖_F² (Hoffman et al. 2019), the input-gradient baseline."""

    FIELDS = {"projections": (int, Field(1, ge=1))}  # random projections per step
    OPTIONS = ("strength", "every", "burnin", "projections")

    def attach(self, model):
        super().attach(model)
        self._generator = None
        return self

    def penalty(self, model, batch=None):
        if batch is None:
            raise ValueError("jacobian: penalty() needs the batch")
        x = batch[0].detach().requires_grad_(True)
        features = model.features(x).flatten(1)
        if self._generator is None:
            self._generator = torch.Generator(device=x.device).manual_seed(int(self.spec.get("seed", 0)))
        total = 0.0
        projections = self.spec.get("projections", 1)
        for _ in range(projections):
            v = torch.randn(features.shape, generator=self._generator, device=x.device, dtype=features.dtype)
            v = v / v.norm(dim=1, keepdim=True)
            vjp, = torch.autograd.grad((features * v).sum(), x, create_graph=True)
            total = total + vjp.pow(2).sum() / len(x)
        return self.strength * features.shape[1] * total / projections


REGULARIZERS = {
    "none": Regularizer,
    "rep-spectral": RepSpectral,
    "all-layer-spectral": AllLayerSpectral,
    "spectral-decay": SpectralDecay,
    "spectral-norm": SpectralNormConstraint,
    "jacobian": Jacobian,
}


def regularizer_options(kind: str) -> tuple[str, ...]:
    """The regularizer.* options that kind `kind` reads besides `kind` (its class's OPTIONS)."""
    return REGULARIZERS[kind].OPTIONS


def option_fields() -> dict:
    """The regularizer.* fields of the config schema besides `kind`: every registered class's `FIELDS`
    and its bases', each name declared by one class only."""
    fields, owner = {}, {}
    for cls in REGULARIZERS.values():
        for base in reversed(cls.__mro__):
            for name, field in vars(base).get("FIELDS", {}).items():
                if owner.setdefault(name, base) is not base:
                    raise TypeError(f"regularizer option {name!r} is declared by both {owner[name].__name__} "
                                    f"and {base.__name__}")
                fields[name] = field
    return fields


def build(spec: dict) -> Regularizer:
    """The regularizer for `spec['kind']` (not yet attached to a model)."""
    kind = spec.get("kind", "none")
    if kind not in REGULARIZERS:
        raise ValueError(f"regularizer.kind: unknown {kind!r}; choose from {sorted(REGULARIZERS)}")
    return REGULARIZERS[kind](spec)
