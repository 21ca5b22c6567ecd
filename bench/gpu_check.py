"""GPU checks of the method library: training steps with and without AMP, attacks, shared-GPU trials.

Each figure is a ratio measured side by side in this one process (or, for the shared-GPU check, the
same work run one after another versus at once). Run through bench/gpu_check.sh on a device machine.
"""
import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
import torch.nn.functional as F

import specreg
from specreg import attacks, models, regularizers


def training_step(kind: str, amp: bool, model_spec, shape, batch):
    """One penalized SGD step on the GPU as the training loop takes it, as a closure."""
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
    return step


def step_time(kind: str, amp: bool, model_spec, shape, batch, rounds=20) -> float:
    step = training_step(kind, amp, model_spec, shape, batch)
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


def profile(step, steps=5) -> str:
    """Where a step's time goes: the GPU's kernel time per step against the wall time per step (a
    launch-bound step has much less of the first), and the kernels that take most of it."""
    from torch.profiler import ProfilerActivity
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not their aten callers
    gpu = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / steps
    table = events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60)
    return (f"wall {wall * 1e3:.2f} ms per step (profiled), GPU kernel time {gpu:.2f} ms per step, "
            f"{launches:.0f} kernel launches per step\n\n{table}")


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
    x = torch.rand(200, 1, 28, 28, device="cuda")
    with torch.no_grad():
        y = model(x).argmax(1)  # the model's own labels: every point is attacked with the full budget
    start = time.perf_counter()
    result = attacks.run(model, x, y, "tangent", max_queries=1000, progress=False)
    torch.cuda.synchronize()
    lines += ["", f"TangentAttack, 200 points × 1,000 queries on the SLP-2000: {time.perf_counter() - start:.2f} s, "
              f"{int(result.queries.sum())} queries"]
    print(lines[-1], flush=True)

    # Both arms run in spawned worker processes that share the host's cores equally (as Ray's workers
    # would), so both pay process and CUDA start-up: one worker running the trials in turn, or four at once.
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 4) // 4)
    timings = {}
    for workers in (1, 4):
        start = time.perf_counter()
        with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            per_trial = pool.map(trial, range(4))
        timings[workers] = (time.perf_counter() - start, per_trial)
    (one, one_trials), (four, four_trials) = timings[1], timings[4]
    lines += ["", f"4 trials, {threads} CPU threads per worker: {four:.1f} s in 4 worker processes at once vs "
              f"{one:.1f} s in 1 worker one after another ({one / four:.2f}× throughput); seconds per trial: "
              f"{', '.join(f'{t:.1f}' for t in one_trials)} in turn, {', '.join(f'{t:.1f}' for t in four_trials)} at once"]
    print(lines[-1], flush=True)
    report = profile(training_step("rep-spectral", False, {"name": "resnet18", "padding_mode": "circular"},
                                   (3, 32, 32), 128))
    with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), "gpu_profile.txt"), "w") as f:
        f.write("ResNet-18 circular, rep-spectral, batch 128, fp32\n" + report)
    print(report.splitlines()[0], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
