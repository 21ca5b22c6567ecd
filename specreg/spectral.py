"""Operator norms of weight layers, and power-law fits of representation spectra.

The operator norm of a layer is the largest singular value σ_max of the linear map it applies to one
input (bias excluded): the weight matrix for `nn.Linear`, the convolution operator on inputs of shape
(C, H, W) for `nn.Conv2d`. It is found by power iteration on one of three representations:

- "matrix": the weight as a matrix (Linear, or a conv weight reshaped to Cout × Cin·k·k, mode="reshape").
- "fft": a conv with circular (or no) padding whose output is (H/s, W/s) is block diagonal in the Fourier
  basis (Sedghi, Gupta & Long 2019). Splitting the input into its s×s stride phases gives one complex
  Cout × s²·Cin block per output frequency, Ŵ(f) = Σ_taps K[:, :, a, b]·exp(-2πi(f1·q_a/M + f2·q_b/N))
  with tap offset (a - pad) = s·q_a + phase. All blocks are iterated at once as a batch (half the
  frequencies suffice: Ŵ(-f) = conj Ŵ(f)); σ_max is the largest over blocks, and only the top block is
  rebuilt with gradient (a k×k phase sum), so the backward pass never goes through the kernel FFT.
- "spatial": any other conv (zero padding, other sizes, dilation, groups); power iteration with the
  layer's own convolution and its adjoint (a transposed conv, or a vjp) on the real input shape.

The differentiable value is σ = |uᴴ A v| with the unit vectors u, v detached (dσ/dW = Re(u vᴴ) for a
matrix, so dσ²/dW = 2σ u vᵀ).
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# The cold start stops once, in one step, no block's σ moves by more than COLD_TOL·σ_max and the top
# block's unit v by no more than VECTOR_TOL (the gradient needs the singular vectors, not just σ).
COLD_TOL = 1e-6
VECTOR_TOL = 1e-5
COLD_MAX_STEPS = 2000


def _unit(x):
    """x / ‖x‖ per block (dim 0), and the norms. A zero block stays zero."""
    norm = x.flatten(1).norm(dim=1)
    return x / norm.clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1)), norm


def _settled(sigma, new, v, v_new):
    """True once no block's σ moved by COLD_TOL·σ_max and the top block's v by VECTOR_TOL (or A = 0)."""
    top = new.argmax()
    if new[top] == 0:
        return True  # a zero operator has no top vector to converge to
    return bool((new - sigma).abs().max() <= COLD_TOL * new[top] and (v_new[top] - v[top]).norm() <= VECTOR_TOL)


def _power(matvec, rmatvec, v, steps, converge=False):
    """`steps` power steps on every block from unit v (fewer once settled, if `converge`).

    Returns unit u, v, the per-block σ = |uᴴ A v| and whether it settled; steps=0 just evaluates u and
    σ at v.
    """
    u, sigma = _unit(matvec(v))
    settled = False
    for i in range(steps):
        if i:
            u, _ = _unit(matvec(v))
        v_new, new = _unit(rmatvec(u))
        settled = converge and _settled(sigma, new, v, v_new)
        v, sigma = torch.where((new > 0).view(-1, *[1] * (v.dim() - 1)), v_new, v), new  # a zero block keeps v
        if settled:
            break
    return u, v, sigma, settled


def _axis_phases(n_freq, size, k, stride, pad):
    """(n_freq, k, phases): the factor tap a contributes to stride phase r at frequency f on one axis.

    Only phases that some tap lands in are kept (their input columns would be zero: σ is unchanged).
    """
    offset = torch.arange(k) - pad
    shift = offset.div(stride, rounding_mode="floor")  # the tap's position on the subsampled grid
    angle = (-2 * math.pi / size) * (torch.arange(n_freq)[:, None] * shift)
    phase = F.one_hot(offset % stride, stride)[:, (offset % stride).unique()]
    return torch.polar(torch.ones_like(angle), angle)[:, :, None] * phase


def _fft_grid(layer, input_shape):
    """(M, N) = output size if the conv is block diagonal in the Fourier basis, else None."""
    if layer.dilation != (1, 1) or layer.groups != 1 or isinstance(layer.padding, str):
        return None
    if layer.padding_mode != "circular" and layer.padding != (0, 0):
        return None  # zero padding is circular only when there is none
    grid = []
    for size, k, s, p in zip(input_shape[1:], layer.kernel_size, layer.stride, layer.padding):
        if size % s or (size + 2 * p - k) // s + 1 != size // s:
            return None
        grid.append(size // s)
    return tuple(grid)


class _MatrixSigma(torch.autograd.Function):
    """σ = uᵀ W v for the unit u, v of the last power step, with dσ/dW = u vᵀ.

    The power step already gives σ (= ‖Wᵀu‖ after a step, ‖Wv‖ without one), so autograd through
    uᵀ W v would read W a third time and build its gradient through a batched product; this costs only
    the rank-one outer product. (In training, an nn.Linear's σ comes from _LinearWithSigma instead.)
    """

    @staticmethod
    def forward(ctx, weight, sigma, u, v):
        ctx.save_for_backward(u, v)
        ctx.shape = weight.shape
        return sigma.clone()

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        return torch.outer(grad * u.flatten(), v.flatten()).view(ctx.shape), None, None, None


class _LinearWithSigma(torch.autograd.Function):
    """An nn.Linear's output and σ (of a power step just taken) as two outputs of one autograd node.

    The backward adds the penalty's rank-one term g_σ·u vᵀ in place into the weight gradient it
    computes anyway; as a separate node, autograd would write that term out as a dense matrix and add
    it to the layer's own weight gradient out of place (three passes over W). Hand-written because no
    torch op fuses the two; it is the penalty's hot path at every=1.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sigma, u, v):
        ctx.save_for_backward(x, weight, u, v)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias), sigma.clone()

    @staticmethod
    def backward(ctx, grad_y, grad_sigma):
        x, weight, u, v = ctx.saved_tensors
        grad_rows = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.t() @ x.reshape(-1, x.shape[-1])
            grad_weight.addr_(u * grad_sigma, v)  # not alpha=grad_sigma: a tensor alpha would sync a GPU
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


class _FusedForward:
    """The forward of an nn.Linear whose norm was fused into it (OperatorNorm.fuse): a forward after
    `arm()` also takes the power step and yields σ (kept as `norm.fused_sigma`). A class, not a bound
    function, so that a fused model still pickles and deep-copies (onto the copy's own layer)."""

    def __init__(self, norm):
        self.norm = norm

    def __call__(self, x):
        norm, layer = self.norm, self.norm.layer
        if not (norm.armed and torch.is_grad_enabled() and x.dtype == layer.weight.dtype == torch.float32
                and not torch.is_autocast_enabled(x.device.type)):
            return F.linear(x, layer.weight, layer.bias)
        norm.armed = False
        u, v, sigma, _ = norm.iterate(layer.weight.detach())
        y, norm.fused_sigma = _LinearWithSigma.apply(x, layer.weight, layer.bias, sigma[0], u.view(-1), v.view(-1))
        return y


class OperatorNorm(nn.Module):
    """Warm-started σ_max of `layer`; the power-iteration state lives in buffers."""

    def __init__(self, layer, input_shape=None, mode="exact", n_power_iterations=1, seed=0):
        super().__init__()
        if mode not in ("exact", "reshape"):
            raise ValueError(f"mode must be 'exact' or 'reshape', got {mode!r}")
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"OperatorNorm supports nn.Linear and nn.Conv2d, got {type(layer).__name__}")
        object.__setattr__(self, "layer", layer)  # a plain reference: its parameters stay out of our state
        self.n_power_iterations = n_power_iterations
        weight = layer.weight
        if isinstance(layer, nn.Linear) or mode == "reshape":
            self.kind, v_shape = "matrix", (1, 1, weight[0].numel())
        else:
            if input_shape is None or len(input_shape) < 3 or input_shape[-3] != layer.in_channels:
                raise ValueError(f"Conv2d needs input_shape=(C={layer.in_channels}, H, W), got {input_shape}")
            self.input_shape = tuple(input_shape[-3:])
            self.grid = _fft_grid(layer, self.input_shape)
            if self.grid is None:
                self.kind, v_shape = "spatial", (1, *self.input_shape)
            else:
                self.kind = "fft"  # v is complex, stored as (real, imag) pairs
                # fixed by the layer's geometry: built once here, not in each step (whose unique() would
                # also sync a GPU), and not saved in checkpoints
                self.register_buffer("phases", self._build_phases().to(weight.device), persistent=False)
                v_shape = (*self.phases.shape[:2], layer.in_channels, 2)
        v = torch.randn(v_shape, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("v", _unit(v)[0].to(weight.device))
        self.register_buffer("initialized", torch.tensor(False, device=weight.device))
        self.armed, self.fused_sigma = False, None
        self.warm = False  # the host's copy of `initialized`: reading the buffer syncs a GPU each step

    def extra_repr(self):
        return f"kind={self.kind}, n_power_iterations={self.n_power_iterations}"

    def _conv(self, x, w):
        return self.layer._conv_forward(x, w, None)

    def _conv_adjoint(self, w):
        """u ↦ Aᵀu: a transposed conv for zero padding, else the vjp of the layer's own convolution."""
        layer = self.layer
        if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            extra = tuple((n + 2 * p - d * (k - 1) - 1) % s for n, k, s, p, d in
                          zip(self.input_shape[1:], layer.kernel_size, layer.stride, layer.padding, layer.dilation))
            return lambda u: F.conv_transpose2d(u, w, None, layer.stride, layer.padding, extra, layer.groups,
                                                layer.dilation)
        _, adjoint = torch.func.vjp(lambda x: self._conv(x, w), torch.zeros(1, *self.input_shape, device=w.device))
        return lambda u: adjoint(u)[0]

    def _build_phases(self):
        """(P, phases, k²) complex: the factor of each kernel tap in each stride phase of each frequency block."""
        (M, N), (kh, kw), (sh, sw), (ph, pw) = self.grid, self.layer.kernel_size, self.layer.stride, self.layer.padding
        eh = _axis_phases(M, M, kh, sh, ph)
        ew = _axis_phases(N // 2 + 1, N, kw, sw, pw)
        return torch.einsum("fax,gby->fgxyab", eh, ew).reshape(M * (N // 2 + 1), eh.shape[2] * ew.shape[2], kh * kw)

    def _blocks(self, w, phases):
        """The Fourier blocks (P, phases, Cout, Cin) from the kernel taps (phases may be a single block's)."""
        taps = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0] * w.shape[1]).to(phases.dtype)
        return (phases @ taps).view(*phases.shape[:-1], *w.shape[:2])

    def _operator(self, w):
        """(matvec, rmatvec) of the operator on a batch of vectors, one per block (dim 0)."""
        if self.kind == "spatial":
            return lambda v: self._conv(v, w), self._conv_adjoint(w)
        if self.kind == "matrix":  # one block: plain matrix-vector products, 3x faster than a broadcast bmm
            A = w.reshape(w.shape[0], -1)
            return lambda v: (A @ v.view(-1)).view(1, -1), lambda u: (u.view(-1) @ A).view(1, 1, -1)
        A = self._blocks(w, self.phases)
        return (lambda v: (A @ v[..., None]).sum(1)[..., 0],
                lambda u: (u.conj()[:, None, None, :] @ A)[:, :, 0, :].conj())

    def _block_matvec(self, w, v, p):
        """A v for block p, differentiable in w."""
        if self.kind == "spatial":
            return self._conv(v, w)
        return (self._blocks(w, self.phases[p]) @ v[p][..., None]).sum(0)

    def iterate(self, w, update=True, converge=False):
        """Power steps on the (float32, detached) weight w from the warm state: `n_power_iterations`
        (update=True), none (False), or as many as convergence needs (converge=True, and on the first
        call). Returns u, v, the per-block σ and the top block's index."""
        with torch.no_grad():
            v = self.v.to(w.device, torch.float32)
            v = torch.view_as_complex(v) if self.kind == "fft" else v
            converge = converge or not self.warm
            steps = COLD_MAX_STEPS if converge else self.n_power_iterations if update else 0
            u, v, sigma, settled = _power(*self._operator(w), v, steps, converge=converge)
            if converge and not settled:
                warnings.warn(f"{self.layer}: power iteration stopped unconverged at its cap of {steps} steps (close "
                              "top singular values): σ_max may be slightly low and its gradient off", RuntimeWarning)
            if steps:
                self.v.copy_(torch.view_as_real(v) if self.kind == "fft" else v)
                self.initialized.fill_(True)
                self.warm = True
            return u, v, sigma, sigma.argmax()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.warm = bool(self.initialized)  # once per load, not per step

    def forward(self, update=True, converge=False):
        """σ_max, differentiable in the layer's weight, after `iterate`'s power steps."""
        weight = self.layer.weight
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.float()
            u, v, sigma, p = self.iterate(w.detach(), update, converge)
            if self.kind == "matrix":
                return _MatrixSigma.apply(w, sigma[p], u[p], v[p])
            return torch.vdot(u[p].flatten(), self._block_matvec(w, v, p).flatten()).abs()

    def fuse(self):
        """Let the layer (an nn.Linear) take this norm's power step inside its own forward pass after
        `arm()`, so that σ's gradient joins the layer's weight gradient (see _LinearWithSigma)."""
        if not isinstance(self.layer, nn.Linear):
            raise TypeError(f"only an nn.Linear can fuse its norm, got {type(self.layer).__name__}")
        self.layer.forward = _FusedForward(self)
        return self

    def arm(self):
        """The layer's next forward pass with gradients on (float32, no autocast) takes the power step."""
        self.armed, self.fused_sigma = True, None

    def take(self):
        """σ from the armed forward pass if it took the power step, else from `forward()`."""
        sigma, self.armed, self.fused_sigma = self.fused_sigma, False, None
        return self() if sigma is None else sigma


def operator_norm(layer, input_shape=None, mode="exact"):
    """Converged σ_max of the layer's linear map (bias excluded), differentiable in `layer.weight`.

    input_shape=(C, H, W) is needed for Conv2d in mode="exact". mode="reshape" gives the Miyato et al.
    bound instead: σ_max of the weight reshaped to Cout × Cin·k·k.
    """
    return OperatorNorm(layer, input_shape, mode)()


def covariance_spectrum(features):
    """Eigenvalues of the centered covariance (ddof=1) of features N×D (flattened), descending, float64.

    Returns the min(N, D) largest (the rest are zero): the eigenvalues of the smaller Gram matrix of the
    centered data, which are its squared singular values. eigvalsh of the Gram matrix took a quarter of
    svdvals' time on the 2000 × 2000 features of the SLP-2000 (12 s against 46 s on one loaded core), at a
    relative error of 1e-14 of the largest eigenvalue, far below what fit_power_law uses (rtol 1e-6).
    """
    x = features.detach().reshape(features.shape[0], -1).double()
    if x.shape[0] < 2:
        raise ValueError(f"covariance_spectrum needs at least 2 samples, got {x.shape[0]}")
    x = x - x.mean(dim=0)
    gram = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0) / (x.shape[0] - 1)


def fit_power_law(eigs, start=10, stop=None, rtol=1e-6):
    """Decay exponent α̂ of λ_n ∝ n^(-α), by least squares of log λ_n on log n.

    Fits ranks start ≤ n ≤ stop (1-based; stop=None: the last) among the eigenvalues above rtol·λ_1,
    which drops the numerically zero tail. Returns nan if fewer than 3 eigenvalues remain.
    """
    if start < 1 or (stop is not None and stop < start):
        raise ValueError(f"fit_power_law needs 1 <= start <= stop, got start={start}, stop={stop}")
    lam = torch.as_tensor(eigs, dtype=torch.float64).flatten().sort(descending=True).values
    n = torch.arange(1, len(lam) + 1, dtype=torch.float64, device=lam.device)
    keep = (n >= start) & (lam > rtol * lam[:1].clamp_min(0))
    if stop is not None:
        keep &= n <= stop
    if keep.sum() < 3:
        return float("nan")
    x, y = n[keep].log(), lam[keep].log()
    x = x - x.mean()
    return float(-(x * (y - y.mean())).sum() / (x * x).sum())
