"""The attacks' start search keeps drawing until a start is found or the budget is spent (issue 14, item 9)."""
import math

import pytest
import torch

from specreg import attacks
from test_attacks import Counting, Linear

pytestmark = pytest.mark.usefixtures("one_thread")


def one_class_problem(n=64, d=64, gap=0.6, seed=0):
    """n points of class 0, all on the side of a random hyperplane where uniform noise lands (the noise's
    centre lies `gap` from it, so under 2% of noise images cross), each built as its foot on the plane
    (inside the box) minus r·(unit normal): the exact distance in the box is r, drawn from [0.05, 0.4]."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    normal = w / w.norm()
    centre = torch.full((d,), 0.5, dtype=torch.float64)
    along = 0.3 * torch.rand(n, d, generator=gen, dtype=torch.float64) - 0.15
    along -= (along @ normal)[:, None] * normal
    foot = centre + gap * normal + along
    r = 0.05 + 0.35 * torch.rand(n, generator=gen, dtype=torch.float64)
    x = foot - r[:, None] * normal
    assert foot.min() > 0 and foot.max() < 1 and x.min() > 0 and x.max() < 1
    model = Linear(w, -w.norm().item() * (normal @ centre + gap).item())
    return model, x.float(), torch.zeros(n, dtype=torch.long), r


def nowhere_problem(n=5, d=64, seed=0):
    """A linear model whose class 1 lies outside the box: class 0 is predicted everywhere in it."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen)
    x = torch.rand(n, d, generator=gen)
    return Linear(w, -w.clamp(min=0).sum().item() - 1), x, torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("name", ["tangent", "hsja"])
def test_one_class_batch_without_pool_gets_near_exact_distances(name):
    """The issue's case: noise, blends and the batch give almost no start (the search before the fix gave
    6 of the 64 points one and left 58 at inf); every point must now get a distance near the exact one."""
    model, x, y, r = one_class_problem()
    assert (model(x).argmax(1) == 0).all()
    torch.testing.assert_close(model.margin(x).abs() / model.w.norm(), r, atol=1e-6, rtol=0)
    noise = torch.rand(10_000, 64, generator=torch.Generator().manual_seed(1))
    assert (model(noise).argmax(1) == 1).float().mean() < 0.02  # the trap: noise seldom crosses
    result = attacks.run(model, x, y, name, 2000, progress=False)
    assert torch.isfinite(result.distances).all()
    assert (result.queries <= 2000).all()
    assert (model(result.adversarial).argmax(1) == 1).all()
    torch.testing.assert_close((result.adversarial - x).norm(dim=1).double(), result.distances)
    ratio = result.distances / r
    assert (ratio >= 1 - 1e-5).all()
    assert ratio.median() <= 1.05 and ratio.max() <= 1.1


@pytest.mark.parametrize("name", attacks.ATTACKS)
def test_class_predicted_everywhere_is_a_start_failure_only_once_the_budget_is_spent(name):
    model, x, y = nowhere_problem()
    counting = Counting(model)
    result = attacks.run(counting, x, y, name, 301, progress=False)  # 301 − 17: the last round is cut short
    assert result.start == ["none"] * len(x)
    assert (result.distances == math.inf).all() and torch.equal(result.adversarial, x)
    assert (result.queries == 301).all() and counting.rows == 301 * len(x)


def test_without_a_budget_the_start_search_stops_at_start_queries():
    model, x, y = nowhere_problem()
    result = attacks.run(model, x, y, "tangent", None, iterations=3, progress=False)
    assert result.start == ["none"] * len(x)
    assert (result.queries == attacks.START_QUERIES).all()


def test_small_budgets_are_kept_and_late_starts_are_adversarial():
    """With budgets that end inside the search, no sample asks more than its budget, every start found
    (even with no room left to search it) is adversarial at its reported distance, and the exact distance
    bounds it from below."""
    model, x, y, r = one_class_problem(n=32)
    for budget in (18, 25, 40):
        result = attacks.run(model, x, y, "boundary-search", budget, progress=False)
        assert (result.queries <= budget).all()
        found = torch.isfinite(result.distances)
        assert 0 < found.sum() < len(x)  # both cases occur
        assert [kind == "none" for kind in result.start] == (~found).tolist()
        assert (result.queries[~found] == budget).all()
        assert (model(result.adversarial[found]).argmax(1) == 1).all()
        torch.testing.assert_close((result.adversarial - x).norm(dim=1).double()[found], result.distances[found])
        assert (result.distances[found] >= r[found] - 1e-5).all()


def test_further_rounds_are_reproducible_for_a_seed_and_leave_global_rng_alone():
    model, x, y, _ = one_class_problem(n=16)
    state = torch.get_rng_state()
    a, b, c = (attacks.run(model, x, y, "hsja", 300, seed=seed, progress=False) for seed in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.distances, b.distances) and torch.equal(a.queries, b.queries) and a.start == b.start
    assert not torch.equal(a.distances, c.distances)
