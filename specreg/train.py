"""One experiment end to end: train with a spectral regularizer, then evaluate robustness.

The data lives on the training device and batches are index slices of it; per-batch work stays on
the device (losses are summed there and read once per epoch).
"""
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_mod
from . import models, regularizers, robustness, spectral
from .config import check_model, validate_config

CHECKPOINT_FILE = "state.pt"
EVAL_BATCH = 4096
SPECTRUM_SAMPLES = 2000


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
def feature_spectrum(model, x) -> torch.Tensor:
    """Eigenvalues of the representation's covariance on up to SPECTRUM_SAMPLES inputs."""
    was_training = model.training
    model.eval()
    features = model.features(x[:SPECTRUM_SAMPLES]).float()
    model.train(was_training)
    return spectral.covariance_spectrum(features)


def save_checkpoint(directory, state: dict) -> Path:
    """Write the training state atomically: a crash mid-write leaves the previous checkpoint intact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (CHECKPOINT_FILE + ".partial")
    torch.save(state, partial)
    os.replace(partial, directory / CHECKPOINT_FILE)
    return directory / CHECKPOINT_FILE


def load_checkpoint(directory) -> dict:
    """Read a state written by `save_checkpoint` (tensors and plain containers only)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None


def run_experiment(config: dict, on_epoch=None, checkpoint_dir=None, resume_from=None,
                   stop_after_epochs=None) -> dict:
    """Train and evaluate one config; return the final metrics with `history`.

    checkpoint_dir: save the full state there after every epoch (before `on_epoch` is called).
    resume_from: a directory written by `save_checkpoint`; training continues after its epoch.
    stop_after_epochs: stop after that many epochs, skipping the final evaluation (a burn-in prefix).
    """
    config = validate_config(config)
    train_cfg, reg_cfg = config["train"], config["regularizer"]
    device = resolve_device(train_cfg["device"])
    seed_everything(train_cfg["seed"])

    data = data_mod.load({"seed": train_cfg["seed"], **config["data"]}, device=device)
    check_model(config, data.input_shape, data.num_classes)
    model = models.build(config["model"], data.input_shape, data.num_classes).to(device)
    regularizer = regularizers.build(reg_cfg).attach(model).to(device)
    optimizer = build_optimizer(model.parameters(), train_cfg)
    schedule = build_schedule(optimizer, train_cfg)
    batch_generator = torch.Generator().manual_seed(train_cfg["seed"])
    epochs = train_cfg["epochs"]
    burnin_epochs = round(reg_cfg["burnin"] * epochs) if reg_cfg["kind"] != "none" else epochs
    amp = train_cfg["amp"] and device.type == "cuda"

    start_epoch, step, history, active = 0, 0, [], False
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        if state["regularizer_active"]:  # the saved weights may be parametrized (spectral-norm)
            regularizer.activate(model)
            active = True
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if state["regularizer_kind"] == reg_cfg["kind"]:
            regularizer.load_state_dict(state["regularizer"])
        torch.set_rng_state(state["torch_rng"])
        batch_generator.set_state(state["batch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)

    last_epoch = epochs if stop_after_epochs is None else min(epochs, stop_after_epochs)
    model.train()
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        if epoch >= burnin_epochs and not active:
            regularizer.activate(model)
            active = True
        if active:
            regularizer.start_epoch(model, data.x_train)
        loss_sum = torch.zeros((), device=device)
        penalty_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        penalty_steps = 0
        for xb, yb in data_mod.batches(data.x_train, data.y_train, train_cfg["batch_size"],
                                       generator=batch_generator, augment=data.augment):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
            total = loss
            if active and step % reg_cfg["every"] == 0:
                penalty = regularizer.penalty(model, (xb, yb))
                total = loss + penalty
                penalty_sum += penalty.detach()
                penalty_steps += 1
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach() * len(xb)
            correct += (logits.argmax(1) == yb).sum()
        schedule.step()

        train_loss = float(loss_sum) / len(data.x_train)
        if not math.isfinite(train_loss):
            raise Diverged(epoch + 1, history[-1] if history else {})
        spectrum = feature_spectrum(model, data.x_test)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": float(correct) / len(data.x_train),
            "test_acc": accuracy(model, data.x_test, data.y_test),
            "reg_penalty": float(penalty_sum) / max(penalty_steps, 1),
            "lr": optimizer.param_groups[0]["lr"],
            **{f"sigma/{name}": value for name, value in regularizer.layer_norms(model).items()},
            "alpha_hat": _finite_or_none(spectral.fit_power_law(spectrum)),
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append(metrics)
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, {
                "epoch": epoch + 1, "step": step, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "regularizer": regularizer.state_dict(),
                "regularizer_kind": reg_cfg["kind"], "regularizer_active": active, "torch_rng": torch.get_rng_state(),
                "batch_rng": batch_generator.get_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            })
        if on_epoch is not None:
            on_epoch(dict(metrics))

    final = dict(history[-1]) if history else {}
    final["history"] = history
    if stop_after_epochs is not None and last_epoch < epochs:
        return final
    spectrum = feature_spectrum(model, data.x_test)
    final["spectrum"] = spectrum.tolist()
    final["sigma_sq_sum"] = sum(v ** 2 for k, v in final.items() if k.startswith("sigma/features."))
    final["clean_acc"] = final["test_acc"]
    if config["attack"] is not None:
        report = robustness.evaluate(model, (data.x_test, data.y_test), config["attack"])
        final.update(report)
    return final
