"""The one training loop every task uses, and what its phases share.

An experiment is a sequence of phases (supervised: one; ssl: pretrain then probe; transfer: pretrain on the
source, then probe or finetune on the target). A `Phase` says what to train with which loss on which data;
`Run.fit` trains it with the optimizer and schedule, the regularizer's burn-in and `every` cadence, bf16
autocast on CUDA, the divergence check, an atomic checkpoint and `on_epoch` after every epoch. Epochs
are counted across phases, so a checkpoint names one point of the whole experiment and resumes anywhere.
The data lives on the training device; per-batch sums stay there and are read once per epoch.
"""
import ctypes
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import robustness, spectral
from .files import load_state, save_atomic
from .config import penalty_start, phase_epochs

CHECKPOINT_FILE = "state.pt"
EVAL_BATCH = 4096
SPECTRUM_SAMPLES = 2000
SUPERVISED = "train"  # the phase whose metrics carry no family prefix


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, last_metrics: dict):
        super().__init__(f"training diverged at epoch {epoch}: the loss is not finite")
        self.epoch = epoch
        self.last_metrics = last_metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def keep_freed_memory() -> None:
    """Let glibc keep freed heap memory for reuse instead of returning it to the OS after every step.

    A CPU training step frees and re-allocates the same multi-megabyte gradient and activation buffers;
    with glibc's defaults they go back to the OS and are page-faulted in again on the next step. No
    library does this without LD_PRELOAD (jemalloc, tcmalloc), so it is two `mallopt` calls: buffers up
    to 32 MiB come from the heap, and up to 1 GiB of free heap is kept. Elsewhere than glibc: nothing.
    Measured: docs/benchmarks_regularizer.md, "Allocator".
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process already runs on
    if mallopt is not None:
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its largest allowed value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params, train: dict) -> torch.optim.Optimizer:
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"],
                               weight_decay=train["weight_decay"])
    cls = torch.optim.Adam if train["optimizer"] == "adam" else torch.optim.AdamW
    return cls(params, lr=train["lr"], weight_decay=train["weight_decay"])


def build_schedule(optimizer, train: dict):
    """Learning-rate schedule stepped once per epoch."""
    if train["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train["epochs"])
    if train["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=train["step_size"], gamma=train["gamma"])
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum()
                  for i in range(0, len(x), EVAL_BATCH))
    model.train(was_training)
    return float(correct) / len(x)


@torch.no_grad()
def encode(model, x) -> torch.Tensor:
    """`model.features` of every input, in eval mode, as float32."""
    was_training = model.training
    model.eval()
    features = torch.cat([model.features(x[i:i + EVAL_BATCH]).float() for i in range(0, len(x), EVAL_BATCH)])
    model.train(was_training)
    return features


def feature_spectrum(model, x) -> torch.Tensor:
    """Eigenvalues of the representation's covariance on up to SPECTRUM_SAMPLES inputs."""
    return spectral.covariance_spectrum(encode(model, x[:SPECTRUM_SAMPLES]))


def finite_or_none(value: float):
    return value if math.isfinite(value) else None


def encoder_metrics(regularizer, model, x_test, full: bool) -> dict:
    """σ_max of every feature and regularized layer (`sigma_K`: the K-th weight layer in forward order, as
    `upto:K` counts) and α̂ of the feature spectrum; nothing unless `full` (the epochs `train.eval_every`
    skips)."""
    if not full:
        return {}
    spectrum = feature_spectrum(model, x_test)
    return {**{regularizer.sigma_names[name]: value for name, value in regularizer.layer_norms(model).items()},
            "alpha_hat": finite_or_none(spectral.fit_power_law(spectrum))}


def save_checkpoint(directory, state: dict) -> Path:
    """Write the training state atomically: a crash mid-write leaves the previous checkpoint intact."""
    return save_atomic(state, Path(directory) / CHECKPOINT_FILE)


def load_checkpoint(directory) -> dict:
    """Read a state written by `save_checkpoint` (tensors and plain containers only)."""
    return load_state(Path(directory) / CHECKPOINT_FILE)


@dataclass
class Phase:
    """One stretch of gradient training. Its metrics are named `<name>/…` (`train`: no prefix)."""

    name: str
    trained: nn.Module  # put in train mode; the optimizer trains its parameters
    loss: Callable  # (xb, yb) -> (loss, number of correct predictions or None)
    x: torch.Tensor
    y: torch.Tensor
    train: dict  # epochs, optimizer, lr, schedule, batch_size, amp, … (TrainSpec keys)
    evaluate: Callable[[bool], dict]  # end-of-epoch metrics under their final names; False: the cheap ones
    classifier: Optional[nn.Module] = None  # the regularizer's model, if this phase applies the penalty
    augment: Optional[str] = None  # a `data.AUGMENTATIONS` name for the batches
    drop_last: bool = False


class Run:
    """What an experiment's phases share: the epoch count across phases, history, the regularizer and
    its activation, the random generators, checkpoints and the `on_epoch` callback.

    modules: everything with trained state, by checkpoint key (`model` is the final classifier).
    regularized: the Classifier the regularizer is attached to (activated on it when the burn-in ends).
    """

    def __init__(self, config: dict, device, modules: dict, regularizer, regularized, on_epoch=None,
                 checkpoint_dir=None, resume_from=None, stop_after_epochs=None, attack_state=None):
        seed = config["train"]["seed"]
        keep_freed_memory()
        self.config, self.device, self.modules = config, device, modules
        self.regularizer, self.regularized = regularizer, regularized
        self.total = sum(phase_epochs(config).values())
        self.penalty_from = penalty_start(config) if config["regularizer"]["kind"] != "none" else math.inf
        self.last = self.total if stop_after_epochs is None else min(self.total, stop_after_epochs)
        self.on_epoch, self.checkpoint_dir, self.attack_state = on_epoch, checkpoint_dir, attack_state
        self.batch_generator = torch.Generator().manual_seed(seed)  # batch order, crop-flip
        self.augment_generator = torch.Generator(device=device).manual_seed(seed + 1)  # on-device views
        self.epoch, self.offset, self.history, self.active = 0, 0, [], False
        self.resumed = None
        if resume_from is not None:
            self._resume(load_checkpoint(resume_from))

    @property
    def finished(self) -> bool:
        return self.epoch == self.total

    def _resume(self, state: dict) -> None:
        kind = self.config["regularizer"]["kind"]
        if not state["regularizer_active"] and kind != "none" and state["epoch"] > self.penalty_from:
            raise ValueError(f"resume_from: the checkpoint is unregularized at epoch {state['epoch']}, past "
                             f"the epoch this config starts its penalty ({self.penalty_from})")
        self.epoch, self.history = state["epoch"], state["history"]
        if state["regularizer_active"]:  # the saved weights may be parametrized (spectral-norm)
            self.regularizer.activate(self.regularized)
            self.active = True
        for key, module in self.modules.items():
            module.load_state_dict(state[key])
        if state["regularizer_kind"] == kind:
            self.regularizer.load_state_dict(state["regularizer"])
        else:  # a shared burn-in prefix: only the σ monitors of the feature layers carry over (same order)
            own = self.regularizer.state_dict()
            self.regularizer.load_state_dict({k: v for k, v in state["regularizer"].items()
                                              if k.startswith("monitors.") and k in own}, strict=False)
        torch.set_rng_state(state["torch_rng"])
        self.batch_generator.set_state(state["batch_rng"])
        self.augment_generator.set_state(state["augment_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.resumed = state

    def fit(self, phase: Phase) -> bool:
        """Train `phase` from where the run stands; False if the run stops before the phase ends."""
        begin, end = self.offset, self.offset + phase.train["epochs"]
        self.offset = end
        if self.epoch >= end:
            return True
        if phase.drop_last and len(phase.x) < phase.train["batch_size"]:
            raise ValueError(f"{phase.name}: batch_size {phase.train['batch_size']} exceeds the "
                             f"{len(phase.x)} training examples")
        reg, every = self.regularizer, self.config["regularizer"]["every"]
        optimizer = build_optimizer(phase.trained.parameters(), phase.train)
        schedule = build_schedule(optimizer, phase.train)
        step = 0
        if self.resumed is not None and self.resumed["phase"] == phase.name and self.epoch > begin:
            optimizer.load_state_dict(self.resumed["optimizer"])
            schedule.load_state_dict(self.resumed["schedule"])
            step = self.resumed["step"]
        amp = phase.train["amp"] and self.device.type == "cuda"
        if phase.train["amp"] and not amp:
            warnings.warn(f"train.amp is ignored on {self.device.type}: phase {phase.name!r} trains in float32 "
                          "(bf16 autocast runs on CUDA only)", stacklevel=2)
        prefix = "" if phase.name == SUPERVISED else phase.name + "/"
        regularized = phase.classifier is not None
        phase.trained.train()
        for epoch in range(self.epoch, min(end, self.last)):
            started = time.perf_counter()
            if regularized and epoch >= self.penalty_from and not self.active:
                reg.activate(phase.classifier)
                self.active = True
            if regularized and self.active:
                reg.start_epoch(phase.classifier, phase.x)
            loss_sum = torch.zeros((), device=self.device)
            penalty_sum = torch.zeros((), device=self.device)
            correct_sum = torch.zeros((), device=self.device, dtype=torch.long)
            seen, penalty_steps = 0, 0
            for xb, yb in data_mod.batches(phase.x, phase.y, phase.train["batch_size"], drop_last=phase.drop_last,
                                           generator=self.batch_generator, augment=phase.augment):
                penalized = regularized and self.active and step % every == 0
                if penalized:
                    reg.arm()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    loss, correct = phase.loss(xb, yb)
                total = loss
                if penalized:
                    penalty = reg.penalty(phase.classifier, (xb, yb))
                    total = loss + penalty
                    penalty_sum += penalty.detach()
                    penalty_steps += 1
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                step += 1
                seen += len(xb)
                loss_sum += loss.detach() * len(xb)
                if correct is not None:
                    correct_sum += correct
            schedule.step()

            train_loss = float(loss_sum) / seen
            if not math.isfinite(train_loss):
                raise Diverged(epoch + 1, self.history[-1] if self.history else {})
            metrics = {"epoch": epoch + 1, f"{prefix}train_loss": train_loss}
            if correct is not None:
                metrics[f"{prefix}train_acc"] = float(correct_sum) / seen
            if regularized:
                metrics[f"{prefix}reg_penalty"] = float(penalty_sum) / max(penalty_steps, 1)
            metrics[f"{prefix}lr"] = optimizer.param_groups[0]["lr"]
            due = (epoch + 1) % self.config["train"]["eval_every"] == 0
            metrics.update(phase.evaluate(due or epoch + 1 in (end, self.penalty_from)))
            metrics["epoch_seconds"] = time.perf_counter() - started
            self.epoch = epoch + 1
            self.history.append(metrics)
            if self.checkpoint_dir is not None:
                save_checkpoint(self.checkpoint_dir, {
                    "epoch": self.epoch, "phase": phase.name, "step": step, "history": self.history,
                    **{key: module.state_dict() for key, module in self.modules.items()},
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "regularizer": reg.state_dict(), "regularizer_kind": self.config["regularizer"]["kind"],
                    "regularizer_active": self.active, "torch_rng": torch.get_rng_state(),
                    "batch_rng": self.batch_generator.get_state(), "augment_rng": self.augment_generator.get_state(),
                    "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                })
            if self.on_epoch is not None:
                self.on_epoch(dict(metrics))
        return self.epoch >= end

    def summary(self) -> dict:
        """The latest value of every metric in the history (across phases), with `history`."""
        final = {}
        for metrics in self.history:
            final.update(metrics)
        final["history"] = self.history
        return final

    def finish(self, model, x_test, y_test, **extra) -> dict:
        """The final metrics of a completed run: the summary, `extra`, the feature spectrum of the final
        classifier `model` on the test set, its clean accuracy and (with an attack block) robustness."""
        final = {**self.summary(), **extra}
        spectrum = feature_spectrum(model, x_test)
        final["spectrum"] = spectrum.tolist()
        final["alpha_hat"] = finite_or_none(spectral.fit_power_law(spectrum))
        final["sigma_sq_sum"] = sum(final[k] ** 2 for k in self.regularizer.feature_sigmas if k in final)
        final["clean_acc"] = accuracy(model, x_test, y_test)
        if self.config["attack"] is not None:
            final.update(robustness.evaluate(model, (x_test, y_test), self.config["attack"], self.attack_state))
        return final


def classification_loss(model):
    """Cross-entropy of `model`'s logits, with the number of correct predictions."""

    def loss(xb, yb):
        logits = model(xb)
        return F.cross_entropy(logits.float(), yb), (logits.argmax(1) == yb).sum()

    return loss
