"""Readouts of a frozen encoder: features computed once, a linear probe trained on them, kNN accuracy."""
import torch
import torch.nn.functional as F
from torch import nn

from .loop import EVAL_BATCH, Phase, accuracy, classification_loss, encode
from .models import Normalize

KNN_K = 20


@torch.no_grad()
def knn_accuracy(model, data, k: int = KNN_K) -> float:
    """Test accuracy of a majority vote among the k training examples nearest in cosine similarity."""
    bank = F.normalize(encode(model, data.x_train), dim=1)
    queries = F.normalize(encode(model, data.x_test), dim=1)
    correct = 0
    for i in range(0, len(queries), EVAL_BATCH):
        nearest = (queries[i:i + EVAL_BATCH] @ bank.T).topk(min(k, len(bank)), dim=1).indices
        votes = F.one_hot(data.y_train[nearest], data.num_classes).sum(1)
        correct += int((votes.argmax(1) == data.y_test[i:i + EVAL_BATCH]).sum())
    return correct / len(queries)


def probe_head(linear: nn.Linear) -> nn.Sequential:
    """The probe: features standardized with fixed statistics (set by `probe_phase`), then `linear`."""
    return nn.Sequential(Normalize(linear.in_features), linear)


def probe_phase(config: dict, model, data) -> Phase:
    """Train the probe `model.head` on frozen features of `data` (computed here, once, as are the
    standardization statistics) with the `probe` settings."""
    train_features, test_features = encode(model, data.x_train), encode(model, data.x_test)
    standardize = model.head[0]
    standardize.mean.copy_(train_features.mean(0))
    standardize.std.copy_(train_features.std(0) + 1e-6)
    probe = config["probe"]
    settings = {**config["train"], **probe, "optimizer": "adam", "schedule": "cosine", "amp": False}

    def evaluate(full):
        return {"probe/test_acc": accuracy(model.head, test_features, data.y_test)}

    return Phase("probe", model.head, classification_loss(model.head), train_features, data.y_train, settings,
                 evaluate)
