"""Robustness metrics from minimal L2 adversarial distances found by a decision-based attack.

Conventions: the first `samples` test points are attacked (at most the whole test set), or with
`correct_only` the first `samples` correctly classified ones (Yang et al.'s protocol). Robust accuracy is
reported both ways: `adv_acc_eps_E` over all test points, a misclassified point counting as distance 0
(RobustBench), and `adv_acc_correct_eps_E` among the correctly classified points (the paper's distances are
over those). With `correct_only`, the first is the clean accuracy times the second, and `adv_auc` likewise.
Points with no starting point (the model predicted their class everywhere the attack looked) have distance
inf but are never counted as robust: they lower every robust accuracy and the AUC, and are reported as
`attack_start_failures`. `adv_dist_median` and `adv_dist_mean` are over the attacked points with a finite
distance, `adv_dist_median_correct` over the correctly classified ones. The start pool (`start_pool`
points, default 1000) is drawn with the seed from the test points not attacked; its one-off predictions are
`attack_pool_queries`, apart from the per-point `attack_queries_mean`.
"""
import math
import numbers
import time

import numpy as np
import torch

from . import attacks

SPEC_DEFAULTS = {"seed": 0, "start_pool": 1000, "correct_only": False}


def evaluate(model, test_data, attack_spec, state_file=None) -> dict:
    """Clean accuracy on the whole test set and attack metrics on its first `samples` points
    (`state_file`: where the attack keeps its progress, see `attacks.run`)."""
    spec = {**SPEC_DEFAULTS, **attack_spec}
    missing = [key for key in ("name", "samples", "max_queries", "eps") if key not in spec]
    if missing:
        raise ValueError(f"attack spec lacks {missing}")
    name, samples, max_queries = spec.pop("name"), spec.pop("samples"), spec.pop("max_queries")
    eps, seed, pool_size = list(spec.pop("eps")), int(spec.pop("seed")), spec.pop("start_pool")
    correct_only = spec.pop("correct_only")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise ValueError(f"attack samples must be an integer >= 1, got {samples!r}")
    if not eps:
        raise ValueError("attack eps must list at least one radius")
    bad = [e for e in eps if not e > 0]
    if bad:
        raise ValueError(f"attack eps must all be > 0, got {bad}")
    if isinstance(pool_size, bool) or not isinstance(pool_size, numbers.Integral) or pool_size < 0:
        raise ValueError(f"attack start_pool must be an integer >= 0, got {pool_size!r}")
    attacks.validate(name, max_queries, spec)

    x_test, y_test = test_data
    device = attacks.model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            labels = torch.cat([attacks.predict(model, xs.to(device)) for xs in x_test.split(4096)])
    finally:
        model.train(was_training)
    clean_acc = (labels.cpu() == y_test.cpu()).float().mean().item()

    correct = labels.cpu() == y_test.cpu()
    candidates = correct.nonzero().squeeze(1) if correct_only else torch.arange(len(x_test))
    attacked = candidates[:samples]
    if len(attacked) == 0:
        raise ValueError("attack correct_only: the model classifies no test point correctly")
    rest = torch.ones(len(x_test), dtype=torch.bool)
    rest[attacked] = False
    rest = rest.nonzero().squeeze(1)
    picked = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:pool_size]
    pool = x_test[rest[picked]] if len(picked) else None
    started = time.perf_counter()
    result = attacks.run(model, x_test[attacked], y_test[attacked], name, max_queries, seed=seed,
                         start_pool=pool, state_file=state_file, **spec)
    seconds = time.perf_counter() - started

    failed = np.array([kind == "none" for kind in result.start])
    was_correct = correct[attacked].numpy()
    metrics = {"clean_acc": clean_acc, **_distance_metrics(result.distances.numpy(), failed, was_correct, eps,
                                                           clean_acc if correct_only else None)}
    for iteration, (distances, queries) in sorted(result.trace.items()):  # the attack's convergence
        partial = _distance_metrics(distances.numpy(), failed, was_correct, eps, clean_acc if correct_only else None)
        metrics.update({f"iter{iteration}/{key}": value for key, value in partial.items()})
        metrics[f"iter{iteration}/attack_queries_mean"] = float(queries.double().mean())
    metrics.update({
        "attack_samples": len(attacked),
        "attack_queries_mean": float(result.queries.double().mean()),
        "attack_pool_queries": result.pool_queries,
        "attack_seconds": seconds,  # of this run: one that continued an interrupted attack took less
        "attack_resumed_at": result.resumed_at,
        "attack_start_failures": int(failed.sum()),
        "attack_success_rate": float(np.isfinite(result.distances.numpy()).mean()),
        "distances": result.distances.numpy(),
    })
    return metrics


def _distance_metrics(dist, failed, was_correct, eps, clean_acc) -> dict:
    """Distance and robust-accuracy metrics of the attacked points' distances (clean_acc: given with
    correct_only, whose all-points figures are clean_acc × the figures among the correct points)."""
    robust_dist = np.where(failed, 0.0, dist)  # a start failure is never robust
    found = dist[np.isfinite(dist)]
    found_correct = dist[np.isfinite(dist) & was_correct]
    metrics = {
        "adv_dist_median": float(np.median(found)) if len(found) else math.nan,
        "adv_dist_mean": float(np.mean(found)) if len(found) else math.nan,
        "adv_dist_median_correct": float(np.median(found_correct)) if len(found_correct) else math.nan,
    }
    # over all test points: the attacked sample's share, or clean accuracy × the share among correct ones
    for e in sorted(eps):
        among_correct = float(np.mean(robust_dist[was_correct] > e)) if was_correct.any() else math.nan
        metrics[f"adv_acc_eps_{eps_name(e)}"] = float(np.mean(robust_dist > e)) if clean_acc is None \
            else clean_acc * among_correct
        metrics[f"adv_acc_correct_eps_{eps_name(e)}"] = among_correct
    metrics["adv_auc"] = robust_auc(robust_dist, max(eps)) * (1.0 if clean_acc is None else clean_acc)
    return metrics


def eps_name(eps: float) -> str:
    """repr of the float without exponent notation, so metric names keep to [A-Za-z0-9_./]."""
    return np.format_float_positional(float(eps), trim="0")


def robust_auc(distances, max_eps: float) -> float:
    """Area under robust accuracy(ε) = mean(d > ε) for ε in [0, max_eps], divided by max_eps.

    Exact for the empirical curve (what a trapezoid on an ever finer grid converges to):
    ∫_0^E 1[d > ε] dε = min(d, E)."""
    return float(np.mean(np.minimum(distances, max_eps)) / max_eps)
