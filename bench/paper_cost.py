"""Where the paper study's time goes, against the floor of its arithmetic, measured side by side.

    python bench/paper_cost.py [--threads 1] [--rounds 7]

The floor is the SLP-2000's own matrix products at the study's shapes, timed bare (torch.mm, no autograd):
a training step is the forward product, the two weight-gradient products and the hidden-layer gradient
(1024 × 784 × 2000 and 1024 × 2000 × 10 each); an attack query is one row of the forward products. Against
it, in alternating rounds (so a change of machine load hits both sides alike): specreg's training step
(`Run.fit` through `run_experiment` on 59 batches of the real data, no penalty and rep-spectral with the
activation term) and the attack's model rows per second (TangentAttack on correctly classified points).
The study's totals then follow from the counts: 360 + 4 × 40 epochs of 59 steps per seed and 4 attacks of
`--queries` rows per point on 1,000 points (default: the 160-iteration attack's measured mean, 139,557;
the authors' 40 iterations took 18,155).
"""
import argparse
import statistics
import time

import torch

import specreg
from specreg import attacks, data, models

SLP = {"name": "slp", "width": 2000, "activation": "gelu", "init_std": 0.01, "readout_scale": "1/sqrt(width)",
       "normalize": "none"}
STEPS, BATCH, ROWS = 59, 1024, 512
STUDY_EPOCHS, ATTACKS_PER_SEED, POINTS = 360 + 4 * 40, 4, 1000


def floor_step(x, w1, w2) -> float:
    """Seconds of the bare products of one training step at batch 1024."""
    started = time.perf_counter()
    h = x @ w1.T  # forward
    out = h @ w2.T
    out.T @ h  # readout weight gradient (10 × 1024 × 2000)
    grad_h = out @ w2  # hidden gradient
    grad_h.T @ x  # first-layer weight gradient (2000 × 1024 × 784)
    return time.perf_counter() - started


def floor_rows(x, w1, w2) -> float:
    """Seconds per row of the bare forward products (512-row chunks, as the attack feeds the model)."""
    started = time.perf_counter()
    for chunk in x.split(ROWS):
        (chunk @ w1.T) @ w2.T
    return (time.perf_counter() - started) / len(x)


def train_epoch_seconds(kind: str) -> float:
    config = {"data": {"name": "fashion_mnist", "train_subset": STEPS * BATCH - 416, "test_subset": 1000},
              "model": SLP, "train": {"epochs": 2, "batch_size": BATCH, "lr": 0.1, "schedule": "constant",
                                      "eval_every": 10},
              "regularizer": {"kind": kind, "strength": 1e-3, "burnin": 1, "activation_term": kind != "none",
                              "n_power_iterations": 10}}
    history = specreg.run_experiment(config)["history"]
    return history[-1]["epoch_seconds"]  # the second epoch: penalized for rep-spectral


def attack_row_seconds(model, x, y) -> float:
    started = time.perf_counter()
    result = attacks.run(model, x, y, "tangent", 3000, progress=False)
    return (time.perf_counter() - started) / float(result.queries.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=139_557, help="attack queries per point")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 784, generator=gen)
    w1, w2 = torch.randn(2000, 784, generator=gen) * 0.01, torch.randn(10, 2000, generator=gen) * 0.01
    fmnist = data.load({"name": "fashion_mnist", "test_subset": 40})
    net = models.build(SLP, (1, 28, 28), 10).eval()  # the cost of a row does not depend on the weights
    with torch.no_grad():
        own = attacks.predict(net, fmnist.x_test)  # attacked against its own labels: every point counts
    rows = {"floor step": [], "none epoch": [], "rep-spectral epoch": [], "floor row": [], "attack row": []}
    for _ in range(args.rounds):
        rows["floor step"].append(statistics.median(floor_step(x, w1, w2) for _ in range(5)))
        rows["none epoch"].append(train_epoch_seconds("none"))
        rows["rep-spectral epoch"].append(train_epoch_seconds("rep-spectral"))
        rows["floor row"].append(floor_rows(torch.rand(8192, 784, generator=gen), w1, w2))
        rows["attack row"].append(attack_row_seconds(net, fmnist.x_test, own))
    med = {key: statistics.median(values) for key, values in rows.items()}
    floor_epoch = STEPS * med["floor step"]
    print(f"threads {args.threads}, {args.rounds} rounds, medians")
    print(f"floor: {1e3 * med['floor step']:.1f} ms per step ({floor_epoch:.1f} s per epoch), "
          f"{1e6 * med['floor row']:.1f} µs per attack row")
    for kind in ("none", "rep-spectral"):
        print(f"{kind} epoch: {med[kind + ' epoch']:.1f} s = {med[kind + ' epoch'] / floor_epoch:.2f}x the floor")
    print(f"attack row: {1e6 * med['attack row']:.1f} µs = {med['attack row'] / med['floor row']:.2f}x the floor")
    train_hours = (360 * med["none epoch"] + 40 * med["none epoch"] + 3 * 40 * med["rep-spectral epoch"]) / 3600
    attack_rows = ATTACKS_PER_SEED * POINTS * args.queries
    attack_hours = attack_rows * med["attack row"] / 3600
    floor_hours = (STUDY_EPOCHS * floor_epoch + attack_rows * med["floor row"]) / 3600
    print(f"per seed: training {train_hours:.2f} h + attacks {attack_hours:.2f} h; floor {floor_hours:.2f} h")


if __name__ == "__main__":
    main()
