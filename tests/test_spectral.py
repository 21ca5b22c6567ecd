"""specreg.spectral against independent dense references (the operator applied to the standard basis)."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specreg import spectral
from specreg.spectral import OperatorNorm, covariance_spectrum, fit_power_law, operator_norm

RTOL = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_matrix(layer, input_shape, weight=None):
    """The dense matrix of the conv operator (bias excluded), differentiable in `weight`."""
    weight = layer.weight if weight is None else weight
    n = int(np.prod(input_shape))
    basis = torch.eye(n, dtype=weight.dtype).reshape(n, *input_shape)
    if layer.padding_mode == "circular":
        ph, pw = layer.padding
        out = F.conv2d(F.pad(basis, (pw, pw, ph, ph), mode="circular"), weight, None, layer.stride)
    else:
        out = F.conv2d(basis, weight, None, layer.stride, layer.padding)
    return out.reshape(n, -1).T


def dense_sigma(layer, input_shape):
    unbiased = copy.deepcopy(layer)
    unbiased.bias = None
    n = int(np.prod(input_shape))
    with torch.no_grad():
        matrix = unbiased(torch.eye(n).reshape(n, *input_shape)).reshape(n, -1).T
    return torch.linalg.svdvals(matrix.double())[0].item()


def conv(cin, cout, k, stride, padding, padding_mode, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, stride, padding, padding_mode=padding_mode)


CONVS = [  # cin, cout, k, stride, padding, H
    (3, 5, 3, 1, 1, 8),
    (4, 8, 3, 2, 1, 8),
    (8, 6, 3, 1, 1, 8),
    (6, 4, 1, 2, 0, 8),
    (5, 7, 5, 2, 2, 8),
    (3, 4, 4, 2, 1, 8),
]


@pytest.mark.parametrize("shape", [(7, 5), (20, 30), (64, 16)])
def test_linear_matches_svd(shape):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    expected = torch.linalg.svdvals(layer.weight.double())[0].item()
    assert operator_norm(layer).item() == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("cin,cout,k,stride,padding,H", CONVS)
def test_conv_matches_dense_svd(padding_mode, cin, cout, k, stride, padding, H):
    layer = conv(cin, cout, k, stride, padding, padding_mode)
    norm = OperatorNorm(layer, (cin, H, H))
    if padding_mode == "circular" or padding == 0:
        assert norm.kind == "fft"
    assert norm().item() == pytest.approx(dense_sigma(layer, (cin, H, H)), rel=RTOL)


@pytest.mark.parametrize("k,stride,padding,H,W", [(3, 1, 0, 8, 8), (3, 2, 1, 7, 7), (3, 2, 1, 8, 6), (2, 1, 1, 6, 6)])
def test_circular_conv_outside_the_fourier_case_falls_back_and_stays_exact(k, stride, padding, H, W):
    layer = conv(4, 5, k, stride, padding, "circular")
    norm = OperatorNorm(layer, (4, H, W))
    assert norm.kind == ("fft" if (H, W) == (8, 6) else "spatial")
    assert norm().item() == pytest.approx(dense_sigma(layer, (4, H, W)), rel=RTOL)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect"])
def test_dilated_and_grouped_convs_take_the_spatial_path(padding_mode):
    torch.manual_seed(4)
    for layer in [nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, padding_mode=padding_mode),
                  nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode=padding_mode)]:
        norm = OperatorNorm(layer, (4, 7, 7))
        assert norm.kind == "spatial"
        assert norm().item() == pytest.approx(dense_sigma(layer, (4, 7, 7)), rel=RTOL)


def test_linear_gradient_is_two_sigma_u_v():
    torch.manual_seed(1)
    layer = nn.Linear(12, 9)
    (operator_norm(layer) ** 2).backward()
    U, S, Vh = torch.linalg.svd(layer.weight.detach().double())
    expected = 2 * S[0] * torch.outer(U[:, 0], Vh[0])
    torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=RTOL, atol=RTOL * S[0].item())


@pytest.mark.parametrize("padding_mode,stride", [("circular", 1), ("circular", 2), ("zeros", 1), ("zeros", 2)])
def test_conv_gradient_matches_autograd_through_the_dense_svd(padding_mode, stride):
    layer = conv(3, 4, 3, stride, 1, padding_mode, seed=2)
    shape = (3, 6, 6)
    (operator_norm(layer, shape) ** 2).backward()
    weight = layer.weight.detach().double().requires_grad_()
    (torch.linalg.svdvals(conv_matrix(layer, shape, weight))[0] ** 2).backward()
    scale = weight.grad.abs().max().item()
    torch.testing.assert_close(layer.weight.grad.double(), weight.grad, rtol=RTOL, atol=RTOL * scale)


def test_reshape_mode_gradient_matches_autograd_through_the_reshaped_svd():
    layer = conv(4, 6, 3, 1, 1, "zeros", seed=3)
    (operator_norm(layer, mode="reshape") ** 2).backward()
    weight = layer.weight.detach().double().requires_grad_()
    (torch.linalg.svdvals(weight.reshape(6, -1))[0] ** 2).backward()
    scale = weight.grad.abs().max().item()
    torch.testing.assert_close(layer.weight.grad.double(), weight.grad, rtol=RTOL, atol=RTOL * scale)


def test_reshape_mode_is_the_reshaped_matrix_norm_and_bounds_the_circular_norm():
    layer = conv(6, 5, 3, 1, 1, "circular")
    reshaped = torch.linalg.svdvals(layer.weight.detach().double().reshape(5, -1))[0].item()
    bound = operator_norm(layer, mode="reshape").item()
    assert bound == pytest.approx(reshaped, rel=RTOL)
    exact = operator_norm(layer, (6, 8, 8)).item()
    assert exact <= 3 * bound * (1 + RTOL)  # ‖Ŵ(f)‖ = ‖R (e(f) ⊗ I)‖ ≤ k‖R‖
    assert exact != pytest.approx(bound, rel=1e-2)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_warm_state_tracks_the_weights_and_survives_a_state_dict_round_trip(padding_mode):
    layer = conv(4, 6, 3, 2, 1, padding_mode)
    shape = (4, 8, 8)
    norm = OperatorNorm(layer, shape)
    first = norm().item()
    assert norm().item() == pytest.approx(first, rel=1e-5)
    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    values = [norm().item() for _ in range(300)]
    assert values[-1] == pytest.approx(dense_sigma(layer, shape), rel=RTOL)
    assert values[-1] == pytest.approx(values[-2], rel=1e-4)

    state = norm.state_dict()
    assert set(state) == {"v", "initialized"}  # the layer's own parameters are not duplicated
    fresh = OperatorNorm(layer, shape, seed=7)
    fresh.load_state_dict(state)
    assert fresh(update=False).item() == norm(update=False).item()
    torch.testing.assert_close(fresh.v, norm.v)
    fresh.load_state_dict(OperatorNorm(layer, shape, seed=8).state_dict())  # a cold state: converge again
    assert fresh().item() == pytest.approx(dense_sigma(layer, shape), rel=RTOL)


def test_update_false_and_zero_steps_leave_the_state_alone():
    layer = conv(3, 4, 3, 1, 1, "circular")
    norm = OperatorNorm(layer, (3, 8, 8), n_power_iterations=0)
    norm()
    state = norm.v.clone()
    with torch.no_grad():
        layer.weight.mul_(1.5)
    norm()
    norm(update=False)
    torch.testing.assert_close(norm.v, state)


def test_reads_a_parametrized_weight_and_its_gradient_reaches_the_original():
    """σ of W = W₀ / σ̂(W₀) (torch's spectral norm) and dσ/dW₀ against autograd through the parametrization
    and the float64 dense SVD of the operator."""
    torch.manual_seed(3)
    layers = [nn.utils.parametrizations.spectral_norm(nn.Linear(10, 8)),
              nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))]
    for layer, shape in zip(layers, [None, (3, 8, 8)]):
        layer.eval()  # in eval mode reading .weight does not advance its own power iteration
        u = layer.parametrizations.weight[0]._u  # off torch's converged σ̂: dσ/dW₀ then does not nearly cancel
        u.copy_(F.normalize(u + 0.3 * torch.randn_like(u), dim=0))
        twin = copy.deepcopy(layer).double()
        weight = twin.weight
        expected = torch.linalg.svdvals(conv_matrix(twin, shape, weight) if shape else weight)[0]
        expected.backward()
        sigma = operator_norm(layer, shape)
        assert sigma.item() == pytest.approx(expected.item(), rel=RTOL)
        sigma.backward()
        want = twin.parametrizations.weight.original.grad
        torch.testing.assert_close(layer.parametrizations.weight.original.grad.double(), want, rtol=RTOL,
                                   atol=RTOL * want.abs().max().item())


def test_a_power_iteration_stopped_at_its_cap_says_so(monkeypatch):
    layer = nn.Linear(30, 20)
    monkeypatch.setattr(spectral, "COLD_MAX_STEPS", 3)
    with pytest.warns(RuntimeWarning, match="Linear.*unconverged at its cap of 3 steps"):
        OperatorNorm(layer)()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OperatorNorm(layer)().item() == pytest.approx(torch.linalg.svdvals(layer.weight.double())[0].item(),
                                                             rel=RTOL)
        zero = nn.Linear(30, 20)
        nn.init.zeros_(zero.weight)
        assert OperatorNorm(zero)().item() == 0.0  # nothing to converge to: settled at once, no warning


def test_autocast_does_not_touch_it():
    layer = conv(4, 6, 3, 1, 1, "circular")
    linear = nn.Linear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sigmas = [operator_norm(layer, (4, 8, 8)), operator_norm(linear),
                  operator_norm(layer, (4, 8, 8), mode="reshape")]
    assert all(s.dtype == torch.float32 for s in sigmas)
    assert sigmas[0].item() == pytest.approx(dense_sigma(layer, (4, 8, 8)), rel=RTOL)
    assert sigmas[1].item() == pytest.approx(torch.linalg.svdvals(linear.weight.double())[0].item(), rel=RTOL)


def test_global_rng_is_untouched_and_seeds_are_reproducible():
    layers = [(nn.Linear(8, 5), None), (conv(3, 4, 3, 1, 1, "circular"), (3, 8, 8)),
              (conv(3, 4, 3, 1, 1, "zeros"), (3, 6, 6))]
    before = torch.get_rng_state()
    for layer, shape in layers:
        a, b = OperatorNorm(layer, shape, seed=3), OperatorNorm(layer, shape, seed=3)
        assert a().item() == b().item()
        operator_norm(layer, shape).backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_buffers_follow_the_module_and_a_zero_weight_is_harmless():
    layer = conv(3, 4, 3, 2, 1, "circular")
    with torch.no_grad():
        layer.weight.zero_()
    norm = OperatorNorm(layer, (3, 8, 8)).double()
    assert norm().item() == 0.0
    assert norm.v.dtype == torch.float64 and torch.isfinite(norm.v).all()
    with torch.no_grad():
        layer.weight.normal_(generator=torch.Generator().manual_seed(0))
    values = [norm().item() for _ in range(200)]
    assert values[-1] == pytest.approx(dense_sigma(layer, (3, 8, 8)), rel=RTOL)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="input_shape"):
        OperatorNorm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="mode"):
        OperatorNorm(nn.Linear(3, 4), mode="fro")
    with pytest.raises(TypeError, match="Conv1d"):
        OperatorNorm(nn.Conv1d(3, 4, 3))


@pytest.mark.parametrize("shape", [(200, 12), (30, 50), (40, 2, 3, 3)])
def test_covariance_spectrum_matches_numpy(shape):
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, shape[-1])
    eigs = covariance_spectrum(features)
    flat = features.reshape(shape[0], -1).double().numpy()
    expected = np.sort(np.linalg.eigvalsh(np.cov(flat, rowvar=False)))[::-1][: min(flat.shape)]
    np.testing.assert_allclose(eigs.numpy(), expected, rtol=1e-8, atol=1e-10)
    assert torch.all(eigs[:-1] >= eigs[1:])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fit_power_law_recovers_the_exponent(alpha):
    n = torch.arange(1, 501, dtype=torch.float64)
    assert fit_power_law(n ** -alpha) == pytest.approx(alpha, abs=0.02)
    noise = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noisy = n ** -alpha * torch.exp(0.05 * noise)
    assert fit_power_law(noisy) == pytest.approx(alpha, abs=0.02)
    with_zero_tail = torch.cat([n ** -alpha, torch.zeros(50, dtype=torch.float64)])
    assert fit_power_law(with_zero_tail) == pytest.approx(alpha, abs=0.02)


def test_fit_power_law_edge_cases():
    assert np.isnan(fit_power_law(torch.tensor([3.0, 2.0, 1.0])))
    assert np.isnan(fit_power_law(torch.zeros(100)))
    assert fit_power_law(np.arange(1, 101.0) ** -1.5, start=1, stop=20) == pytest.approx(1.5, abs=1e-6)
    with pytest.raises(ValueError, match="start"):
        fit_power_law(torch.ones(100), start=0)
