"""Batched hard-label attacks: exact distances on linear boundaries, starting points, query accounting."""
import math

import pytest
import torch
from torch import nn

from specreg import attacks

from test_data import FASHION_DEBIAN

pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """Logits [0, w·x + b], computed in float64 so the exact boundary distance |w·x + b| / ‖w‖ holds."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", w.double())
        self.b = b

    def margin(self, x):
        return x.reshape(len(x), -1).double() @ self.w + self.b

    def forward(self, x):
        z = self.margin(x)
        return torch.stack([torch.zeros_like(z), z], 1).float()

    def exact(self, x):
        return self.margin(x).abs() / self.w.norm()


class Band(nn.Module):
    """Class 1 where the mean pixel lies in (0.3, 0.45): noise (mean ≈ 0.5) is class 0, blends may not be."""

    def forward(self, x):
        m = x.reshape(len(x), -1).mean(1)
        z = (m - 0.3) * (0.45 - m)
        return torch.stack([torch.zeros_like(z), z], 1)


class Counting(nn.Module):
    """Counts every row the attack feeds the wrapped model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows, self.largest = model, 0, 0

    def forward(self, x):
        self.rows += len(x)
        self.largest = max(self.largest, len(x))
        return self.model(x)


def linear_problem(n=100, d=64, seed=0):
    """Inputs in [0.35, 0.65] (clear of the box) with small margins on both sides of a random hyperplane."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=gen)
    x = 0.35 + 0.3 * torch.rand(n, d, generator=gen)
    z = x.double() @ w.double()
    model = Linear(w, -z.mean().item())
    y = (model.margin(x) > 0).long()
    return model, x, y


def noise_side_problem(n=60, d=64, seed=0):
    """Class 1 iff mean(x) < 0.3, so every uniform-noise image (mean 0.5 ± 0.036) is class 0; the batch
    mixes both classes and class-0 points can only start from a class-1 neighbour."""
    gen = torch.Generator().manual_seed(seed)
    centre = 0.25 + 0.1 * torch.rand(n, 1, generator=gen)
    x = centre + 0.1 * (2 * torch.rand(n, d, generator=gen) - 1)
    model = Linear(-torch.ones(d), 0.3 * d)
    y = (model.margin(x) > 0).long()
    return model, x, y


@pytest.mark.parametrize("name", ["tangent", "hsja"])
def test_linear_boundary_distances_are_near_exact(name):
    model, x, y = linear_problem()
    result = attacks.run(model, x, y, name, 2000, progress=False)
    exact = model.exact(x)
    ratio = result.distances / exact
    assert ratio.quantile(0.9) <= 1.05 and ratio.max() <= 1.1  # attack seeds 0-3: q90 ≤ 1.039, max ≤ 1.056
    assert (result.distances >= exact - 1e-6).all()
    assert (result.queries <= 2000).all()


@pytest.mark.parametrize("name", ["tangent", "hsja"])
def test_noise_side_classifier_still_gets_finite_distances(name):
    model, x, y = noise_side_problem()
    assert 0 < y.sum() < len(y)
    result = attacks.run(model, x, y, name, 2000, progress=False)
    exact = model.exact(x)
    assert torch.isfinite(result.distances).all()
    assert (result.distances >= exact - 1e-6).all()
    ratio = result.distances / exact
    assert ratio.quantile(0.9) <= 1.05 and ratio.max() <= 1.1  # attack seeds 0-3: q90 ≤ 1.037, max ≤ 1.044
    class0 = [kind for kind, label in zip(result.start, y) if label == 0]
    assert set(class0) <= {"nearest", "pool"}


def test_start_kinds_noise_blend_pool_none():
    model, x, y = noise_side_problem()
    one, zero = x[y == 1][:1], x[y == 0][:1]
    ones, zeros = torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    assert attacks.run(model, one, ones, "boundary-search", 100).start == ["noise"]
    alone = attacks.run(model, zero, zeros, "boundary-search", 100)  # noise never crosses: the wider draws do
    assert alone.start[0] in ("gaussian", "corner", "blend") and alone.distances[0] >= model.exact(zero)[0] - 1e-6
    pooled = attacks.run(model, zero, zeros, "boundary-search", 100, start_pool=x[y == 1][1:5])
    assert pooled.start == ["pool"] and math.isfinite(pooled.distances[0]) and pooled.pool_queries == 4
    dark = torch.full((1, 64), 0.2)
    assert attacks.run(Band(), dark, zeros, "boundary-search", 100).start == ["blend"]


def test_queries_are_counted_per_row_and_within_budget():
    model, x, y = linear_problem(n=30)
    y[:3] = 1 - y[:3]  # misclassified
    pool = linear_problem(n=40, seed=1)[1]
    for name, budget in [("tangent", 300), ("hsja", 457), ("hsja", 37), ("boundary-search", 5), ("tangent", 1)]:
        counting = Counting(model)
        result = attacks.run(counting, x, y, name, budget, start_pool=pool, batch_size=256)
        assert counting.rows == int(result.queries.sum()) + result.pool_queries
        assert counting.largest <= 256
        assert result.pool_queries == len(pool)
        assert (result.queries <= budget).all()
        assert (result.queries[:3] == 1).all()


def boundary_points(model, x):
    """x projected onto the linear model's boundary w·x + b = 0."""
    w = model.w.float()
    return x - (model.margin(x).float() / w.dot(w))[:, None] * w


def test_normal_estimate_is_the_direct_formula_whatever_the_chunking():
    """The chunked estimate equals HopSkipJump's formula computed sample by sample on the same probes
    (same draws: m shared directions, one ±1 flip per sample and coordinate), for uneven probe counts."""
    model, x, y = linear_problem(n=5, d=16)
    xb = boundary_points(model, x)
    idx, evals = torch.arange(5), torch.tensor([30, 12, 45, 1, 20])
    delta = torch.tensor([0.1, 0.05, 0.2, 0.1, 0.01])
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(45, 16, generator=gen)
    shared /= shared.norm(dim=1, keepdim=True)
    flips = torch.randint(0, 2, (5, 16), generator=gen, dtype=torch.float32) * 2 - 1
    expected = []
    for i in range(5):
        probes = (xb[i] + delta[i] * flips[i] * shared[:evals[i]]).clamp(0, 1)
        sign = 2 * (model(probes).argmax(1) != y[i]).float() - 1
        if sign.mean().abs() < 1:
            sign = sign - sign.mean()
        grad = (sign[:, None] * (probes - xb[i])).sum(0)
        expected.append(grad / grad.norm())
    for batch_size in (7, 64, 10_000):
        oracle = attacks._Oracle(model, (16,), y, 100, batch_size)
        u = attacks._estimate_normal(oracle, xb, idx, delta, evals, torch.Generator().manual_seed(0))
        torch.testing.assert_close(u, torch.stack(expected), atol=1e-5, rtol=1e-4)
        assert torch.equal(oracle.queries, evals)


def test_tangent_point_touches_the_ball_on_its_upper_side_in_the_plane_of_the_input_and_normal():
    """Against the definition: k lies on the sphere of radius r about xb, the line from x0 to k is tangent
    to it ((k − xb) ⊥ (k − x0)), k lies in the plane of x0 − xb and u, and of the two tangent points in
    that plane it is the one farther along u."""
    gen = torch.Generator().manual_seed(0)
    x0, xb = torch.randn(50, 30, generator=gen, dtype=torch.float64), torch.randn(50, 30, generator=gen,
                                                                                   dtype=torch.float64)
    u = torch.randn(50, 30, generator=gen, dtype=torch.float64)
    u /= u.norm(dim=1, keepdim=True)
    radius = (x0 - xb).norm(dim=1) * torch.rand(50, generator=gen, dtype=torch.float64).clamp(0.05, 0.95)
    k = attacks._tangent_point(xb, u, attacks._tangent_frame(x0, xb, u), radius)
    kb, k0 = k - xb, k - x0
    torch.testing.assert_close(kb.norm(dim=1), radius)
    torch.testing.assert_close((kb * k0).sum(1), torch.zeros(50, dtype=torch.float64), atol=1e-9, rtol=0)
    plane = torch.linalg.qr(torch.stack([x0 - xb, u], 2)).Q  # (50, 30, 2) basis of the plane
    torch.testing.assert_close((plane @ (plane.transpose(1, 2) @ kb[..., None]))[..., 0], kb)
    # the other tangent point: k's mirror image across the line from xb to x0
    ox = (x0 - xb) / (x0 - xb).norm(dim=1, keepdim=True)
    mirror = 2 * (kb * ox).sum(1, keepdim=True) * ox - kb
    assert ((kb * u).sum(1) >= (mirror * u).sum(1) - 1e-12).all()


def test_normal_estimate_finds_the_linear_boundary_normal():
    model, x, y = linear_problem(n=20, d=64)
    oracle = attacks._Oracle(model, (64,), y, 10_000, 256)
    u = attacks._estimate_normal(oracle, boundary_points(model, x), torch.arange(20), torch.full((20,), 0.01),
                                 torch.full((20,), 2000), torch.Generator().manual_seed(0))
    toward_adversarial = torch.where(y == 1, -1.0, 1.0)[:, None] * model.w.float() / model.w.norm().float()
    assert ((u * toward_adversarial).sum(1) > 0.9).all()


def test_progress_bar_shows_samples_and_queries(capsys):
    model, x, y = linear_problem(n=8)
    attacks.run(model, x, y, "hsja", 300, progress=True)
    err = capsys.readouterr().err
    assert "8/8" in err and "queries=" in err


def test_reproducible_for_a_seed_and_leaves_global_rng_alone():
    model, x, y = linear_problem(n=20)
    state = torch.get_rng_state()
    a = attacks.run(model, x, y, "tangent", 500, seed=3)
    b = attacks.run(model, x, y, "tangent", 500, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.distances, b.distances) and torch.equal(a.adversarial, b.adversarial)
    assert torch.equal(a.queries, b.queries) and a.start == b.start
    c = attacks.run(model, x, y, "tangent", 500, seed=4)
    assert not torch.equal(a.distances, c.distances)


class Interrupting(nn.Module):
    """The wrapped model, until its `calls`-th forward pass: then it raises, as a killed process would stop."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.model(x)


@pytest.mark.parametrize("name", ["tangent", "hsja"])
def test_an_interrupted_attack_continues_from_its_state_file_to_the_uninterrupted_result(name, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(attacks, "STATE_SECONDS", 0.0)  # keep the progress after every iteration
    model, x, y = linear_problem(n=40)
    options = dict(seed=2, iterations=12, trace=(4, 8), progress=False)
    straight = attacks.run(model, x, y, name, None, **options)
    state = tmp_path / "attack.pt"
    with pytest.raises(KeyboardInterrupt):  # stopped mid-way, after a few iterations were kept
        attacks.run(Interrupting(model, calls=120), x, y, name, None, state_file=state, **options)
    kept = torch.load(state, weights_only=True)
    assert 1 <= kept["done"] < 12
    resumed = attacks.run(model, x, y, name, None, state_file=state, **options)
    assert torch.equal(resumed.distances, straight.distances) and torch.equal(resumed.queries, straight.queries)
    assert torch.equal(resumed.adversarial, straight.adversarial) and resumed.start == straight.start
    assert resumed.trace.keys() == straight.trace.keys() and all(
        torch.equal(a, b) for t in straight.trace for a, b in zip(resumed.trace[t], straight.trace[t]))
    assert resumed.resumed_at == kept["done"] and straight.resumed_at == 0
    assert not state.exists()  # removed once the attack finished


def test_progress_of_another_attack_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(attacks, "STATE_SECONDS", 0.0)
    model, x, y = linear_problem(n=30)
    other, _, _ = linear_problem(n=30, seed=1)  # other weights: its progress must not be continued
    state = tmp_path / "attack.pt"
    with pytest.raises(KeyboardInterrupt):
        attacks.run(Interrupting(other, calls=100), x, y, "tangent", None, iterations=10, state_file=state,
                    progress=False)
    assert state.exists()
    fresh = attacks.run(model, x, y, "tangent", None, iterations=10, progress=False)
    resumed = attacks.run(model, x, y, "tangent", None, iterations=10, state_file=state, progress=False)
    assert torch.equal(resumed.distances, fresh.distances) and torch.equal(resumed.queries, fresh.queries)
    assert resumed.resumed_at == 0


def test_box_is_respected_and_results_are_adversarial():
    gen = torch.Generator().manual_seed(0)
    d = 16
    x = torch.rand(40, 1, 4, 4, generator=gen)  # inputs on the whole cube: steps must be clipped
    w = torch.randn(d, generator=gen)
    model = Linear(w, -(x.reshape(40, -1).double() @ w.double()).median().item() + 1e-3)
    y = (model.margin(x) > 0).long()
    for name in attacks.ATTACKS:
        result = attacks.run(model, x, y, name, 400)
        assert result.adversarial.shape == x.shape
        assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
        assert (model(result.adversarial).argmax(1) != y).all()
        flat = (result.adversarial - x).reshape(40, -1).double()
        torch.testing.assert_close(flat.norm(dim=1), result.distances)


def test_misclassified_inputs_have_distance_zero():
    model, x, y = linear_problem(n=10)
    y[::2] = 1 - y[::2]
    result = attacks.run(model, x, y, "hsja", 300)
    assert (result.distances[::2] == 0).all() and (result.distances[1::2] > 0).all()
    assert result.start[::2] == ["misclassified"] * 5
    assert torch.equal(result.adversarial[::2], x[::2])


@pytest.mark.parametrize("kwargs, fault", [
    (dict(name="pgd"), "tangent, hsja, boundary-search"),
    (dict(max_queries=0), "max_queries"),
    (dict(max_queries=-5), "max_queries"),
    (dict(max_queries=2.5), "max_queries"),
    (dict(colour="red"), "colour"),
])
def test_bad_requests_fail_before_any_query(kwargs, fault):
    model, x, y = linear_problem(n=4)
    counting = Counting(model)
    args = dict(name="tangent", max_queries=100) | kwargs
    with pytest.raises(ValueError, match=fault):
        attacks.run(counting, x, y, **args)
    assert counting.rows == 0


@pytest.mark.parametrize("output", [lambda x: x.sum(1), lambda x: x[:, :1], lambda x: x[:-1, :2]])
def test_model_output_must_be_n_by_classes(output):
    class Bad(nn.Module):
        def forward(self, x):
            return output(x.reshape(len(x), -1))

    model, x, y = linear_problem(n=4)
    with pytest.raises(ValueError, match="shape \\(N, classes\\)"):
        attacks.run(Bad(), x, y, "tangent", 100)


def digits_model():
    """A small MLP on scikit-learn digits (specreg.data's split) and its held-out points."""
    from specreg import data

    digits = data.load({"name": "digits"})
    x, y = digits.x_train, digits.y_train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(15):
        for i in range(0, len(x), 100):
            loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, digits.x_test, digits.y_test


@pytest.mark.slow
def test_digits_mlp_tangent_is_no_worse_than_hsja():
    model, x, y = digits_model()
    x, y = x[:200], y[:200]
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    tangent = attacks.run(model, x, y, "tangent", 1000)
    hsja = attacks.run(model, x, y, "hsja", 1000)
    assert torch.isfinite(tangent.distances).all() and torch.isfinite(hsja.distances).all()
    assert tangent.distances.median() <= 1.1 * hsja.distances.median()


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DEBIAN.is_dir(), reason="needs the dataset-fashion-mnist package")
def test_fashion_mnist_slp_has_no_infinite_distance():
    """The case that motivated the start search: on the paper's SLP-2000 much of uniform noise lands in
    one class, so a noise-only start leaves points of that class unattacked (distance inf)."""
    from specreg import data, models

    fmnist = data.load({"name": "fashion_mnist", "train_subset": 10000})
    torch.manual_seed(0)
    model = models.build({"name": "slp", "width": 2000, "activation": "gelu"}, fmnist.input_shape, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for xb, yb in data.batches(fmnist.x_train, fmnist.y_train, 256, torch.Generator().manual_seed(0)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    model.eval()
    x, y = fmnist.x_test[:200], fmnist.y_test[:200]
    noise_classes = model(torch.rand(1000, *fmnist.input_shape)).argmax(1)
    assert noise_classes.bincount(minlength=10).max() > 250  # the trap: noise is skewed toward few classes
    result = attacks.run(model, x, y, "tangent", 1000, progress=False)
    assert torch.isfinite(result.distances).all()
    assert (result.queries <= 1000).all()
