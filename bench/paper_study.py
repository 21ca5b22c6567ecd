"""Yang et al.'s Fashion-MNIST experiment through the `specreg` command, and the tables and figures of its results.

    python bench/paper_study.py run [--resume]   # the sweeps (hours on a 2-core CPU; --resume continues them)
    python bench/paper_study.py export           # each sweep's networks, from MLflow to networks-<sweep>.parquet
    python bench/paper_study.py tables           # tables.md and the figures, from the exports in the same folder

`search_spaces/paper_fmnist_slp.yaml` states the authors' recipe (docs/paper_recipe.md maps it line by line);
`search_spaces/paper_fmnist_slp_readout.yaml` adds the authors' `spectral` arm as their code ran it (the readout
alone), whose networks the tables put beside the main study's; `search_spaces/paper_fmnist_slp_dose.yaml`
λ = 1e-2 and 10 / 20 regularized epochs on one seed. Every
number in the tables is read from the MLflow store the sweeps fill (`--mlflow`, default ./studies.db), through
the exports: a store lives on the machine that ran the sweeps and can be lost with it (the main study's was), so
`export` copies what the tables read (metrics, the attack's trace, every attacked point's distance, the epochs'
test accuracy and seconds) into one Parquet file per sweep, which is committed beside the tables it makes.

Statistics. The unit of replication is the seed (one network per arm and seed). Per arm: mean ± the 95%
t-interval over seeds. Against `none`, and between the regularizers (rep-spectral against all-layer spectral, the
paper's ordering; with and without the activation term): the per-seed paired difference, a 95% bootstrap
interval that resamples seeds and, within each seed, each network's attacked points independently (so it
carries both the seed-to-seed and the attack-sample noise; with one seed only the latter), a paired t-test
over seeds with Holm's correction across the comparisons of a table,
and the smallest difference the seeds could detect (two-sided α = 0.05, power 0.8, on the noncentral t:
`detectable_difference`).
"""
import argparse
import io
import math
import subprocess
import zlib
from pathlib import Path

import numpy as np

import specreg
from specreg_platform.base.stats import detectable_difference, holm, mean_interval, paired_t_pvalue
from specreg_platform.track import sweep_records

ROOT = Path(__file__).resolve().parents[1]
MAIN, DOSE, READOUT = "paper-fmnist-slp", "paper-fmnist-slp-dose", "paper-fmnist-slp-readout"
OUT = ROOT / "docs" / "figures" / MAIN
EPS_TABLE = (0.5, 1.0, 2.0)
EPS_GRID = np.linspace(0, 3, 301)
BOOTSTRAP = 10_000
# the readout arm (search_spaces/paper_fmnist_slp_readout.yaml) is the authors' `spectral` as their code ran it
READOUT_ARM = "readout spectral (their `spectral`)"
ARMS = ("none", "rep-spectral + activation term", "rep-spectral", "all-layer-spectral", READOUT_ARM)
COLORS = {"none": "#000000", "rep-spectral + activation term": "#E69F00", "rep-spectral": "#0072B2",
          "all-layer-spectral": "#009E73", READOUT_ARM: "#CC79A7"}  # Okabe-Ito


def arm(config: dict) -> str:
    kind = config["regularizer"]["kind"]
    if kind == "rep-spectral" and config["regularizer"].get("placement") == "layers:head.0":
        return READOUT_ARM
    if kind == "rep-spectral" and config["regularizer"]["activation_term"]:
        return "rep-spectral + activation term"
    return kind


def steps(mlflow: str, storage: str, resume: bool) -> list[list[str]]:
    more = ["--resume"] if resume else []
    return [["sweep", f"search_spaces/{name.replace('-', '_')}.yaml", "--mlflow", mlflow, "--storage", storage, *more]
            for name in (MAIN, READOUT, DOSE)]  # the readout baseline decides the paper's ordering: before the dose


def run(mlflow: str, storage: str, resume: bool) -> None:
    for step in steps(mlflow, storage, resume):
        print("$ specreg " + " ".join(step), flush=True)
        subprocess.run(["specreg", *step], cwd=ROOT, check=True)


# --- reading the store ---------------------------------------------------------------------------------------

def networks(client, sweep: str) -> list[dict]:
    """One record per finished trial: seed, arm, λ, epochs, final metrics, attacked-point distances, seconds."""
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return []
    out = []
    for run in client.search_runs([experiment.experiment_id], "tags.`specreg.role` = 'trial'"):
        if run.info.status != "FINISHED" or "adv_auc" not in run.data.metrics:
            continue
        # The resolved config the trial ran (its params hold only the options its regularizer reads).
        config = sweep_records.run_config(client, run.info.run_id)
        metrics = sweep_records.current_names(run.data.metrics)
        local = client.download_artifacts(run.info.run_id, "distances.npy")
        # By epoch: a trial retried after a fault logs its epochs again, into the same run.
        seconds = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")}
        test_acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test_acc")}
        epochs = config["train"]["epochs"]
        out.append({"run_id": run.info.run_id, "seed": config["train"]["seed"], "arm": arm(config),
                    "strength": config["regularizer"]["strength"], "epochs": epochs,
                    "burnin": specreg.penalty_start(config), "metrics": metrics,
                    "trace": attack_trace(client, run.info.run_id, metrics),
                    "distances": np.load(local), "epoch_seconds": seconds, "test_acc": test_acc,
                    "burnin_tag": run.data.tags.get("specreg.burnin"),
                    "iterations": config["attack"].get("iterations") or 0})
    return sorted(out, key=seed_then_arm)


# The exported columns: one row per network, as `networks` returns it (histories keyed by epoch or iteration).
def export_schema():
    import pyarrow as pa

    by_step = pa.map_(pa.int64(), pa.float64())
    return pa.schema([("run_id", pa.string()), ("seed", pa.int64()), ("arm", pa.string()),
                      ("strength", pa.float64()), ("epochs", pa.int64()), ("burnin", pa.int64()),
                      ("iterations", pa.int64()), ("burnin_tag", pa.string()),
                      ("metrics", pa.map_(pa.string(), pa.float64())),
                      ("trace", pa.map_(pa.int64(), pa.map_(pa.string(), pa.float64()))),
                      ("epoch_seconds", by_step), ("test_acc", by_step), ("distances", pa.list_(pa.float64()))])


def write_networks(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = export_schema()
    maps = lambda d: list(d.items())  # noqa: E731  (pyarrow takes a map as (key, value) pairs)
    rows = [{**{name: r[name] for name in schema.names}, "metrics": maps(r["metrics"]),
             "trace": [(t, maps(v)) for t, v in r["trace"].items()], "epoch_seconds": maps(r["epoch_seconds"]),
             "test_acc": maps(r["test_acc"]), "distances": np.asarray(r["distances"], float).tolist()}
            for r in records]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_networks(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    records = pq.read_table(path).to_pylist()
    for r in records:
        for key in ("metrics", "epoch_seconds", "test_acc"):
            r[key] = dict(r[key])
        r["trace"] = {t: dict(v) for t, v in r["trace"]}
        r["distances"] = np.array(r["distances"], dtype=float)
    return sorted(records, key=seed_then_arm)


def export_path(folder: Path, sweep: str) -> Path:
    """Where `export` writes a sweep's networks and `tables` reads them."""
    return folder / f"networks-{sweep}.parquet"


def export(mlflow: str, out: Path = OUT) -> list[Path]:
    """Write each sweep's finished networks in the store to `out/networks-<sweep>.parquet`."""
    from mlflow.tracking import MlflowClient

    from specreg_platform.track import connection

    client = MlflowClient(connection.resolve_uri(mlflow))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sweep in (MAIN, READOUT, DOSE):
        records = networks(client, sweep)
        if records:
            written.append(export_path(out, sweep))
            write_networks(records, written[-1])
    if not written:
        raise SystemExit(f"no finished network of {MAIN}, {READOUT} or {DOSE} in {mlflow}")
    return written


def seed_then_arm(record: dict) -> tuple:
    return record["seed"], ARMS.index(record["arm"]) if record["arm"] in ARMS else len(ARMS)


# --- statistics ------------------------------------------------------------------------------------------

def robust_curve(distances: np.ndarray, grid=EPS_GRID) -> np.ndarray:
    """Robust accuracy among the attacked (correctly classified) points at each ε of grid."""
    return (distances[:, None] > grid[None]).mean(0)


def t_interval(values) -> tuple[float, float]:
    """Mean and the 95% t-interval's half-width over seeds (nan with one seed)."""
    mean, low, high = mean_interval(values)
    return mean, (high - mean if len(values) > 1 else math.nan)


def point_statistic(name: str):
    """The statistic of one network's attacked-point distances that a metric name stands for."""
    if name == "median distance":
        return lambda d: float(np.median(d))
    if name == "AUC (ε ≤ 3)":
        return lambda d: float(np.mean(np.minimum(d, 3.0)) / 3.0)
    eps = float(name.split("=")[1])
    return lambda d: float(np.mean(d > eps))


def paired(base: list[dict], other: list[dict], name: str, rng) -> dict:
    """Paired difference other − base over the seeds both have, on a point statistic of the distances."""
    stat = point_statistic(name)
    pairs = [(b["distances"], o["distances"]) for b in base for o in other if b["seed"] == o["seed"]]
    if not pairs:
        return {"n": 0}
    diffs = np.array([stat(o) - stat(b) for b, o in pairs])
    n = len(pairs)
    boot = np.empty(BOOTSTRAP)
    for i in range(BOOTSTRAP):
        picked = rng.integers(0, n, n)
        boot[i] = np.mean([stat(rng.choice(o, len(o))) - stat(rng.choice(b, len(b)))
                           for b, o in (pairs[j] for j in picked)])
    result = {"n": n, "mean": float(diffs.mean()), "low": float(np.quantile(boot, 0.025)),
              "high": float(np.quantile(boot, 0.975)), "p": math.nan, "mde": math.nan}
    if n >= 2:
        result["p"] = paired_t_pvalue(diffs)
        result["mde"] = detectable_difference(float(diffs.std(ddof=1)), n)
    return result


# --- tables and figures ------------------------------------------------------------------------------------

def fmt(mean, half, scale=1.0, spec=".3f"):
    """mean ± half-width: percentages (scale 100) to 0.1, other values in `spec`."""
    spec = ".1f" if scale == 100 else spec
    text = f"{scale * mean:{spec}}"
    return text if math.isnan(half) else f"{text} ± {scale * half:{spec}}"


def arm_table(records: list[dict]) -> str:
    rows = ["| arm | seeds | clean acc (%) | median distance | robust acc ε=0.5 (%) | ε=1 (%) | ε=2 (%) | "
            "ε=1, all points (%) | AUC | Σσ² (features) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ARMS:
        group = [r for r in records if r["arm"] == name]
        if not group:
            continue
        m = lambda key: t_interval([r["metrics"][key] for r in group])  # noqa: E731
        cells = [fmt(*m("clean_acc"), 100), fmt(*m("med_dist_correct")),
                 *(fmt(*m(f"kept_{e}"), 100) for e in EPS_TABLE), fmt(*m("acc_1.0"), 100),
                 fmt(*m("adv_auc")), fmt(*m("sigma_sq_sum"), spec=".1f")]
        rows.append(f"| {name} | {', '.join(str(r['seed']) for r in group)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def signed(value: float, scale: float) -> str:
    return f"{scale * value:+.3g}" if scale == 1 else f"{scale * value:+.1f}"


def pvalue(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3g}"


def difference_table(records: list[dict], comparisons: list[tuple[str, str]]) -> str:
    """Paired differences `arm − base` for each (arm, base) of comparisons and each statistic; Holm's correction
    runs over the comparisons of one statistic (the family a reader scans at once). Each comparison draws its
    bootstrap from a stream of its own (seeded by its name), so adding an arm leaves the other intervals as
    they were."""
    names = ["median distance", "robust ε=0.5", "robust ε=1.0", "robust ε=2.0", "AUC (ε ≤ 3)"]
    rows = ["| arm − base | statistic | seeds | difference | 95% bootstrap interval | p (paired t) | Holm p | "
            "smallest detectable |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        results = [(a, b, paired([r for r in records if r["arm"] == b], [r for r in records if r["arm"] == a],
                                 name, np.random.default_rng(zlib.crc32(f"{a} − {b}: {name}".encode()))))
                   for a, b in comparisons]
        results = [(a, b, res) for a, b, res in results if res["n"] > 0]
        adjusted = holm([res["p"] for _, _, res in results])
        scale = 1 if name == "median distance" else 100
        for (a, b, res), p_holm in zip(results, adjusted):
            mde = "—" if math.isnan(res["mde"]) else f"{scale * res['mde']:.3g}"
            rows.append(f"| {a} − {b} | {name} | {res['n']} | {signed(res['mean'], scale)} | "
                        f"[{signed(res['low'], scale)}, {signed(res['high'], scale)}] | {pvalue(res['p'])} | "
                        f"{pvalue(p_holm)} | {mde} |")
    return "\n".join(rows)


def clean_table(records: list[dict], comparisons: list[tuple[str, str]]) -> str:
    """Paired clean-accuracy differences `arm − base` (points) over the seeds both have: each seed's
    difference (in seed order), their mean, the paired t-test with Holm's correction over the comparisons,
    and the smallest difference the seeds could detect. Clean accuracy is over the whole test set, so there
    is no attack sample to resample: the seeds are the only noise."""
    results, records = [], sorted(records, key=seed_then_arm)
    for a, b in comparisons:
        base = {r["seed"]: r["metrics"]["clean_acc"] for r in records if r["arm"] == b}
        diffs = np.array([100 * (r["metrics"]["clean_acc"] - base[r["seed"]])
                          for r in records if r["arm"] == a and r["seed"] in base])
        if len(diffs):
            results.append((a, b, diffs))
    p = [paired_t_pvalue(d) if len(d) >= 2 else math.nan for _, _, d in results]
    rows = ["| arm − base | seeds | per seed (points) | difference | p (paired t) | Holm p | smallest detectable |",
            "|---|---|---|---|---|---|---|"]
    for (a, b, d), p_raw, p_holm in zip(results, p, holm(p)):
        mde = detectable_difference(float(d.std(ddof=1)), len(d)) if len(d) >= 2 else math.nan
        rows.append(f"| {a} − {b} | {len(d)} | {', '.join(f'{v:+.2f}' for v in d)} | {d.mean():+.2f} | "
                    f"{pvalue(p_raw)} | {pvalue(p_holm)} | {'—' if math.isnan(mde) else f'{mde:.2f}'} |")
    return "\n".join(rows)


TRACED = ("med_dist_correct", "attack_queries_mean", "kept_1.0")  # what the convergence tables read


def attack_trace(client, run_id: str, metrics: dict) -> dict[int, dict]:
    """{iteration: {metric: value}} after each iteration the attack traced, from the metrics' MLflow history
    (a step per iteration, the last one the full attack); a store written before that kept them as
    `iter<t>/<metric>` metrics."""
    old = {}
    for key, value in metrics.items():
        if key.startswith("iter") and "/" in key:
            step, name = key.split("/", 1)
            old.setdefault(int(step[4:]), {})[name] = value
    if old:
        return old
    trace: dict[int, dict] = {}
    for name in TRACED:
        for point in client.get_metric_history(run_id, name):
            trace.setdefault(point.step, {})[name] = point.value
    return {t: values for t, values in trace.items() if len(values) == len(TRACED)}


def checkpoints(record: dict) -> list[int]:
    """The iterations before the full attack after which its trace recorded distances, in order."""
    return sorted(t for t in record["trace"] if t < record["iterations"])


def has_budget(record: dict, t: int) -> bool:
    """Whether a network's distances after t attack iterations are known: its full run, or a traced iteration."""
    return t == record["iterations"] or t in checkpoints(record)


def at(record: dict, t: int, key: str) -> float:
    """A network's metric after t iterations of its attack (the run's own metric when t is its full budget)."""
    return record["metrics"][key] if t == record["iterations"] else record["trace"][t][key]


def arm_label(record: dict) -> str:
    return record["arm"]


def dose_label(record: dict) -> str:
    """A dose network by what sets it apart from the others of its seed: the arm, λ and regularized epochs."""
    if record["arm"] == "none":
        return f"none, {record['epochs']} ep."
    return f"λ={record['strength']:g}, {record['epochs'] - record['burnin']} reg. ep."


def convergence_table(records: list[dict], label=arm_label) -> str:
    """Per network: queries, median distance and robust accuracy at each traced iteration and the full run,
    and the change of the median over the last doubling (the budget's convergence)."""
    rows = []
    for r in records:
        its = r["iterations"]
        points = [*checkpoints(r), its]
        if not rows:
            head = " / ".join(map(str, points))
            rows = [f"| seed | arm | queries ({head} it.) | median distance ({head} it.) | last doubling | "
                    f"robust ε=1 (%) ({head} it.) |", "|---|---|---|---|---|---|"]
        med = [at(r, t, "med_dist_correct") for t in points]
        queries = [at(r, t, "attack_queries_mean") for t in points]
        acc = [at(r, t, "kept_1.0") for t in points]
        half = points.index(its // 2) if its // 2 in points else None
        change = "" if half is None else f"{100 * (med[-1] / med[half] - 1):+.2f}%"
        rows.append(f"| {r['seed']} | {label(r)} | {' / '.join(f'{q:,.0f}' for q in queries)} | "
                    f"{' / '.join(f'{v:.4f}' for v in med)} | {change} | "
                    f"{' / '.join(f'{100 * v:.1f}' for v in acc)} |")
    return "\n".join(rows)


def authors_budget_table(records: list[dict], t: int = 40) -> str:
    """Per arm at the authors' 40 iterations (read off the same runs' trace), beside the full budget."""
    rows = [f"| arm | seeds | median distance, {t} it. | full budget | robust ε=1 (%), {t} it. | full budget |",
            "|---|---|---|---|---|---|"]
    for name in ARMS:
        group = [r for r in records if r["arm"] == name and has_budget(r, t)]
        if not group:
            continue
        cell = lambda key, tt, scale=1.0: fmt(*t_interval([at(r, tt, key) for r in group]), scale)  # noqa: E731
        rows.append(f"| {name} | {', '.join(str(r['seed']) for r in group)} | "
                    f"{cell('med_dist_correct', t)} | {cell('med_dist_correct', group[0]['iterations'])} | "
                    f"{cell('kept_1.0', t, 100)} | "
                    f"{cell('kept_1.0', group[0]['iterations'], 100)} |")
    return "\n".join(rows)


CURVE_EPOCHS = (1, 5, 20, 30, 100, 200)


def learning_curve_table(records: list[dict]) -> str:
    """Per seed: the test accuracy of the shared unregularized prefix after a few epochs (read off the seed's
    `none` network, or its first where it has none) and at its last epoch for every arm of the seed; the arms
    resume one prefix, so they agree there to the last digit. The early epochs are where an independent loop with the authors' settings can be
    laid beside this one (docs/results.md)."""
    rows = []
    for seed in sorted({r["seed"] for r in records}):
        group = [r for r in records if r["seed"] == seed]
        base = next((r for r in group if r["arm"] == "none"), group[0])
        burnin = base["burnin"]
        if not rows:
            rows = [f"| seed | test acc (%) after epoch {' / '.join(map(str, CURVE_EPOCHS))} | epoch {burnin}, "
                    "every arm of the seed | arms |", "|---|---|---|---|"]
        early = " / ".join(f"{100 * base['test_acc'][e]:.1f}" if e in base["test_acc"] else "—" for e in CURVE_EPOCHS)
        last = sorted({f"{100 * r['test_acc'][burnin]:.2f}" for r in group if burnin in r["test_acc"]})
        rows.append(f"| {seed} | {early} | {', '.join(last)} | {len(group)} |")
    return "\n".join(rows)


def time_table(records: list[dict], label=arm_label) -> str:
    """Seconds per network. An attack continued from its saved state after a session's end
    (`attack_resumed_at` > 0) logs only the time of its last part, so its rate is left out."""
    rows = ["| seed | arm | prefix epochs (s, shared) | own epochs (s) | attack (s) | attack rows / s |",
            "|---|---|---|---|---|---|"]
    for r in records:
        prefix = [v for epoch, v in r["epoch_seconds"].items() if epoch <= r["burnin"]]
        own = [v for epoch, v in r["epoch_seconds"].items() if epoch > r["burnin"]]
        seconds, resumed = r["metrics"]["attack_seconds"], int(r["metrics"].get("attack_resumed_at", 0))
        if resumed:
            attack, rate = f"{seconds:,.0f} (iterations {resumed + 1}–{r['iterations']} only)", "—"
        else:
            queries = r["metrics"]["attack_queries_mean"] * r["metrics"]["attack_samples"]
            attack, rate = f"{seconds:,.0f}", f"{queries / seconds:,.0f}"
        rows.append(f"| {r['seed']} | {label(r)} | {sum(prefix):,.0f} | {sum(own):,.0f} | {attack} | {rate} |")
    return "\n".join(rows)


def axes(size: tuple[float, float]):
    """A figure and its axes, drawn without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=150)


def save_figure(fig, ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def robust_figure(records: list[dict], path: Path) -> None:
    """Robust accuracy among correctly classified points against ε, per arm: the seed mean, and a band
    spanning the seeds (with one seed, the 95% binomial interval of its attacked points)."""
    fig, ax = axes((6.4, 4.2))
    for name in ARMS:
        curves = np.array([robust_curve(r["distances"]) for r in records if r["arm"] == name])
        if not len(curves):
            continue
        mean = curves.mean(0)
        if len(curves) > 1:
            low, high = curves.min(0), curves.max(0)
        else:
            half = 1.96 * np.sqrt(mean * (1 - mean) / len(records[0]["distances"]))
            low, high = mean - half, mean + half
        ax.plot(EPS_GRID, 100 * mean, color=COLORS[name], label=f"{name} (n={len(curves)})")
        ax.fill_between(EPS_GRID, 100 * low, 100 * high, color=COLORS[name], alpha=0.2, linewidth=0)
    ax.set(xlabel="ε (L2, pixels in [0, 1])", ylabel="robust accuracy among correct points (%)", ylim=(0, 100),
           title=f"F-MNIST SLP-2000, authors' recipe; TangentAttack, {records[0]['iterations']} iterations")
    save_figure(fig, ax, path)


def dose_rows(dose: list[dict], records: list[dict]) -> list[dict]:
    """The dose sweep's networks and the main study's networks of the same seed and arms, each read at the dose
    sweep's attack budget (the main study's from its trace), so every row saw the same attack."""
    budget = dose[0]["iterations"]
    arms = {r["arm"] for r in dose}
    main = [r for r in records if r["seed"] == dose[0]["seed"] and r["arm"] in arms]
    rows = []
    for source, group in (("dose", dose), ("main", main)):
        for r in group:
            if not has_budget(r, budget):
                continue
            rows.append({"source": source, "network": r, "arm": r["arm"], "strength": r["strength"],
                         "regularized": r["epochs"] - r["burnin"], "clean": r["metrics"]["clean_acc"],
                         "median": at(r, budget, "med_dist_correct"), "robust": at(r, budget, "kept_1.0"),
                         "sigma": r["metrics"]["sigma_sq_sum"]})
    return sorted(rows, key=lambda r: (r["regularized"], r["arm"] != "none", r["strength"], r["source"]))


def dose_table(dose: list[dict], records: list[dict]) -> str:
    """Per network of the dose seed: median distance and robust accuracy at the dose budget, and the median's
    difference from `none` after the same number of epochs, with a 95% bootstrap interval over the attacked
    points where both networks' distances are at that budget (one seed: the attack sample's noise only)."""
    rows = dose_rows(dose, records)
    none = {r["regularized"]: r for r in rows if r["arm"] == "none" and r["source"] == "dose"}
    lines = [f"Seed {dose[0]['seed']}; every network read after {dose[0]['iterations']} attack iterations (the "
             "main study's from its trace; `main` rows repeat a dose network and should agree with it). `− none`: "
             "the median's difference from `none` after as many epochs, with its 95% bootstrap interval over the "
             "attacked points (this seed's networks only).", "",
             "| regularized epochs | arm | λ | sweep | clean (%) | median distance | − none | robust ε=1 (%) "
             "| Σσ² |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        strength = "—" if r["arm"] == "none" else f"{r['strength']:g}"
        base = none.get(r["regularized"])
        delta = "—" if base is None else f"{r['median'] - base['median']:+.4f}"
        if base is not None and r["source"] == "dose" and r is not base:
            name = f"{dose_label(r['network'])} − none"
            res = paired([base["network"]], [r["network"]], "median distance",
                         np.random.default_rng(zlib.crc32(name.encode())))
            delta += f" [{res['low']:+.4f}, {res['high']:+.4f}]"
        lines.append(f"| {r['regularized']} | {r['arm']} | {strength} | {r['source']} | {100 * r['clean']:.1f} | "
                     f"{r['median']:.4f} | {delta} | {100 * r['robust']:.1f} | {r['sigma']:.1f} |")
    return "\n".join(lines)


def dose_figure(dose: list[dict], path: Path) -> None:
    """Median distance against the number of regularized epochs: `none` and rep-spectral at each λ."""
    lines: dict[str, list] = {}
    rows = dose_rows(dose, [])
    for r in rows:
        label = r["arm"] if r["arm"] == "none" else f"{r['arm']}, λ={r['strength']:g}"
        lines.setdefault(label, []).append((r["regularized"], r["median"]))
    fig, ax = axes((5.6, 3.8))
    for (label, points), color in zip(sorted(lines.items()), ("#000000", "#E69F00", "#0072B2", "#D55E00")):
        ax.plot(*zip(*sorted(points)), marker="o", color=color, label=label)
    ax.set_xticks(sorted({r["regularized"] for r in rows}))
    ax.set(xlabel="regularized epochs (after the 360-epoch prefix)", ylabel="median distance (correct points)",
           title=f"Dose and time, seed {dose[0]['seed']}; TangentAttack, {dose[0]['iterations']} iterations")
    save_figure(fig, ax, path)


def tradeoff_points(records: list[dict], dose: list[dict]) -> list[dict]:
    """Clean accuracy and median distance of every network at one attack budget: the dose sweep's when it has
    networks (the main study's read off their trace; one without that budget in its trace is left out), else
    the full one. Comparing regularizers at equal clean accuracy needs them on one plane."""
    budget = dose[0]["iterations"] if dose else records[0]["iterations"]
    points = []
    for source, group in (("main", records), ("dose", dose)):
        for r in group:
            if not has_budget(r, budget):
                continue
            label = dose_label(r) if source == "dose" else r["arm"]
            points.append({"source": source, "arm": r["arm"], "label": label, "budget": budget,
                           "clean": 100 * r["metrics"]["clean_acc"], "median": at(r, budget, "med_dist_correct")})
    return points


def tradeoff_figure(records: list[dict], dose: list[dict], path: Path) -> None:
    """Median distance against clean accuracy, one marker per network: the main study's arms as coloured
    circles, the dose sweep's networks as labelled triangles, and the line through the means of `none` and
    all-layer spectral (a network above it trades clean accuracy for distance better than all-layer did)."""
    points = tradeoff_points(records, dose)
    fig, ax = axes((6.4, 4.2))
    ends = [[(q["clean"], q["median"]) for q in points if q["source"] == "main" and q["arm"] == name]
            for name in ("none", "all-layer-spectral")]
    if all(ends):
        (x0, y0), (x1, y1) = (np.mean(end, axis=0) for end in ends)
        xs = np.array([min(q["clean"] for q in points), max(q["clean"] for q in points)])
        ax.plot(xs, y0 + (xs - x0) * (y1 - y0) / (x1 - x0), linestyle="--", color="#999999", linewidth=1,
                label="through the means of none and all-layer")
    for name in ARMS:
        mine = [q for q in points if q["source"] == "main" and q["arm"] == name]
        if mine:
            ax.scatter([q["clean"] for q in mine], [q["median"] for q in mine], color=COLORS[name], label=name)
    for q in (q for q in points if q["source"] == "dose"):
        ax.scatter(q["clean"], q["median"], marker="^", color=COLORS[q["arm"]], edgecolor="black")
        ax.annotate(q["label"], (q["clean"], q["median"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="clean accuracy (%)", ylabel="median distance (correct points)",
           title=f"One marker per network; TangentAttack, {points[0]['budget']} iterations")
    save_figure(fig, ax, path)


def tables(folder: Path = OUT) -> str:
    """tables.md and the figures from the exports in folder: the main study's sections when it holds the main
    study (with the readout arm beside it), the dose sections when it holds the dose sweep (read beside the
    main study's seed when both are there)."""
    exports = {sweep: export_path(folder, sweep) for sweep in (MAIN, READOUT, DOSE)}
    found = {sweep: read_networks(path) for sweep, path in exports.items() if path.exists()}
    if not found:
        raise SystemExit(f"no networks-<sweep>.parquet in {folder}: run `python bench/paper_study.py export` first")
    records = sorted(found.get(MAIN, []) + found.get(READOUT, []), key=seed_then_arm)
    dose = found.get(DOSE, [])
    text = io.StringIO()
    text.write(f"# {', '.join(found)}: the tables\n\nGenerated by `python bench/paper_study.py tables` from "
               + ", ".join(f"`{exports[sweep].name}` ({len(group)} networks)" for sweep, group in found.items())
               + f"; seeds {sorted({r['seed'] for group in found.values() for r in group})}.\n\n")
    if records:
        text.write(main_sections(records))
    if dose:
        text.write("## Dose and time (one seed)\n\n" + dose_table(dose, records) + "\n\n")
        if not records:   # the dose sweep's own networks, as the main study's sections show its networks
            text.write("## The attack's convergence (every network)\n\n" + convergence_table(dose, dose_label)
                       + "\n\n## The shared prefix's learning curve\n\n" + learning_curve_table(dose)
                       + "\n\n## Where the time went\n\n" + time_table(dose, dose_label) + "\n\n")
        dose_figure(dose, folder / "dose.png")
    if records:
        robust_figure(records, folder / "robust_vs_eps.png")
        tradeoff_figure(records, dose, folder / "tradeoff.png")
    report = text.getvalue().rstrip("\n") + "\n"
    (folder / "tables.md").write_text(report)
    return report


def main_sections(records: list[dict]) -> str:
    """The main study's sections: per arm, paired differences, clean accuracy, the attack's convergence, the
    authors' budget, the prefix's learning curve and the time."""
    against_none = [(a, "none") for a in ARMS[1:]]
    between = [(ARMS[1], ARMS[3]), (ARMS[2], ARMS[3]), (ARMS[1], ARMS[4]), (ARMS[1], ARMS[2])]
    return ("## Per arm (mean ± 95% t half-width over seeds; robust accuracies among correctly classified points "
            "unless marked)\n\n" + arm_table(records) + "\n\n"
            "## Against none (paired by seed)\n\n" + difference_table(records, against_none) + "\n\n"
            "## Between the regularizers (paired by seed): the paper's ordering against the end-to-end baseline "
            "as described and as their code ran it, and the activation term\n\n"
            + difference_table(records, between) + "\n\n"
            "## Clean accuracy (paired by seed; Holm within each of the two families above)\n\n"
            + clean_table(records, against_none) + "\n\n" + clean_table(records, between) + "\n\n"
            "## The attack's convergence (every network)\n\n" + convergence_table(records) + "\n\n"
            "## At the authors' 40 iterations (the same runs, read off their trace)\n\n"
            + authors_budget_table(records) + "\n\n"
            "## The shared prefix's learning curve\n\n" + learning_curve_table(records) + "\n\n"
            "## Where the time went\n\n" + time_table(records) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["run", "export", "tables"])
    parser.add_argument("--mlflow", default="studies.db", help="MLflow store (default ./studies.db)")
    parser.add_argument("--storage", default="specreg-studies", help="Ray results folder")
    parser.add_argument("--resume", action="store_true", help="continue the sweeps")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the exports, tables.md and the figures")
    args = parser.parse_args()
    if args.what == "run":
        run(args.mlflow, args.storage, args.resume)
    elif args.what == "export":
        print("\n".join(map(str, export(args.mlflow, args.out))))
    else:
        print(tables(args.out))


if __name__ == "__main__":
    main()
