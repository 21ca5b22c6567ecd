"""GPU checks of the method library: training steps with and without AMP, attacks, shared-GPU trials.

Each figure is a ratio measured side by side in this one process (or, for the shared-GPU check, the
same work run one after another versus at once). Run through bench/gpu_check.sh on a device machine.
"""
import argparse
import multiprocessing as mp
import statistics
import time

import torch
import torch.nn.functional as F

import specreg
from specreg import attacks, models, regularizers


def step_time(kind: str, amp: bool, model_spec, shape, batch, rounds=20) -> float:
    torch.manual_seed(0)
    model = models.build(model_spec, shape, 10).cuda()
    reg = regularizers.build({"kind": kind, "strength": 1e-3, "placement": "feature"}).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(batch, *shape, device="cuda"), torch.randint(0, 10, (batch,), device="cuda")

    def step():
        reg.arm()  # as the training loop does before a penalized step's forward pass
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
            if kind != "none":
                loss = loss + reg.penalty(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / 10)
    return statistics.median(times)


def trial(seed: int) -> float:
    start = time.perf_counter()
    specreg.run_experiment({
        "data": {"name": "synthetic-sin", "n_train": 20000, "n_test": 2000},
        "model": {"name": "mlp", "widths": [512, 512]},
        "train": {"epochs": 5, "batch_size": 512, "lr": 0.05, "seed": seed, "device": "cuda"},
        "regularizer": {"kind": "rep-spectral", "strength": 1e-3},
        "attack": {"name": "tangent", "samples": 200, "max_queries": 1000, "eps": [0.05, 0.1]},
    })
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.md")
    args = parser.parse_args()
    lines = [f"# GPU check on {torch.cuda.get_device_name()} (torch {torch.__version__})", ""]

    lines += ["| model | regularizer | fp32 step (ms) | bf16 AMP step (ms) | AMP speed-up |", "| --- | --- | --- | --- | --- |"]
    for name, spec, shape, batch in [("SLP-2000", {"name": "slp", "width": 2000}, (1, 28, 28), 1024),
                                     ("ResNet-18 circular", {"name": "resnet18", "padding_mode": "circular"},
                                      (3, 32, 32), 128)]:
        for kind in ("none", "rep-spectral"):
            fp32, bf16 = step_time(kind, False, spec, shape, batch), step_time(kind, True, spec, shape, batch)
            lines.append(f"| {name} | {kind} | {fp32 * 1e3:.2f} | {bf16 * 1e3:.2f} | {fp32 / bf16:.2f}× |")
            print(lines[-1], flush=True)

    torch.manual_seed(0)
    model = models.build({"name": "slp", "width": 2000}, (1, 28, 28), 10).cuda().eval()
    x, y = torch.rand(200, 1, 28, 28, device="cuda"), torch.randint(0, 10, (200,), device="cuda")
    start = time.perf_counter()
    result = attacks.run(model, x, y, "tangent", max_queries=1000, progress=False)
    torch.cuda.synchronize()
    lines += ["", f"TangentAttack, 200 points × 1,000 queries on the SLP-2000: {time.perf_counter() - start:.2f} s, "
              f"{int(result.queries.sum())} queries"]
    print(lines[-1], flush=True)

    ctx = mp.get_context("spawn")
    sequential = time.perf_counter()
    for seed in range(4):
        trial(seed)
    sequential = time.perf_counter() - sequential
    together = time.perf_counter()
    with ctx.Pool(4) as pool:
        pool.map(trial, range(4))
    together = time.perf_counter() - together
    lines += ["", f"4 trial processes sharing the GPU: {together:.1f} s at once vs {sequential:.1f} s one after "
              f"another ({sequential / together:.2f}× throughput)"]
    print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
