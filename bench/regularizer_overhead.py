"""Step-time overhead of the spectral regularizers, measured side by side in one run.

1. SLP-2000 (784→2000 GELU→10), batch 1024: `none` vs `rep-spectral` at every=1 and every=24, in one
   process with the allocator setting training uses (`specreg.loop.keep_freed_memory`). The
   configurations are interleaved round by round so that machine noise hits them alike.
2. Allocator: the SLP's step and a small-batch MLP's (digits-sized input, 3×1024 GELU, batch 32, as in
   the sweep benchmark) with glibc's default malloc settings against `keep_freed_memory`, in child
   processes that alternate (the setting is process-wide).
3. ResNet-18 convs (circular padding, 32×32): see bench/conv_norm.py (warm-started exact norm vs a
   per-frequency decomposition), which writes docs/benchmarks_conv.md.

Run: python bench/regularizer_overhead.py [--rounds 30]  → prints tables and writes docs/benchmarks_regularizer.md
"""
import argparse
import random
import statistics
import os
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from host import cpu_model
from specreg import models, regularizers
from specreg.loop import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]


SLP = ({"name": "slp", "width": 2000, "activation": "gelu"}, (1, 28, 28), 1024, "feature")
SMALL_MLP = ({"name": "mlp", "widths": [1024, 1024, 1024], "activation": "gelu"}, (1, 8, 8), 32, "all")


def make_step(kind: str, every: int, setup=SLP):
    model_spec, input_shape, batch, placement = setup
    torch.manual_seed(0)
    model = models.build(model_spec, input_shape, 10)
    reg = regularizers.build({"kind": kind, "strength": 1e-3, "placement": placement}).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, *input_shape), torch.randint(0, 10, (batch,))
    state = {"step": 0}

    def step():
        penalized = kind != "none" and state["step"] % every == 0
        if penalized:  # the training loop's order: arm, forward, penalty
            reg.arm()
        loss = F.cross_entropy(model(x), y)
        if penalized:
            loss = loss + reg.penalty(model, (x, y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] += 1

    return step


def time_interleaved(steps: dict, rounds: int, per_round: int) -> dict:
    """Per-round mean step time of each configuration (seconds), rounds in a random order."""
    for step in steps.values():  # warm-up, including the regularizer's cold start
        for _ in range(3):
            step()
    samples = {name: [] for name in steps}
    order = list(steps.items())
    for _ in range(rounds):
        random.shuffle(order)  # no configuration always runs first in a round
        for name, step in order:
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            samples[name].append((time.perf_counter() - start) / per_round)
    return samples


def machine() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def allocator_child(mode: str) -> None:
    """Print the median step times (s) of the SLP and the small MLP, none and rep-spectral every=1,
    under `mode`."""
    if mode == "keep-freed":
        keep_freed_memory()
    medians = {}
    for label, setup, per_round in (("SLP-2000, batch 1024", SLP, 10), ("MLP 3x1024, batch 32", SMALL_MLP, 40)):
        steps = {f"{label}, {kind}": make_step(kind, 1, setup) for kind in ("none", "rep-spectral")}
        samples = time_interleaved(steps, rounds=8, per_round=per_round)
        medians.update({name: statistics.median(times) for name, times in samples.items()})
    print(json.dumps(medians))


def allocator_part(rounds: int, threads: int) -> list[str]:
    modes = ["glibc default", "keep-freed"]
    results = {mode: [] for mode in modes}
    for _ in range(rounds):
        random.shuffle(modes)
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--threads", str(threads)],
                                 capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.splitlines()[-1]))
    lines = ["", "## Allocator: freed memory kept for reuse (`specreg.loop.keep_freed_memory`)", "",
             f"The SLP above, and an MLP 64→1024→1024→1024→10 (GELU) at batch 32 as in the sweep benchmark; "
             f"rep-spectral at every=1. {rounds} child processes per setting, alternating, each the median of "
             "8 rounds; the table gives the median over processes. An earlier run gave the SLP-2000's "
             "batch-1024 step 1.09–1.12× slower with glibc's defaults.", "",
             "| step | glibc default (ms) | keep freed (ms) | speed-up |", "| --- | --- | --- | --- |"]
    for name in results["keep-freed"][0]:
        default = statistics.median(r[name] for r in results["glibc default"])
        kept = statistics.median(r[name] for r in results["keep-freed"])
        lines.append(f"| {name} | {default * 1e3:.2f} | {kept * 1e3:.2f} | {default / kept:.2f}× |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=24)
    parser.add_argument("--allocator-rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return allocator_child(args.child)
    random.seed(0)
    keep_freed_memory()  # as in training
    steps = {"none": make_step("none", 1), "rep-spectral every=1": make_step("rep-spectral", 1),
             "rep-spectral every=24": make_step("rep-spectral", 24)}
    samples = time_interleaved(steps, args.rounds, args.per_round)
    targets = {"none": "", "rep-spectral every=1": "≤ 1.05", "rep-spectral every=24": "≤ 1.02"}
    load = os.getloadavg()[0]
    lines = ["## Regularizer step overhead: SLP-2000, batch 1024", "",
             f"Machine: {machine()}; load average {load:.1f} at the end. {args.rounds} rounds of "
             f"{args.per_round} steps, the configurations in a random order each round. The ratio is taken "
             "within each round (so drifts in machine load cancel) and summarised by its median and "
             "interquartile range over rounds.", "",
             "| configuration | median step time (ms) | ratio to none: median [IQR] | target |",
             "| --- | --- | --- | --- |"]
    for name, times in samples.items():
        q1, ratio, q3 = statistics.quantiles([t / base for t, base in zip(times, samples["none"])], n=4)
        lines.append(f"| {name} | {statistics.median(times) * 1e3:.1f} | {ratio:.3f} [{q1:.3f}, {q3:.3f}] "
                     f"| {targets[name]} |")
    lines += allocator_part(args.allocator_rounds, args.threads)
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs" / "benchmarks_regularizer.md").write_text(text)


if __name__ == "__main__":
    main()
