"""Benchmark: our batched hsja / tangent against ART's HopSkipJump at equal query budgets.

Trains three models in-script (an MLP on scikit-learn digits; on Fashion-MNIST an MLP 784-256-10 and the
paper's SLP, one hidden layer of 2000 GELU units), attacks the same correctly classified test points with
ART and with ours, and prints markdown tables for docs/benchmarks_attacks.md.

ART (the optional `bench` extra) attacks one point at a time and leaves its output off the boundary, so
its distances are reported raw and after a final binary search toward the input (the fair comparison;
those extra queries are not charged to ART). Its budget is max_iter-driven: we count the rows it feeds
the model and give our attacks that many queries per point. ART's PyTorchClassifier feeds float64 under
NumPy 2, so the model is wrapped to cast to float32.

    python bench/attacks.py [--art-points 50] [--points 200] [--threads 1 2] [--part art|budgets|all]

`--part budgets` prints only the tangent-vs-hsja table at 300, 1000 and 2385 queries (`--seeds`, 12 by default).

Each thread count gets its own table: torch's intra-op threads and NumPy's BLAS threads (ART's own
arithmetic) are both set to it, so the two tools always run with the same number of threads.
"""
import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from host import cpu_model
from specreg import attacks, data, models


class Counted(nn.Module):
    """Casts to float32 (ART under NumPy 2 sends float64) and counts the rows fed to the model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += len(x)
        return self.model(x.float())


def machine() -> str:
    import art
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"numpy {np.__version__}, ART {art.__version__}, Python {platform.python_version()}")


def digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def fashion():
    fmnist = data.load({"name": "fashion_mnist"})
    return fmnist.x_train, fmnist.y_train, fmnist.x_test, fmnist.y_test


def train(model, x, y, epochs, lr=1e-3, batch=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(epochs):
        for xb, yb in data.batches(x, y, batch, gen):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def refine(model, x, adv, y, steps=25):
    """Binary search from each adversarial point toward its input (ART's output is not on the boundary)."""
    ok = model(adv).argmax(1) != y
    lo, hi = torch.zeros(len(x)), torch.ones(len(x))
    for _ in range(steps):
        mid = (lo + hi) / 2
        fooled = model(torch.lerp(x, adv, mid.view(-1, *[1] * (x.dim() - 1)))).argmax(1) != y
        hi, lo = torch.where(fooled, mid, hi), torch.where(fooled, lo, mid)
    out = torch.lerp(x, adv, hi.view(-1, *[1] * (x.dim() - 1)))
    dist = (out - x).flatten(1).norm(dim=1).double()
    return torch.where(ok, dist, torch.inf), ok


def art_hsja(model, x, y, max_iter, seed=0):
    """ART HopSkipJump on every point; returns raw and refined distances, queries per point, seconds."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import PyTorchClassifier

    counted = Counted(model)
    clf = PyTorchClassifier(counted, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=10, clip_values=(0.0, 1.0))
    attack = HopSkipJump(clf, targeted=False, norm=2, max_iter=max_iter, max_eval=10_000, init_eval=100,
                         init_size=100, verbose=False)
    np.random.seed(seed)
    start = time.perf_counter()
    adv = attack.generate(x.numpy(), y=np.eye(10)[y.numpy()])
    seconds = time.perf_counter() - start
    # rows: one prediction of each input, the attack, then compute_success's 2 rows per point (not attack work)
    queries = (counted.rows - 2 * len(x)) / len(x)
    adv = torch.from_numpy(adv).float()
    with torch.no_grad():
        ok = model(adv).argmax(1) != y
        raw = torch.where(ok, (adv - x).flatten(1).norm(dim=1).double(), torch.inf)
        fair, _ = refine(model, x, adv, y)
    return raw, fair, queries, seconds


def ours(model, x, y, name, budget):
    start = time.perf_counter()
    result = attacks.run(model, x, y, name, budget, progress=False)
    return result, time.perf_counter() - start


def correct_points(model, x, y, n):
    with torch.no_grad():
        keep = (model(x).argmax(1) == y).nonzero().squeeze(1)[:n]
    return x[keep], y[keep]


def median(d):
    return float(torch.median(d))


def row(title, attack, n, queries, dist, fair, seconds, art_seconds, raw=None):
    """A table row; distances are compared with ART's refined ones point by point where both exist."""
    shown = f"{median(raw):.4f} / {median(dist):.4f}" if raw is not None else f"{median(dist):.4f}"
    if len(dist) == len(fair):
        both = torch.isfinite(dist) & torch.isfinite(fair)
        paired = f"{median(dist) / median(fair):.3f} / {torch.log(dist[both] / fair[both]).mean().exp():.3f}"
        speed = f"{art_seconds / seconds:.1f}"
    else:
        paired, speed = "–", f"{(art_seconds / len(fair)) / (seconds / n):.1f}"
    return (f"| {title} | {attack} | {n} | {queries:.0f} | {shown} | {paired} | "
            f"{torch.isfinite(dist).float().mean():.0%} | {seconds:.2f} ({1000 * seconds / n:.1f}) | {speed} |")


def compare(title, model, x_test, y_test, art_points, points, max_iter):
    """One model: ART vs ours on the same points and budget; ours alone on `points` points."""
    x, y = correct_points(model, x_test, y_test, points)
    xa, ya = x[:art_points], y[:art_points]
    raw, fair, art_q, art_s = art_hsja(model, xa, ya, max_iter)
    budget = int(art_q)
    rows = [row(title, f"ART HopSkipJump (max_iter={max_iter})", art_points, art_q, fair, fair, art_s, art_s, raw)]
    medians = {}
    for name in ("hsja", "tangent"):
        res, s = ours(model, xa, ya, name, budget)
        rows.append(row(title, f"ours {name}", art_points, res.queries.double().mean(), res.distances, fair, s, art_s))
        res, s = ours(model, x, y, name, budget)
        rows.append(row(title, f"ours {name}", points, res.queries.double().mean(), res.distances, fair, s, art_s))
        medians[name] = median(res.distances)
    # the same algorithm without the batch's nearest-neighbour starts: one point per call, noise starts only
    start = time.perf_counter()
    solo = torch.cat([attacks.run(model, xa[i:i + 1], ya[i:i + 1], "hsja", budget, progress=False).distances
                      for i in range(art_points)])
    rows.append(row(title, "ours hsja, one point per call (noise start)", art_points, budget, solo, fair,
                    time.perf_counter() - start, art_s))
    print(f"{title}: tangent/hsja median on {points} points = {medians['tangent'] / medians['hsja']:.3f}")
    return rows


HEADER = ("| model | attack | points | queries/point | median L2 (ART: raw / refined) "
          "| ÷ ART refined: medians / per-point geo-mean | success | seconds (ms/point) | speed-up vs ART per point |\n"
          "|---|---|---|---|---|---|---|---|---|")


def trained_models():
    """The three benchmark models, each with its test set."""
    x, y, xt, yt = digits()
    start = time.perf_counter()
    mlp = train(models.build({"name": "mlp", "widths": [256]}, (1, 8, 8), 10), x, y, epochs=30)
    print(f"digits MLP 64-256-10: {time.perf_counter() - start:.1f}s to train, "
          f"test acc {(mlp(xt).argmax(1) == yt).float().mean():.3f}")
    out = [("digits MLP", mlp, xt, yt)]
    x, y, xt, yt = fashion()
    for title, spec, epochs in (("F-MNIST MLP", {"name": "mlp", "widths": [256]}, 3),
                                ("F-MNIST SLP-2000", {"name": "slp", "width": 2000, "activation": "gelu"}, 3)):
        start = time.perf_counter()
        model = train(models.build(spec, (1, 28, 28), 10), x, y, epochs=epochs)
        with torch.no_grad():
            acc = torch.cat([model(xs).argmax(1) for xs in xt.split(2000)]).eq(yt).float().mean()
        print(f"{title}: {time.perf_counter() - start:.1f}s to train, test acc {acc:.3f}")
        out.append((title, model, xt, yt))
    return out


def budget_table(benchmarks, points: int, seeds: int, budgets=(300, 1000, 2385)) -> str:
    """tangent ÷ hsja median distance at several budgets: each attack's median on the same `points`
    correctly classified test points, averaged over seeds 0..seeds-1, with the spread of the per-seed
    ratio (one seed's ratio varies by about ±0.6 %, as much as the effect at large budgets)."""
    lines = ["| model | " + " | ".join(f"{q} queries: hsja / tangent (ratio, per-seed sd)" for q in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for title, model, xt, yt in benchmarks:
        x, y = correct_points(model, xt, yt, points)
        cells = []
        for q in budgets:
            med = {name: [median(attacks.run(model, x, y, name, q, seed=seed).distances) for seed in range(seeds)]
                   for name in ("hsja", "tangent")}
            hsja, tangent = statistics.mean(med["hsja"]), statistics.mean(med["tangent"])
            spread = statistics.stdev(t / h for t, h in zip(med["tangent"], med["hsja"])) if seeds > 1 else 0.0
            cells.append(f"{hsja:.4f} / {tangent:.4f} ({tangent / hsja:.3f}, {spread:.3f})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--art-points", type=int, default=50)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-iter", type=int, default=10, help="ART HopSkipJump iterations")
    parser.add_argument("--seeds", type=int, default=12, help="seeds per budget in the budgets table")
    parser.add_argument("--part", choices=["art", "budgets", "all"], default="all",
                        help="art: the tables against ART; budgets: tangent vs hsja at several budgets")
    args = parser.parse_args()
    torch.manual_seed(0)
    began = time.perf_counter()
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}\n")
    benchmarks = trained_models()

    if args.part != "art":
        torch.set_num_threads(1)
        print(f"\n### tangent vs hsja by budget (1 thread, {args.points} points, mean of the median over "
              f"seeds 0-{args.seeds - 1})\n")
        print(budget_table(benchmarks, args.points, args.seeds))
    for threads in args.threads if args.part != "budgets" else []:
        torch.set_num_threads(threads)
        with threadpool_limits(threads, user_api="blas"):
            label = f"{threads} thread{'s' * (threads > 1)}"
            print(f"\n### {label} (load average {os.getloadavg()[0]:.2f})\n")
            rows = []
            for title, model, xt, yt in benchmarks:
                rows += compare(title, model, xt, yt, args.art_points, args.points, args.max_iter)
            print(f"\n{HEADER}\n" + "\n".join(rows))

            print(f"\nCPU-budget line ({label}): 200 Fashion-MNIST test points, 1000 queries each, SLP-2000")
            title, model, xt, yt = benchmarks[-1]
            for name in ("tangent", "hsja"):
                res, s = ours(model, xt[:200], yt[:200], name, 1000)
                print(f"- {name}: {s:.1f}s, median {median(res.distances):.4f}, "
                      f"queries/point {res.queries.double().mean():.0f}, inf {int(torch.isinf(res.distances).sum())}")
    print(f"\ntotal {time.perf_counter() - began:.0f}s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
