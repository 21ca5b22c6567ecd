"""Exact conv operator norms on the ResNet-18 CIFAR convs: warm-started OperatorNorm vs full per-frequency SVD.

(a) ours: `OperatorNorm` forward (one warm power step over all Fourier blocks, gradient through the top block
    only) + backward of Σσ² over all convs.
(b) the authors' approach (Sedghi, Gupta & Long 2019): the full FFT of every kernel, every frequency block's
    singular values each step (torch.linalg.svdvals, or eigvalsh of the smaller Gram matrix), backward of Σσ².
Both run in one process, alternating, on the same weights; between steps every weight moves by a small
random update (≈1e-3 relative, like a training step) outside the timed region, so the warm start has to track.
One torch thread by default: on the shared 2-core machine two threads thrash (4-6× slower for both).

    python bench/conv_norm.py [--steps 2] [--threads 1] [--no-write]
"""
import argparse
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from host import cpu_model
from specreg.spectral import OperatorNorm

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks_conv.md"
BEGIN, END = "<!-- conv_norm:begin -->", "<!-- conv_norm:end -->"

# name, c_in, c_out, kernel, stride, input size (ResNet-18 for 32×32 CIFAR inputs, circular padding)
LAYERS = [("stem", 3, 64, 3, 1, 32)]
for stage, (c_in, c_out, size) in enumerate([(64, 64, 32), (64, 128, 32), (128, 256, 16), (256, 512, 8)], 1):
    stride = 1 if stage == 1 else 2
    LAYERS += [(f"stage{stage}.0.conv1", c_in, c_out, 3, stride, size),
               (f"stage{stage}.0.conv2", c_out, c_out, 3, 1, size // stride)]
    if stride > 1:
        LAYERS.append((f"stage{stage}.0.shortcut", c_in, c_out, 1, stride, size))
    LAYERS += [(f"stage{stage}.1.conv1", c_out, c_out, 3, 1, size // stride),
               (f"stage{stage}.1.conv2", c_out, c_out, 3, 1, size // stride)]


def full_blocks(weight, size, stride):
    """Every frequency's block (H/s·W/s, Cout, Cin·s²): the kernel's full 2-D FFT after the stride phase split."""
    c_out, c_in, k, _ = weight.shape
    m = size // stride
    padded = F.pad(weight, (0, size - k, 0, size - k))  # circular shifts of the input leave σ unchanged
    phases = padded.view(c_out, c_in, m, stride, m, stride).permute(0, 1, 3, 5, 2, 4)
    spectrum = torch.fft.fft2(phases)  # (c_out, c_in, s, s, m, m)
    return spectrum.permute(4, 5, 0, 1, 2, 3).reshape(m * m, c_out, c_in * stride * stride)


def baseline_svdvals(layers):
    return [torch.linalg.svdvals(full_blocks(layer.weight, size, stride)).max()
            for layer, (_, _, _, _, stride, size) in zip(layers, LAYERS)]


def baseline_eigvalsh(layers):
    sigmas = []
    for layer, (_, _, _, _, stride, size) in zip(layers, LAYERS):
        A = full_blocks(layer.weight, size, stride)
        gram = A @ A.mH if A.shape[1] <= A.shape[2] else A.mH @ A
        sigmas.append(torch.linalg.eigvalsh(gram).max().clamp_min(0).sqrt())
    return sigmas


def build_layers(gen):
    layers = []
    for _, c_in, c_out, k, stride, _ in LAYERS:
        layer = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False, padding_mode="circular")
        with torch.no_grad():
            layer.weight.normal_(0, (2 / (c_in * k * k)) ** 0.5, generator=gen)
        layers.append(layer)
    return layers


def timed_step(layers, sigmas_fn):
    """Seconds for Σσ² forward + backward, and the σs."""
    for layer in layers:
        layer.weight.grad = None
    start = time.perf_counter()
    sigmas = sigmas_fn()
    sum(s ** 2 for s in sigmas).backward()
    return time.perf_counter() - start, torch.stack([s.detach() for s in sigmas])


def run(steps):
    gen = torch.Generator().manual_seed(0)
    layers = build_layers(gen)
    norms = [OperatorNorm(layer, (c_in, size, size)) for layer, (_, c_in, _, _, _, size) in zip(layers, LAYERS)]
    assert all(n.kind == "fft" for n in norms)
    start = time.perf_counter()
    with torch.no_grad():
        for norm in norms:
            norm()  # the convergence-checked cold start
    cold = time.perf_counter() - start
    with torch.no_grad():  # two warm steps: first calls of every code path
        for _ in range(2):
            for norm in norms:
                norm()

    methods = {"ours": lambda: [norm() for norm in norms],
               "svdvals": lambda: baseline_svdvals(layers), "eigvalsh": lambda: baseline_eigvalsh(layers)}
    times = {name: [] for name in methods}
    errors = []
    for step in range(steps):  # ours and one baseline per step; the baseline and the order alternate
        with torch.no_grad():  # a training-like update between steps
            for layer in layers:
                layer.weight.add_(1e-3 * layer.weight.std() * torch.randn(layer.weight.shape, generator=gen))
        baseline = ["svdvals", "eigvalsh"][step % 2]
        sigmas = {}
        for name in ["ours", baseline][:: 1 if step % 2 == 0 else -1]:
            seconds, sigmas[name] = timed_step(layers, methods[name])
            times[name].append(seconds)
        errors.append(((sigmas["ours"] - sigmas[baseline]).abs() / sigmas[baseline]).max().item())
        print(f"step {step}: ours {times['ours'][-1]:.3f}s, {baseline} {times[baseline][-1]:.3f}s, "
              f"max relative σ difference {errors[-1]:.1e}", flush=True)
    return {name: sum(t) / len(t) for name, t in times.items() if t}, max(errors), cold


def report(mean, error, cold, args):
    rows = [("ours: warm OperatorNorm, 1 power step, backward through the top block", "ours"),
            ("authors: full FFT + svdvals of every block, backward", "svdvals"),
            ("authors: full FFT + eigvalsh of every block's smaller Gram, backward", "eigvalsh")]
    table = ["| method | time per step (s) | ours is faster by |", "|---|---|---|"]
    table += [f"| {label} | {mean[name]:.3f} | {mean[name] / mean['ours']:.1f}× |"
              for label, name in rows if name in mean]
    best = min(t for name, t in mean.items() if name != "ours")
    return "\n".join([
        BEGIN,
        "## Conv operator norms: warm-started OperatorNorm vs full per-frequency SVD (`bench/conv_norm.py`)",
        "",
        f"All {len(LAYERS)} ResNet-18 CIFAR convs (32×32 inputs, circular padding, stem 3→64 … stage4 "
        "512→512 @4, 1×1 stride-2 shortcuts), Σσ² forward + backward per step. The methods alternate in one "
        "process on the same weights, which take a ≈1e-3 relative random step between steps. "
        f"{args.steps} timed steps after the cold start and two warm steps of ours; each step times ours and one "
        "baseline (svdvals and eigvalsh alternate); mean per method.",
        "",
        *table,
        "",
        f"- Speed-up over the faster baseline: **{best / mean['ours']:.0f}×** (target ≥ 10×).",
        f"- σ agreement with the baseline, max relative difference over all layers and timed steps: **{error:.1e}** "
        "(target ≤ 1e-3).",
        f"- One-time cold start of all {len(LAYERS)} OperatorNorms (convergence-checked power iteration): "
        f"{cold:.0f} s.",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch "
        f"thread(s); load average {os.getloadavg()[0]:.1f} at the end (the machine was shared with other jobs).",
        f"- Command: `python bench/conv_norm.py --steps {args.steps} --threads {args.threads}`",
        END,
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps (the baseline alternates svdvals/eigvalsh)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 cores are shared)")
    parser.add_argument("--no-write", action="store_true", help=f"print only, do not update {DOC.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    section = report(*run(args.steps), args)
    print(section)
    if not args.no_write:
        text = DOC.read_text() if DOC.exists() else "# Benchmarks: convolution operator norms\n"
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}\n"
        DOC.write_text(text)


if __name__ == "__main__":
    main()
