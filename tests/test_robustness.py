"""robustness.evaluate: metric names and values, start failures, bad attack specs."""
import re

import numpy as np
import pytest
import torch
from torch import nn

from specreg import robustness
from test_attacks import Counting, linear_problem

SPEC = {"name": "tangent", "samples": 40, "max_queries": 400, "eps": [0.05, 0.1, 0.2], "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_are_named_and_consistent():
    model, x, y = linear_problem(n=120)
    y[0] = 1 - y[0]  # misclassified: distance 0
    metrics = robustness.evaluate(model, (x, y), SPEC)
    for key in ("clean_acc", "med_dist", "mean_dist", "adv_auc", "attack_queries_mean",
                "attack_seconds", "attack_start_failures", "attack_success_rate", "distances"):
        assert key in metrics
    assert all(re.fullmatch(r"[A-Za-z0-9_./]+", key) for key in metrics)
    assert metrics["clean_acc"] == pytest.approx(119 / 120)
    dist = metrics["distances"]
    assert isinstance(dist, np.ndarray) and dist.shape == (40,) and dist[0] == 0
    accs = [metrics[f"acc_{e}"] for e in ("0.05", "0.1", "0.2")]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] == pytest.approx(np.mean(dist > 0.05))
    grid = np.linspace(0, 0.2, 20001)
    curve = (dist[:, None] > grid[None]).mean(0)
    assert metrics["adv_auc"] == pytest.approx(np.trapezoid(curve, grid) / 0.2, abs=1e-3)
    assert metrics["med_dist"] == pytest.approx(np.median(dist))
    assert metrics["attack_queries_mean"] <= 400
    assert metrics["attack_pool_queries"] == 80  # the 80 test points not attacked
    assert metrics["attack_success_rate"] == 1.0 and metrics["attack_start_failures"] == 0


def test_start_failures_are_never_robust():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([1.0, 0.0]).expand(len(x), 2)

    _, x, _ = linear_problem(n=30)
    y = torch.arange(30) % 2  # class 0 points are correct but nothing is ever class 1
    metrics = robustness.evaluate(Constant(), (x, y), SPEC | {"samples": 20})
    assert metrics["attack_start_failures"] == 10
    assert metrics["attack_success_rate"] == 0.5
    assert metrics["acc_0.05"] == 0.0 and metrics["adv_auc"] == 0.0
    assert np.isinf(metrics["distances"][::2]).all() and (metrics["distances"][1::2] == 0).all()


def test_eps_names_keep_to_plain_characters():
    assert [robustness.eps_name(e) for e in (1.0, 0.5, 2, 1e-05, 0.1)] == ["1.0", "0.5", "2.0", "0.00001", "0.1"]


@pytest.mark.parametrize("change, fault", [
    ({"eps": []}, "eps"),
    ({"eps": [0.5, -0.5]}, "-0.5"),
    ({"eps": [0.0]}, "eps"),
    ({"samples": 0}, "samples"),
    ({"max_queries": 0}, "max_queries"),
    ({"name": "pgd"}, "pgd"),
    ({"start_pool": -1}, "start_pool"),
])
def test_bad_specs_fail_before_any_query(change, fault):
    model, x, y = linear_problem(n=10)
    counting = Counting(model)
    with pytest.raises(ValueError, match=fault):
        robustness.evaluate(counting, (x, y), SPEC | change)
    assert counting.rows == 0


def test_model_output_is_checked_before_the_attack():
    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(len(x), -1).sum(1)

    _, x, y = linear_problem(n=10)
    with pytest.raises(ValueError, match="shape \\(N, classes\\)"):
        robustness.evaluate(Flat(), (x, y), SPEC)
