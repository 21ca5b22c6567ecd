"""Robustness metrics from minimal L2 adversarial distances found by a decision-based attack.

Conventions: the first `samples` test points are attacked (at most the whole test set), or with
`correct_only` the first `samples` correctly classified ones (Yang et al.'s protocol). Robust accuracy at
radius E is reported both ways: `acc_E` over all test points, a misclassified point counting as distance 0
(RobustBench), and `kept_E`, the share of the correctly classified points still classified correctly within
E (the paper's distances are over those). With `correct_only`, `acc_E` is the clean accuracy times `kept_E`,
and `adv_auc` likewise. Points with no starting point (the model predicted their class everywhere the
attack looked) have distance inf but are never counted as robust: they lower every robust accuracy and the
AUC, and are reported as `attack_start_failures`. `med_dist` and `mean_dist` are over the attacked points
with a finite distance, `med_dist_correct` over the correctly classified ones. The start pool (`start_pool`
points, default 1000) is drawn with the seed from the test points not attacked; its one-off predictions are
`attack_pool_queries`, apart from the per-point `attack_queries_mean`.

Names are short and say what differs first (`acc_0.25`, `kept_0.25`, not `adv_acc_correct_eps_0.25`): a
narrow MLflow column or chart title shows about nine characters. With an attack `trace`, `attack_trace` maps
each traced iteration, and the last one done, to the distance metrics and `attack_queries_mean` after it (the
platform logs them as the metrics' history, one step per iteration).
"""
import math
import numbers
import re
import time

import numpy as np
import torch

from . import attacks

SPEC_DEFAULTS = {"seed": 0, "start_pool": 1000, "correct_only": False}
DISTANCE_METRICS = ("med_dist", "mean_dist", "med_dist_correct", "adv_auc")
RADIUS_METRIC = re.compile(r"^(acc|kept)_([0-9][0-9.]*)$")


def radius_metric(eps: float, among_correct: bool = False) -> str:
    """The name of robust accuracy at radius eps: `acc_<eps>` over all test points, `kept_<eps>` among the
    correctly classified ones."""
    return f"{'kept' if among_correct else 'acc'}_{eps_name(eps)}"


def metric_radius(name: str) -> tuple[float, bool] | None:
    """(eps, among_correct) of a robust-accuracy metric name, None for any other name."""
    found = RADIUS_METRIC.match(name)
    return None if found is None else (float(found.group(2)), found.group(1) == "kept")


def is_attack_metric(name: str) -> bool:
    """Whether a metric comes from the attack, so depends on its threat model."""
    return name in DISTANCE_METRICS or name.startswith("attack_") or metric_radius(name) is not None


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

    def summary(distances, queries) -> dict:
        return {**_distance_metrics(distances.numpy(), failed, was_correct, eps, clean_acc if correct_only else None),
                "attack_queries_mean": float(queries.double().mean())}

    metrics = {"clean_acc": clean_acc, **summary(result.distances, result.queries)}
    if result.trace:  # the attack's convergence, ending with the full run
        trace = {**result.trace, result.iterations: (result.distances, result.queries)}
        metrics["attack_trace"] = {t: summary(*trace[t]) for t in sorted(trace)}
    metrics.update({
        "attack_samples": len(attacked),
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
        "med_dist": float(np.median(found)) if len(found) else math.nan,
        "mean_dist": float(np.mean(found)) if len(found) else math.nan,
        "med_dist_correct": float(np.median(found_correct)) if len(found_correct) else math.nan,
    }
    # over all test points: the attacked sample's share, or clean accuracy × the share among correct ones
    for e in sorted(eps):
        among_correct = float(np.mean(robust_dist[was_correct] > e)) if was_correct.any() else math.nan
        metrics[radius_metric(e)] = float(np.mean(robust_dist > e)) if clean_acc is None \
            else clean_acc * among_correct
        metrics[radius_metric(e, among_correct=True)] = among_correct
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
