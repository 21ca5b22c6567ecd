"""The options that state Yang et al.'s protocol: the attack's iteration mode, tolerance and trace, attacking
correct points only, `train.eval_every`, and the burn-in prefix resumed and shared across run lengths."""
import math

import numpy as np
import pytest
import torch

import specreg
from specreg import attacks, robustness
from specreg_platform.run import burnin
from test_attacks import Counting, linear_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def authors_queries(iterations: int, init: int = 100) -> int:
    """Σ_i int(init·√i): the normal-estimate probes of Yang et al.'s TangentAttack over its iterations."""
    return sum(int(init * math.sqrt(i)) for i in range(1, iterations + 1))


@pytest.mark.parametrize("name", ["tangent", "hsja"])
def test_iteration_mode_runs_the_authors_schedule_without_a_budget(name):
    model, x, y = linear_problem(n=30)
    counting = Counting(model)
    result = attacks.run(counting, x, y, name, None, iterations=6, progress=False, trace=(2, 4))
    probes = authors_queries(6)  # 1,393: the estimates alone; each iteration adds its step and search
    assert (result.queries >= probes).all() and (result.queries < probes + 6 * 60 + 200).all()
    assert counting.rows == int(result.queries.sum())
    exact = model.exact(x).numpy()
    ratio = result.distances.numpy() / exact
    assert (ratio >= 1 - 1e-6).all() and np.median(ratio) < 1.1
    # the trace after iteration 4 is what a 4-iteration attack returns, and distances only shrink
    short = attacks.run(model, x, y, name, None, iterations=4, progress=False)
    assert torch.equal(result.trace[4][0], short.distances) and torch.equal(result.trace[4][1], short.queries)
    assert (result.trace[2][0] >= result.trace[4][0]).all() and (result.trace[4][0] >= result.distances).all()


def test_iterations_cap_the_attack_under_a_budget_too():
    model, x, y = linear_problem(n=10)
    capped = attacks.run(model, x, y, "hsja", 100_000, iterations=3, progress=False)
    assert (capped.queries <= authors_queries(3) + 3 * 60 + 200).all()


def test_tolerance_sets_the_binary_search_to_the_blend_factor():
    """boundary-search's point lies within tolerance·‖start − x‖ ≤ tolerance·√d of the exact boundary, on the
    adversarial side; HopSkipJump's default θ = 1/d^1.5 stops 10 halvings short of 1e-5."""
    model, x, y = linear_problem(n=40)
    gaps = {}
    for tolerance in (1e-2, 1e-5):
        result = attacks.run(model, x, y, "boundary-search", 1000, tolerance=tolerance, progress=False)
        gap = model.exact(result.adversarial).numpy()  # distance of the returned point to the hyperplane
        assert (model(result.adversarial).argmax(1) != y).all()
        assert gap.max() <= tolerance * math.sqrt(x.shape[1])
        gaps[tolerance] = gap.max()
    assert gaps[1e-5] < 1e-4 < gaps[1e-2]


@pytest.mark.parametrize("bad, fault", [({"iterations": 0}, "iterations"), ({"tolerance": 1.5}, "tolerance"),
                                        ({"trace": [0]}, "trace")])
def test_bad_protocol_options_fail_before_any_query(bad, fault):
    model, x, y = linear_problem(n=4)
    counting = Counting(model)
    with pytest.raises(ValueError, match=fault):
        attacks.run(counting, x, y, "tangent", 100, **bad)
    with pytest.raises(ValueError, match="iterations"):
        attacks.run(counting, x, y, "tangent", None)
    assert counting.rows == 0


def test_correct_only_attacks_the_first_correct_points_and_reports_robustness_both_ways():
    model, x, y = linear_problem(n=100)
    wrong = torch.tensor([0, 3, 4, 10])
    y[wrong] = 1 - y[wrong]
    spec = {"name": "hsja", "samples": 20, "max_queries": 600, "eps": [0.02, 0.05], "progress": False,
            "correct_only": True, "start_pool": 0}
    metrics = robustness.evaluate(model, (x, y), spec)
    clean = 96 / 100
    assert metrics["clean_acc"] == pytest.approx(clean) and metrics["attack_samples"] == 20
    attacked = [i for i in range(100) if i not in wrong.tolist()][:20]
    dist = metrics["distances"]
    assert (dist > 0).all()  # no misclassified point among them
    exact = model.exact(x[attacked]).numpy()
    assert (dist / exact >= 1 - 1e-6).all() and (dist / exact).max() < 1.5  # they are those points
    for eps in ("0.02", "0.05"):
        among = np.mean(dist > float(eps))
        assert metrics[f"kept_{eps}"] == pytest.approx(among)
        assert metrics[f"acc_{eps}"] == pytest.approx(clean * among)
    assert metrics["med_dist_correct"] == pytest.approx(np.median(dist))

    # the default protocol attacks the first points, misclassified ones at distance 0
    default = robustness.evaluate(model, (x, y), {**spec, "correct_only": False})
    d = default["distances"]
    assert (d[[0, 3, 4, 10]] == 0).all() and default["acc_0.02"] == pytest.approx(np.mean(d > 0.02))
    correct = np.ones(20, bool)
    correct[[0, 3, 4, 10]] = False
    assert default["kept_0.02"] == pytest.approx(np.mean(d[correct] > 0.02))
    assert default["med_dist_correct"] == pytest.approx(np.median(d[correct]))


def test_trace_gives_the_distance_metrics_after_each_iteration_and_the_full_run():
    model, x, y = linear_problem(n=60)
    spec = {"name": "tangent", "samples": 12, "max_queries": None, "iterations": 4, "trace": [1, 2],
            "eps": [0.05], "progress": False}
    metrics = robustness.evaluate(model, (x, y), spec)
    trace = metrics["attack_trace"]
    assert list(trace) == [1, 2, 4]
    assert trace[1]["med_dist"] >= trace[2]["med_dist"] >= trace[4]["med_dist"]
    assert trace[1]["attack_queries_mean"] < trace[2]["attack_queries_mean"] < trace[4]["attack_queries_mean"]
    assert {k: trace[4][k] for k in trace[4]} == {k: metrics[k] for k in trace[4]}  # the last is the full run
    assert set(trace[1]) == {"med_dist", "mean_dist", "med_dist_correct", "adv_auc", "acc_0.05", "kept_0.05",
                             "attack_queries_mean"}


DIGITS = {"data": {"name": "digits"}, "model": {"name": "slp", "width": 32},
          "train": {"epochs": 5, "batch_size": 256, "lr": 0.05, "schedule": "constant", "eval_every": 2}}


def test_eval_every_skips_the_spectral_metrics_between_evaluations_but_not_at_the_burnin_or_the_end():
    config = {**DIGITS, "regularizer": {"kind": "rep-spectral", "strength": 1e-3, "burnin": 3}}
    history = specreg.run_experiment(config)["history"]
    assert [m["epoch"] for m in history if "alpha_hat" in m] == [2, 3, 4, 5]  # 2, 4: due; 3: burn-in; 5: end
    assert all("test_acc" in m for m in history)
    every = specreg.run_experiment({**config, "train": {**config["train"], "eval_every": 1}})["history"]
    for a, b in zip(history, every):  # evaluating changes nothing in training
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]


def test_a_prefix_killed_midway_resumes_to_the_same_weights(tmp_path):
    config = specreg.validate_config({**DIGITS, "regularizer": {"kind": "rep-spectral", "strength": 1e-3,
                                                                 "burnin": 4}})
    whole, trained = burnin.ensure(tmp_path / "a", config)
    assert trained
    key = burnin.cache_key(config)
    partial = tmp_path / "b" / f"{key}.partial-dead0001"  # what a trial killed after 2 of 4 epochs leaves
    specreg.run_experiment(burnin.prefix_config(config), checkpoint_dir=partial, stop_after_epochs=2)
    resumed, trained = burnin.ensure(tmp_path / "b", config)
    assert trained and not partial.exists()
    a, b = specreg.load_checkpoint(whole), specreg.load_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [m["epoch"] for m in burnin.history(resumed)] == [1, 2, 3, 4]


def test_constant_schedule_prefixes_are_shared_across_run_lengths_and_cosine_ones_are_not():
    def key(epochs, schedule):
        train = {**DIGITS["train"], "epochs": epochs, "schedule": schedule}
        return burnin.cache_key(specreg.validate_config({**DIGITS, "train": train,
                                                         "regularizer": {"kind": "rep-spectral", "burnin": 3}}))

    assert key(5, "constant") == key(8, "constant")
    assert key(5, "cosine") != key(8, "cosine")
