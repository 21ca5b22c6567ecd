"""The study of docs/results.md, through the `specreg` command, and the tables of its numbers.

    python bench/study.py run      # the sweeps, the confirmation and the reports (~40 min on 2 shared cores)
    python bench/study.py tables   # the Markdown tables of docs/results.md, from the MLflow store

Every step is a `specreg` command (printed before it runs), so each number has a platform command behind it.
"""
import argparse
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLP, CONFIRMED, PLACEMENT = "study-fmnist-slp", "study-fmnist-slp-confirm", "study-placement"
METRICS = ["clean_acc", "med_dist", "acc_0.5", "acc_1.0", "acc_2.0"]


def steps(mlflow: str, storage: str) -> list[list[str]]:
    where = ["--mlflow", mlflow]
    return [
        ["sweep", "search_spaces/study_fmnist_slp.yaml", *where, "--storage", storage],
        ["confirm", SLP, "--per", "regularizer.kind", "--top", "1", "--objective", "acc_1.0",
         "--seeds", "3", *where, "--storage", storage],
        ["sweep", "search_spaces/study_placement.yaml", *where, "--storage", storage],
        *(["report", name, "--format", "md", "--out", f"docs/figures/{name}", *where]
          for name in (SLP, CONFIRMED, PLACEMENT)),
    ]


def run(mlflow: str, storage: str) -> None:
    for step in steps(mlflow, storage):
        print("$ specreg " + " ".join(step), flush=True)
        subprocess.run(["specreg", *step], cwd=ROOT, check=True)


def cell(data, record, metric: str) -> str:
    """mean ± half-width of the 95% t-interval over seeds (accuracies in %, distances as they are)."""
    from specreg_platform.base.figures import is_accuracy

    mean, low, high = data.interval(record, metric)
    scale, digits = (100, 1) if is_accuracy(metric) else (1, 3)
    text = f"{scale * mean:.{digits}f}"
    return text if low is None else f"{text} ± {scale * (high - low) / 2:.{digits}f}"


def table(mlflow, name: str) -> str:
    """One row per config of a seeded sweep: the seed means ± 95% t-interval half-widths."""
    from specreg_platform.present.sweep_data import SweepData

    data = SweepData(mlflow, name)
    labels = data.labels(data.records)
    lines = ["| config | clean acc (%) | median distance | robust acc ε=0.5 (%) | ε=1 (%) | ε=2 (%) |",
             "|---|---|---|---|---|---|"]
    for record in sorted(data.records, key=lambda r: -r.metrics["acc_1.0"]):
        lines.append(f"| {labels[record.run_id]} | " + " | ".join(cell(data, record, m) for m in METRICS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["run", "tables"])
    parser.add_argument("--mlflow", default="mlruns.db", help="MLflow store (default ./mlruns.db)")
    parser.add_argument("--storage", default="specreg-runs", help="Ray results folder")
    args = parser.parse_args()
    if args.what == "run":
        run(args.mlflow, args.storage)
        return
    from specreg_platform.track import connection

    mlflow = connection.client(connection.resolve_uri(args.mlflow))
    for name in (CONFIRMED, PLACEMENT):
        print(f"\n{name}\n\n{table(mlflow, name)}")


if __name__ == "__main__":
    main()
