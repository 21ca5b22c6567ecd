"""`specreg report` and `specreg confirm` on a real tiny sweep (local Ray, MLflow SQLite), and the report's
statistics against direct computations."""
import base64
import html.parser
import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from matplotlib.image import imread
from mlflow import MlflowClient

from specreg_platform.track import sweep_records
from specreg_platform.base import figures

from platform_helpers import TINY_BASE, cli, ensure_ray, tiny_space, write_yaml

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The tiny sweep below gives every figure: curves, trade-off, settings, structure, spectra, distances, fANOVA.
FIGURES = {"robust_vs_eps", "clean_vs_robust", "objectives_vs_settings", "structure_vs_robustness", "spectra",
           "distances", "importance"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, store):
    """A quickstart-like grid on digits, two objectives: the baseline and a regularizer at two strengths, each
    at two learning rates (so that fANOVA has two parameters every trial has)."""
    ensure_ray()
    tmp = tmp_path_factory.mktemp("report")
    space = tiny_space("rq", sampler={"name": "grid"}, samples=None,
                       search={"regularizer.kind": {"grid": ["none", "rep-spectral"]},
                               "regularizer.strength": {"grid": [0.01, 0.1], "when": {
                                   "regularizer.kind": ["rep-spectral"]}},
                               "train.lr": {"grid": [0.05, 0.1]}},
                       objectives=[{"metric": "clean_acc", "mode": "max"},
                                   {"metric": "acc_0.5", "mode": "max"}])
    space["base"]["train"] = {**TINY_BASE["train"], "seed": 0}
    result = cli("sweep", write_yaml(tmp / "rq.yaml", space), "--mlflow", store, "--storage", tmp / "runs",
                 "--max-concurrent", "2")
    assert result.exit_code == 0, result.output
    mlflow = MlflowClient(store)
    return {"mlflow": mlflow, "sweep": sweep_records.find_sweep(mlflow, "rq"), "tmp": tmp, "store": store}


def _check_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    image = imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def _html_figures(text: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data)
            for name, data in re.findall(r"<img alt='([^']+)' width='\d+' src='data:image/png;base64,([^']+)'>", text)}


def test_html_report_embeds_every_figure_and_logs_them(tiny):
    out = tiny["tmp"] / "html"
    result = cli("report", "rq", "--out", out, "--mlflow", tiny["store"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["report.html"]
    found = _html_figures((out / "report.html").read_text())
    assert set(found) == FIGURES
    for data in found.values():
        _check_png(data)
    logged = {a.path for a in tiny["mlflow"].list_artifacts(tiny["sweep"].parent_run_id, "report")}
    assert logged == {f"report/{name}.png" for name in FIGURES} | {"report/report.html"}


class Page(html.parser.HTMLParser):
    """The report's visible text and its tables: rows of (text, attributes, link) cells, each row's class."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.tables, self.cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append({"class": attrs.get("class"), "cells": []})
        elif tag in ("td", "th"):
            self.cell = {"text": "", "class": attrs.get("class"), "href": None}
            self.tables[-1][-1]["cells"].append(self.cell)
        elif tag == "a" and self.cell is not None:
            self.cell["href"] = attrs["href"]

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell["text"] += data


def _distances(mlflow, run_id) -> np.ndarray:
    with tempfile.TemporaryDirectory() as staging:
        return np.load(mlflow.download_artifacts(run_id, "distances.npy", staging))


def test_html_report_lists_every_trial_against_the_baseline_rounded_and_linked(tiny):
    out = tiny["tmp"] / "trials"
    assert cli("report", "rq", "--out", out, "--mlflow", tiny["store"]).exit_code == 0
    page = Page((out / "report.html").read_text())
    visible = " ".join(page.text)
    decimals = re.findall(r"(?<![\w.])\d*\.\d+(?![\w.])", visible)
    assert decimals and all(len(d.replace(".", "").lstrip("0")) <= 3 for d in decimals), decimals
    assert "at most 200 model queries per point, on the first 20 test points" in visible  # tangent/l2/200/20
    assert "over n = 6 trials" in visible and "n = 6 finished trials" in visible  # Spearman and fANOVA

    header, *rows = next(t for t in page.tables if [c["text"] for c in t[0]["cells"]][:1] == ["trial"]
                         and "outcome" in [c["text"] for c in t[0]["cells"]])
    columns = [c["text"] for c in header["cells"]]
    assert columns[-2:] == ["Δ clean_acc (pp)", "Δ acc_0.5 (pp)"]
    mlflow = tiny["mlflow"]
    trials = {r.trial_id: r for r in sweep_records.trials(mlflow, tiny["sweep"])}
    assert len(rows) == len(trials) == 6
    (base,) = [row for row in rows if row["class"] == "baseline"]
    base_trial = trials[base["cells"][0]["text"]]
    assert base_trial.searched["regularizer.kind"] == "none"
    assert [c["text"] for c in base["cells"][-2:]] == ["baseline", "baseline"]
    base_distances = _distances(mlflow, base_trial.run_id)
    for row in rows:
        cells = dict(zip(columns, row["cells"]))
        trial = trials[cells["trial"]["text"]]
        assert trial.run_id in cells["trial"]["href"] and "workflowType=machine_learning" in cells["trial"]["href"]
        if "regularizer.strength" in trial.searched:
            assert cells["regularizer.strength"]["text"] == f"{trial.searched['regularizer.strength']:.3g}"
        if row is base:
            continue
        cell = cells["Δ acc_0.5 (pp)"]
        found = re.fullmatch(r"([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]( ≈)?", cell["text"])
        assert found, cell["text"]
        distances = _distances(mlflow, trial.run_id)
        robust = lambda d: np.isfinite(d) & (d > 0.5)  # noqa: E731
        direct = 100 * np.mean(robust(distances).astype(float) - robust(base_distances))
        assert float(found[1]) == pytest.approx(direct, abs=0.051)
        within = float(found[2]) <= 0 <= float(found[3])
        assert bool(found[4]) == within == (cell["class"] == "noise")


def test_figures_use_a_colour_blind_safe_palette_and_readable_axes():
    okabe_ito = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"}
    colours = [figures.color(kind) for kind in figures.KINDS]
    assert len(set(colours)) == len(colours) and set(colours) <= okabe_ito
    assert len({figures.marker(kind) for kind in figures.KINDS}) == len(figures.KINDS)
    high = [{"kind": "none", "clean": c, "robust": r} for c, r in [(0.99, 0.97), (1.0, 1.0), (0.995, 0.99)]]
    (ax,) = figures.tradeoff(high, [], "acc_0.5").axes
    assert ax.get_ylim()[1] <= 100 and ax.get_xlim()[1] <= 100
    points = [{"kind": "rep-spectral", "alpha_hat": 1 + i / 10, "sigma_sq_sum": 2.0 + i, "robust": 0.5} for i in range(5)]
    figure = figures.structure(points, "acc_0.5", {})
    figure.canvas.draw()
    ax = figure.axes[1]  # Σσ² from 2 to 6: less than a decade on a log axis
    left, right = ax.get_xlim()
    shown = [t.get_text() for t in ax.xaxis.get_majorticklabels() + ax.xaxis.get_minorticklabels()
             if t.get_text() and left <= t.get_position()[0] <= right]
    assert len(shown) >= 2, shown
    assert len(figures.png(figure)) > 0


def test_every_trial_logs_its_spectrum_and_distance_figures(tiny):
    mlflow = tiny["mlflow"]
    for trial in sweep_records.trials(mlflow, tiny["sweep"]):
        assert {"spectrum.png", "distances.png"} <= {a.path for a in mlflow.list_artifacts(trial.run_id)}
        with tempfile.TemporaryDirectory() as staging:
            _check_png(Path(mlflow.download_artifacts(trial.run_id, "spectrum.png", staging)).read_bytes())


def test_markdown_report_writes_figure_files(tiny):
    out = tiny["tmp"] / "md"
    result = cli("report", "rq", "--out", out, "--format", "md", "--mlflow", tiny["store"])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    files = sorted(p.name for p in (out / "figures").iterdir())
    assert files == sorted(f"{name}.png" for name in FIGURES)
    for name in files:
        assert f"(figures/{name})" in text
        _check_png((out / "figures" / name).read_bytes())


def test_pareto_table_holds_exactly_the_non_dominated_trials(tiny):
    out = tiny["tmp"] / "pareto"
    assert cli("report", "rq", "--out", out, "--format", "md", "--mlflow", tiny["store"]).exit_code == 0
    section = (out / "report.md").read_text().split("## Pareto front")[1].split("\n## ")[0]
    listed = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")} - {"trial"}
    runs = tiny["mlflow"].search_runs([tiny["sweep"].experiment_id], "tags.`specreg.role` = 'trial'")
    points = {r.data.tags["specreg.trial_id"]: (r.data.metrics["clean_acc"], r.data.metrics["acc_0.5"])
              for r in runs}
    assert len(points) == 6
    non_dominated = {t for t, (a, b) in points.items()
                     if not any(x >= a and y >= b and (x, y) != (a, b) for x, y in points.values())}
    assert listed == non_dominated


def test_report_of_an_unknown_sweep_exits_2_and_writes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("report", "nosuch", "--out", "out", "--mlflow", tiny["store"])
    assert result.exit_code == 2 and "no sweep named 'nosuch'" in result.output
    result = cli("report", "rq", "--out", "out")  # no store here
    assert result.exit_code == 2 and "no MLflow store" in result.output
    result = cli("report", "rq", "--out", "out", "--eps", "7", "--mlflow", tiny["store"])
    assert result.exit_code == 2 and "--eps" in result.output
    assert list(tmp_path.iterdir()) == []


def test_confirm_reruns_the_best_config_with_fresh_seeds_and_export_prefers_it(tiny):
    mlflow, store, tmp = tiny["mlflow"], tiny["store"], tiny["tmp"]
    result = cli("confirm", "rq", "--top", "1", "--seeds", "2", "--mlflow", store, "--storage", tmp / "runs")
    assert result.exit_code == 0, result.output
    parent = sweep_records.trials(mlflow, tiny["sweep"])
    objectives = tiny["sweep"].objectives
    front = [r for r in parent if not any(sweep_records.dominates(o, r, objectives) for o in parent)]
    best = max(front, key=lambda r: r.metrics["clean_acc"])  # --top 1 of the Pareto set, by the first objective
    child = sweep_records.find_sweep(mlflow, "rq-confirm")
    (config,) = sweep_records.trials(mlflow, child)
    assert config.status == "FINISHED" and child.seeds == [1, 2]
    assert yaml.safe_load(mlflow.get_run(config.run_id).data.tags["specreg.confirms_run"]) == [best.run_id]
    assert sweep_records.run_config(mlflow, config.run_id)["regularizer"] == sweep_records.run_config(mlflow, best.run_id)["regularizer"]
    seeds = mlflow.search_runs([child.experiment_id], f"tags.`mlflow.parentRunId` = '{config.run_id}'")
    assert sorted(int(s.data.params["train.seed"]) for s in seeds) == [1, 2]

    out = tmp / "export"
    assert cli("export", "rq", "--out", out, "--mlflow", store).exit_code == 0
    front = yaml.safe_load((out / "pareto.yaml").read_text())
    assert [m["mlflow_run_id"] for m in front] == [best.run_id] and front[0]["confirmed_by"] == "rq-confirm"
    assert front[0]["metrics"]["clean_acc"] == pytest.approx(np.mean([s.data.metrics["clean_acc"] for s in seeds]))
    table = pq.read_table(out / "trials.parquet").to_pylist()
    assert [r["trial_id"] for r in table if r["confirmed_by"]] == [best.trial_id]
    assert "(confirmed)" in (out / "summary.md").read_text()

    out = tmp / "confirmed-report"
    assert cli("report", "rq", "--out", out, "--format", "md", "--mlflow", store).exit_code == 0
    assert "## Confirmation with fresh seeds" in (out / "report.md").read_text()
    result = cli("report", "rq-confirm", "--out", tmp / "child-report", "--format", "md", "--mlflow", store)
    assert result.exit_code == 0, result.output
    text = (tmp / "child-report" / "report.md").read_text()
    assert "seed-aware Pareto front" in text
    front_rows = [line for line in text.split("## Pareto front")[1].split("\n## ")[0].splitlines()
                  if line.startswith("| ") and "trial" not in line]
    assert front_rows and all(re.search(r"\d% \[[\d.]+%, [\d.]+%\]", cell)  # seed mean [bootstrap interval]
                              for row in front_rows for cell in row.split("|")[3:-1])
