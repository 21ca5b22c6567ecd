"""One experiment end to end: validate the config, train its task's phases, then evaluate robustness.

Tasks: `supervised` (here), `ssl` (`specreg.ssl`) and `transfer` (`specreg.transfer`). Each builds its
data, model, regularizer and phases, trains them with `specreg.loop.Run`, and ends with `Run.finish`.
"""
from . import data as data_mod
from . import models, regularizers, ssl, transfer
from .config import check_model, validate_config
from .loop import (SUPERVISED, Diverged, Phase, Run, accuracy, classification_loss, encoder_metrics,
                   load_checkpoint, resolve_device, save_checkpoint, seed_everything)

__all__ = ["Diverged", "load_checkpoint", "run_experiment", "run_resolved", "save_checkpoint"]


def supervised(config: dict, device, **run_options) -> dict:
    """Train the classifier on `data` with the regularizer on the layers its placement names."""
    data = data_mod.load({"seed": config["train"]["seed"], **config["data"]}, device=device)
    check_model(config, data.input_shape, data.num_classes)
    model = models.build(config["model"], data.input_shape, data.num_classes).to(device)
    models.fit_normalization(model.features, data.x_train)
    regularizer = regularizers.build(config["regularizer"]).attach(model).to(device)
    run = Run(config, device, {"model": model}, regularizer, model, **run_options)

    def evaluate(full):
        return {"test_acc": accuracy(model, data.x_test, data.y_test),
                **encoder_metrics(regularizer, model, data.x_test, full)}

    done = run.fit(Phase(SUPERVISED, model, classification_loss(model), data.x_train, data.y_train,
                         config["train"], evaluate, classifier=model, augment=data.augment))
    return run.finish(model, data.x_test, data.y_test) if done else run.summary()


TASKS = {"supervised": supervised, "ssl": ssl.experiment, "transfer": transfer.experiment}


def run_experiment(config: dict, **options) -> dict:
    """Validate a config and train and evaluate it (`run_resolved`, which lists the options); return the
    final metrics with `history`."""
    return run_resolved(validate_config(config), **options)


def run_resolved(config: dict, on_epoch=None, checkpoint_dir=None, resume_from=None, stop_after_epochs=None,
                 attack_state=None) -> dict:
    """Train and evaluate a config that `validate_config` returned (a caller that validated it at its own
    edge, as a sweep's trial does, runs it without a second validation).

    on_epoch: called with each epoch's metrics (epochs are counted across a task's phases).
    checkpoint_dir: save the full state there after every epoch (before `on_epoch` is called).
    resume_from: a directory written by `save_checkpoint`; training continues after its epoch.
    stop_after_epochs: stop after that many epochs, skipping the final evaluation (a burn-in prefix).
    attack_state: a file where the attack keeps its progress; a rerun given the same file (after
    `resume_from` a final checkpoint, say) continues an interrupted attack instead of starting it over.
    """
    device = resolve_device(config["train"]["device"])
    seed_everything(config["train"]["seed"])
    return TASKS[config["task"]](config, device, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir,
                                 resume_from=resume_from, stop_after_epochs=stop_after_epochs,
                                 attack_state=attack_state)
