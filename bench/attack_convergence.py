"""Has the attack converged? One trained network of a sweep, attacked once with many iterations, read off after
each doubling (the attack's `trace`: the distances after iteration t of a run are those a t-iteration run returns).

    python bench/attack_convergence.py --mlflow STORE --run RUN_ID [--points 200] [--iterations 160]

The network is the run's `model.pt` with its `config.yaml`; the attacked points are the first `--points`
correctly classified test points (the study's own first points), with the study's attack settings except
`iterations`. Prints, per checkpoint, the mean queries per point, the median distance, its change since the
previous checkpoint, and robust accuracy among the attacked points at ε = 0.5, 1 and 2.
"""
import argparse

import numpy as np
import torch
import yaml

from specreg import attacks, data, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlflow", required=True, help="the study's MLflow store (a .db file or URI)")
    parser.add_argument("--run", required=True, help="the MLflow run id of one trained network")
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from mlflow.tracking import MlflowClient

    from specreg_platform.track import connection

    client = MlflowClient(connection.resolve_uri(args.mlflow))
    config = yaml.safe_load(open(client.download_artifacts(args.run, "config.yaml")))
    dataset = data.load(config["data"])
    model = models.build(config["model"], dataset.input_shape, dataset.num_classes)
    model.load_state_dict(torch.load(client.download_artifacts(args.run, "model.pt"), weights_only=True))
    model.eval()
    with torch.no_grad():
        correct = (attacks.predict(model, dataset.x_test) == dataset.y_test).nonzero().squeeze(1)[:args.points]
    spec = {k: v for k, v in config["attack"].items()
            if k not in ("name", "samples", "max_queries", "eps", "seed", "start_pool", "correct_only", "trace",
                         "iterations")}
    checkpoints = [t for t in (5, 10, 20, 40, 80, 160, 320, 640) if t < args.iterations]
    result = attacks.run(model, dataset.x_test[correct], dataset.y_test[correct], config["attack"]["name"], None,
                         seed=config["attack"].get("seed", 0), iterations=args.iterations, trace=tuple(checkpoints),
                         progress=False, **spec)
    rows = {**result.trace, args.iterations: (result.distances, result.queries)}
    print(f"run {args.run}, {len(correct)} correctly classified points, {config['attack']['name']}")
    print("| iterations | queries per point | median distance | change | robust ε=0.5 (%) | ε=1 (%) | ε=2 (%) |")
    print("|---|---|---|---|---|---|---|")
    previous = None
    for t in sorted(rows):
        dist, queries = rows[t][0].numpy(), rows[t][1].double().mean().item()
        median = float(np.median(dist))
        change = "" if previous is None else f"{100 * (median / previous - 1):+.2f}%"
        robust = " | ".join(f"{100 * np.mean(dist > e):.1f}" for e in (0.5, 1.0, 2.0))
        print(f"| {t} | {queries:,.0f} | {median:.4f} | {change} | {robust} |")
        previous = median


if __name__ == "__main__":
    main()
