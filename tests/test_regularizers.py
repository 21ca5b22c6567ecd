"""Each regularizer against an independent reference: dense SVDs, eigendecompositions, analytic values."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from specreg import models, regularizers


def mlp(widths=(24, 12), activation="relu", seed=0):
    torch.manual_seed(seed)
    return models.build({"name": "mlp", "widths": list(widths), "activation": activation}, (1, 4, 4), 5)


def dense_sigma(layer):
    return torch.linalg.svdvals(layer.weight.detach().double())[0].item()


def build(model, **spec):
    return regularizers.build({"strength": 1.0, "placement": "feature", **spec}).attach(model)


def test_registry_lists_every_kind_and_rejects_unknown():
    assert set(regularizers.REGULARIZERS) == {"none", "rep-spectral", "all-layer-spectral", "spectral-decay",
                                             "spectral-norm", "jacobian"}
    with pytest.raises(ValueError, match="rep-spectral"):
        regularizers.build({"kind": "rep"})


def test_rep_spectral_is_lambda_times_sum_of_squared_top_singular_values():
    model = mlp()
    reg = build(model, kind="rep-spectral", strength=0.3)
    expected = 0.3 * sum(dense_sigma(model.features[i]) ** 2 for i in (2, 4))
    assert reg.penalty(model).item() == pytest.approx(expected, rel=1e-4)
    assert reg.layer_names == ["features.2", "features.4"]


def test_rep_spectral_gradient_is_two_sigma_u_v():
    model = mlp()
    reg = build(model, kind="rep-spectral", placement="upto:1")
    reg.penalty(model).backward()
    weight = model.features[2].weight.detach().double()
    u, s, vh = torch.linalg.svd(weight)
    expected = 2 * s[0] * torch.outer(u[:, 0], vh[0])
    assert torch.allclose(model.features[2].weight.grad.double(), expected, atol=1e-4)
    assert model.head.weight.grad is None


def dense_penalty_gradient(layer, strength):
    """λ·2σ u vᵀ and λσ² from the float64 dense SVD of the layer's weight, computed on the CPU (the CUDA
    tests compare against it too)."""
    u, s, vh = torch.linalg.svd(layer.weight.detach().cpu().double())
    return strength * 2 * s[0] * torch.outer(u[:, 0], vh[0]), strength * s[0].item() ** 2


def test_armed_forward_gives_the_dense_svd_penalty_and_gradient_added_to_the_loss_gradient():
    """After arm(), the Linear layers take the power step in their own forward pass (one autograd node
    for output and σ); the total gradient must still be the loss's plus λ·2σ u vᵀ of the dense SVD."""
    model = mlp(activation="gelu")
    reg = regularizers.build({"kind": "all-layer-spectral", "strength": 0.05}).attach(model)
    reg.penalty(model)  # converges the warm state; one more power step then moves σ by < 1e-6
    x, y = torch.rand(7, 1, 4, 4), torch.randint(0, 5, (7,))
    loss_only = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    reg.arm()
    loss = nn.functional.cross_entropy(model(x), y)
    assert all(norm.fused_sigma is not None for norm in reg.norms)  # the armed forward took the step
    penalty = reg.penalty(model)
    expected = {}
    for name in reg.layer_names:
        layer = dict(model.named_modules())[name]
        expected[layer.weight], value = dense_penalty_gradient(layer, 0.05)
        expected.setdefault("penalty", 0.0)
        expected["penalty"] += value
    assert penalty.item() == pytest.approx(expected["penalty"], rel=1e-5)
    grads = torch.autograd.grad(loss + penalty, list(model.parameters()))
    for param, base, got in zip(model.parameters(), loss_only, grads):
        want = base.double() + expected.get(param, 0.0)
        assert torch.allclose(got.double(), want, atol=1e-6, rtol=1e-4), (param.shape, (got - want).abs().max())


def test_armed_penalty_alone_backpropagates_two_sigma_u_v():
    model = mlp()
    reg = build(model, kind="rep-spectral", placement="upto:1", strength=0.5)
    reg.penalty(model)
    reg.arm()
    model(torch.rand(3, 1, 4, 4))
    reg.penalty(model).backward()
    layer = model.features[2]
    expected, _ = dense_penalty_gradient(layer, 0.5)
    assert torch.allclose(layer.weight.grad.double(), expected, atol=1e-5)
    assert layer.bias.grad is None or not layer.bias.grad.any()


def test_armed_linear_on_any_batch_shape_matches_f_linear_and_its_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    reg = regularizers.build({"kind": "all-layer-spectral", "strength": 0.3}).attach(
        models.Classifier(nn.Identity(), layer, (6,)))
    reg.penalty(None)
    x = torch.randn(2, 3, 6, requires_grad=True)
    want_y = nn.functional.linear(x, layer.weight, layer.bias)
    want = list(torch.autograd.grad(want_y.square().sum(), [x, layer.weight, layer.bias]))
    want[1] = want[1] + dense_penalty_gradient(layer, 0.3)[0].float()
    reg.arm()
    y = layer(x)
    assert reg.norms[0].fused_sigma is not None
    got = torch.autograd.grad(y.square().sum() + reg.penalty(None), [x, layer.weight, layer.bias])
    assert torch.allclose(y, want_y, atol=1e-6)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_armed_linear_with_a_frozen_weight_still_gives_the_input_gradient():
    model = mlp()
    reg = build(model, kind="rep-spectral", placement="upto:1")
    model.features[2].requires_grad_(False)
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    want, = torch.autograd.grad(model(x).square().sum(), x)
    reg.arm()
    got, = torch.autograd.grad(model(x).square().sum() + reg.penalty(model), x)
    assert torch.allclose(got, want, atol=1e-6)


def test_arming_is_one_forward_and_skipped_without_gradients():
    model = mlp()
    reg = build(model, kind="rep-spectral", placement="upto:1")
    norm = reg.norms[0]
    reg.arm()
    with torch.no_grad():
        model(torch.rand(2, 1, 4, 4))
    assert norm.armed and norm.fused_sigma is None  # no graph to carry σ: penalty() takes the step itself
    assert reg.penalty(model).item() == pytest.approx(dense_sigma(model.features[2]) ** 2, rel=1e-4)
    assert not norm.armed
    model(torch.rand(2, 1, 4, 4))
    assert norm.fused_sigma is None  # not armed: a plain forward


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_a_copy_of_a_fused_model_runs_on_its_own_weights_and_stays_fused(clone):
    import copy
    import pickle
    model = mlp()
    build(model, kind="rep-spectral", placement="upto:1")
    twin = copy.deepcopy(model) if clone == "deepcopy" else pickle.loads(pickle.dumps(model))
    layer = twin.features[2]
    with torch.no_grad():
        layer.weight.mul_(2)
    x = torch.rand(3, 1, 4, 4)
    assert torch.allclose(twin.features[:3](x), nn.functional.linear(model.features[:2](x), layer.weight, layer.bias))
    norm = layer.forward.norm
    assert norm.layer is layer
    norm.arm()
    twin(x)
    assert norm.take().item() == pytest.approx(dense_sigma(layer), rel=1e-4)


def test_all_layer_spectral_includes_the_readout():
    model = mlp()
    reg = regularizers.build({"kind": "all-layer-spectral", "strength": 1.0}).attach(model)
    assert reg.layer_names == ["features.2", "features.4", "head"]
    expected = sum(dense_sigma(m) ** 2 for m in (model.features[2], model.features[4], model.head))
    assert reg.penalty(model).item() == pytest.approx(expected, rel=1e-4)


def test_layer_norms_match_dense_svd_for_every_kind():
    model = mlp()
    for kind in regularizers.REGULARIZERS:
        norms = build(model, kind=kind).layer_norms(model)
        assert norms["features.2"] == pytest.approx(dense_sigma(model.features[2]), rel=1e-4)
        assert norms["features.4"] == pytest.approx(dense_sigma(model.features[4]), rel=1e-4)


def test_activation_term_matches_the_gelu_derivative():
    model = mlp(widths=(6,), activation="gelu")
    reg = build(model, kind="rep-spectral", activation_term=True, strength=1.0)
    x = torch.rand(32, 1, 4, 4)
    model(x)
    total = reg.penalty(model).item()
    z = model.features[:3](x).detach().double()
    normal = torch.distributions.Normal(0.0, 1.0)
    slope = normal.cdf(z) + z * normal.log_prob(z).exp()
    expected = dense_sigma(model.features[2]) ** 2 + slope.pow(2).amax(1).mean().item()
    assert total == pytest.approx(expected, rel=1e-4)


def nassar_penalty(features, basis, start, slope):
    """`eigen_val_regulate` (josuenassar/power_law, ModelDefs/utils.py:217-248) restated from its formula,
    loop and all, in float64: eigenvalues along the basis, sorted descending, the anchor eigs[start] held
    constant, eigenvalues ≤ 0 skipped, divided by the dimension."""
    xt = features - features.mean(0)
    cov = xt.T @ xt / (len(features) - 1)
    eigs = torch.diag(basis.T @ cov @ basis).sort(descending=True).values
    beta = eigs[start].detach() * (start + 1) ** slope
    total = torch.zeros((), dtype=features.dtype)
    for n in range(start + 1, len(eigs)):
        if eigs[n] > 0:
            r = eigs[n] / (beta / (n + 1) ** slope) - 1
            total = total + r ** 2 + torch.relu(r)
    return total / features.shape[1]


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_spectral_decay_matches_their_formula_on_a_basis_from_another_batch(alpha):
    """The basis comes from one sample and the penalty from a batch with another spectrum, so the
    eigenvalues along the basis are out of order: an unsorted comparison or a shifted anchor shows."""
    model = mlp(widths=(12,), activation="tanh")
    reg = build(model, kind="spectral-decay", target_exponent=alpha, tau=3, refresh_samples=256)
    sample = torch.rand(256, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    reg.start_epoch(model, sample)
    batch = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(2)) ** 3
    model.train()
    model(batch)
    got = reg.penalty(model)
    got.backward()

    twin = mlp(widths=(12,), activation="tanh").double()  # same seed: the same weights, in float64
    with torch.no_grad():
        reference = twin.features(sample.double())
        _, basis = torch.linalg.eigh(torch.cov(reference.T))
    expected = nassar_penalty(twin.features(batch.double()), basis, 3, alpha)
    expected.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    for param, want in zip(model.features.parameters(), twin.features.parameters()):
        torch.testing.assert_close(param.grad.double(), want.grad, rtol=1e-3, atol=1e-6 * want.grad.abs().max())
    with torch.no_grad():
        along_basis = torch.diag(basis.T @ torch.cov(twin.features(batch.double()).T) @ basis).flip(0)
    assert not torch.equal(along_basis, along_basis.sort(descending=True).values)  # the sort matters here


def test_spectral_decay_skips_zero_eigenvalues():
    """Directions in which the batch does not vary contribute nothing (utils.py:245), where dividing by
    the target would add 1 each."""
    d, alpha, tau = 12, 1.0, 2
    features = nn.Sequential(nn.Flatten(), nn.Linear(d, d, bias=False))
    model = models.Classifier(features, nn.Linear(d, 2), (d,))
    with torch.no_grad():
        features[1].weight.copy_(torch.eye(d))
    reg = regularizers.build({"kind": "spectral-decay", "strength": 1.0, "placement": "feature",
                              "target_exponent": alpha, "tau": tau}).attach(model)
    reg.start_epoch(model, torch.randn(100, d))
    reg.basis = torch.eye(d)
    x = torch.randn(50, d, generator=torch.Generator().manual_seed(0))
    x[:, 8:] = 0  # four directions without variance
    model.train()
    model(x)
    got = reg.penalty(model).item()
    expected = nassar_penalty(x.double(), torch.eye(d, dtype=torch.float64), tau, alpha).item()
    assert got == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(got) and got < 1.0  # each zero divided by its target would add (−1)² = 1


def test_spectral_decay_is_zero_on_an_exact_power_law():
    d, alpha, tau = 16, 1.5, 2
    features = nn.Sequential(nn.Flatten(), nn.Linear(d, d, bias=False))
    model = models.Classifier(features, nn.Linear(d, 2), (d,))
    with torch.no_grad():
        features[1].weight.copy_(torch.eye(d))
    # Inputs whose covariance has eigenvalues exactly n^(-alpha): orthogonal columns scaled by n^(-alpha/2).
    q, _ = torch.linalg.qr(torch.randn(400, d, dtype=torch.float64))
    q = q - q.mean(0)
    q, _ = torch.linalg.qr(q)
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** (-alpha / 2) * math.sqrt(399)
    x = (q * scales).float()
    reg = regularizers.build({"kind": "spectral-decay", "strength": 1.0, "placement": "feature",
                              "target_exponent": alpha, "tau": tau, "refresh_samples": 400}).attach(model)
    reg.start_epoch(model, x)
    model.train()
    model.features(x)
    assert reg.penalty(model).item() < 1e-6
    model.features(x * torch.linspace(1, 2, d))
    assert reg.penalty(model).item() > 1e-2


def test_spectral_decay_state_survives_a_checkpoint():
    model = mlp()
    reg = build(model, kind="spectral-decay")
    reg.start_epoch(model, torch.rand(64, 1, 4, 4))
    fresh = build(model, kind="spectral-decay")
    fresh.load_state_dict(reg.state_dict())
    assert torch.equal(fresh.basis, reg.basis)


def test_jacobian_penalty_estimates_the_frobenius_norm_of_a_linear_map():
    d_in, d_out = 16, 8
    model = models.build({"name": "mlp", "widths": [d_out], "activation": "relu"}, (d_in,), 3)
    model.features[-1] = nn.Identity()  # a linear feature map: the Jacobian is W·diag(1/std)
    reg = build(model, kind="jacobian", projections=4000)
    x = torch.rand(4, d_in)
    expected = (model.features[2].weight.detach() / model.features[0].std).pow(2).sum().item()
    assert reg.penalty(model, (x, None)).item() == pytest.approx(expected, rel=0.1)


def test_spectral_norm_constraint_bounds_the_placed_layers():
    model = mlp()
    reg = build(model, kind="spectral-norm")
    assert reg.penalty(model).item() == 0.0
    reg.activate(model)
    model.train()
    for _ in range(20):
        model(torch.rand(8, 1, 4, 4))
    for i in (2, 4):
        assert dense_sigma(model.features[i]) == pytest.approx(1.0, rel=0.02)
    assert dense_sigma(model.head) != pytest.approx(1.0, rel=0.02)


def test_logging_sigma_never_changes_spectral_norm_training():
    """layer_norms reads the layers in eval mode: a spectral-norm weight read in train mode would advance
    torch's own power iteration and so change every later step."""
    def train(log):
        model = mlp()
        reg = build(model, kind="spectral-norm")
        reg.activate(model)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        logged = None
        for _ in range(5):
            x, y = torch.rand(16, 1, 4, 4, generator=gen), torch.randint(0, 5, (16,), generator=gen)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if log:
                logged = reg.layer_norms(model)
        return model, logged

    plain, _ = train(log=False)
    model, logged = train(log=True)
    for (name, want), got in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), name  # the weights and torch's u, v alike
    assert all(m.training for m in model.modules())
    model.eval()  # what was logged: σ_max of the weight the model evaluates with
    assert logged["features.2"] == pytest.approx(dense_sigma(model.features[2]), rel=1e-4)


def test_spectral_penalties_leave_the_global_rng_alone():
    model = mlp()
    before = torch.get_rng_state()
    for kind in ("rep-spectral", "jacobian"):
        reg = build(model, kind=kind)
        reg.penalty(model, (torch.ones(4, 1, 4, 4), None))
        reg.layer_norms(model)
    assert torch.equal(before, torch.get_rng_state())
