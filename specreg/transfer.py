"""Transfer: pretrain on a source task, then a linear probe or a finetune (optionally L2-SP) on the target.

The source classifier and the target classifier `model` share one encoder (`model.features`) and have
their own heads. `regularizer.stage` says which phase gets the penalty; the regularizer is attached to
the classifier of the first phase it regularizes (for `both` its placement is within the encoder, which
both classifiers share).
"""
import copy

from torch import nn

from . import data as data_mod
from . import models, regularizers
from .config import check_model, check_shapes
from .loop import Phase, Run, accuracy, classification_loss, encoder_metrics
from .probe import knn_accuracy, probe_head, probe_phase


def l2sp_loss(model, anchor: nn.Module, strength: float):
    """Cross-entropy plus strength/2 · ||w − w_source||² over the encoder's parameters (Li et al. 2018)."""
    cross_entropy = classification_loss(model)

    def loss(xb, yb):
        value, correct = cross_entropy(xb, yb)
        drift = sum((p - q).pow(2).sum() for p, q in zip(model.features.parameters(), anchor.parameters()))
        return value + strength / 2 * drift, correct

    return loss


def experiment(config: dict, device, **run_options) -> dict:
    """Pretrain encoder + source head on `source.data`, then read the target out with a probe or a finetune."""
    seed, stage, settings = config["train"]["seed"], config["regularizer"]["stage"], config["transfer"]
    source = data_mod.load({"seed": seed, **config["source"]["data"]}, device=device)
    target = data_mod.load({"seed": seed, **config["data"]}, device=device)
    check_shapes(target.input_shape, source.input_shape)
    check_model(config, target.input_shape, target.num_classes)
    model = models.build(config["model"], target.input_shape, target.num_classes)
    models.fit_normalization(model.features, source.x_train)  # the encoder is trained on the source
    source_model = models.Classifier(model.features, nn.Linear(model.head.in_features, source.num_classes),
                                     source.input_shape)
    if settings["mode"] == "probe":
        model.head = probe_head(model.head)
    model, source_model = model.to(device), source_model.to(device)
    modules = {"model": model, "source_head": source_model.head}
    finetune_l2sp = settings["mode"] == "finetune" and settings["l2sp"] > 0
    if finetune_l2sp:
        modules["anchor"] = anchor = copy.deepcopy(model.features).requires_grad_(False)
    regularized = model if stage == "target" else source_model
    regularizer = regularizers.build(config["regularizer"]).attach(regularized).to(device)
    run = Run(config, device, modules, regularizer, regularized, **run_options)

    def evaluate_source(full):
        return {"pretrain/test_acc": accuracy(source_model, source.x_test, source.y_test),
                **encoder_metrics(regularizer, source_model, source.x_test, full)}

    epochs = config["source"]["epochs"]
    pretrain = Phase("pretrain", source_model, classification_loss(source_model), source.x_train, source.y_train,
                     {**config["train"], "epochs": epochs}, evaluate_source,
                     classifier=None if stage == "target" else source_model, augment=source.augment)
    if not run.fit(pretrain):
        return run.summary()
    if settings["mode"] == "probe":
        target_phase = probe_phase(config, model, target)
    else:
        if finetune_l2sp and run.epoch == epochs:  # starting the finetune, not resuming it
            anchor.load_state_dict(model.features.state_dict())

        def evaluate_target(full):
            return {"finetune/test_acc": accuracy(model, target.x_test, target.y_test),
                    **encoder_metrics(regularizer, model, target.x_test, full)}

        loss = l2sp_loss(model, anchor, settings["l2sp"]) if finetune_l2sp else classification_loss(model)
        target_phase = Phase("finetune", model, loss, target.x_train, target.y_train,
                             config["train"], evaluate_target, classifier=None if stage == "source" else model,
                             augment=target.augment)
    if not run.fit(target_phase):
        return run.summary()
    return run.finish(model, target.x_test, target.y_test, knn_acc=knn_accuracy(model, target),
                      source_acc=run.summary()["pretrain/test_acc"])
