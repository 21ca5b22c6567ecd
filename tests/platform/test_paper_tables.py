"""The paper study's tables (bench/paper_study.py) on networks whose distances are known: the paired
differences against a direct computation and scipy's t-test, and the dose table read at one attack budget."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("paper_study", ROOT / "bench" / "paper_study.py")
paper_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_study)


def network(seed, arm, distances, *, strength=1e-3, epochs=400, iterations=160, trace=None):
    distances = np.asarray(distances, dtype=float)
    metrics = {"clean_acc": 0.85, "med_dist_correct": float(np.median(distances)),
               "kept_1.0": float(np.mean(distances > 1)), "sigma_sq_sum": 10.0, "attack_queries_mean": 1.0}
    return {"seed": seed, "arm": arm, "strength": strength, "epochs": epochs, "burnin": 360, "metrics": metrics,
            "distances": distances, "iterations": iterations, "trace": trace or {}}


def cell(table: str, first: str, statistic: str) -> list[str]:
    """The cells of the table row whose first two columns are `first` and `statistic`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [first, statistic]:
            return cells
    raise AssertionError(f"no row {first!r}, {statistic!r} in\n{table}")


def test_paired_differences_match_a_direct_computation_and_scipy(monkeypatch):
    monkeypatch.setattr(paper_study, "BOOTSTRAP", 2_000)
    rng = np.random.default_rng(1)
    shifts = {400: 0.05, 500: 0.12, 600: 0.10}
    records = []
    for seed, shift in shifts.items():
        base = rng.uniform(0.2, 2.0, 301)
        records += [network(seed, "none", base), network(seed, "all-layer-spectral", base + shift),
                    network(seed, "rep-spectral + activation term", base + shift + 0.02)]
    table = paper_study.difference_table(records,
                                         [("rep-spectral + activation term", "none"), ("all-layer-spectral", "none")])
    row = cell(table, "all-layer-spectral − none", "median distance")
    # A shift of every distance moves the median by the shift: the mean difference is the mean shift.
    assert float(row[3]) == pytest.approx(np.mean(list(shifts.values())), abs=5e-4)
    diffs = np.array(list(shifts.values()))
    assert float(row[5]) == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue, rel=1e-2)
    other = cell(table, "rep-spectral + activation term − none", "median distance")
    p_other = stats.ttest_1samp(diffs + 0.02, 0).pvalue
    # Holm over the two comparisons: the smaller p doubled, the larger kept at least as large.
    assert float(other[6]) == pytest.approx(min(1, 2 * min(p_other, float(row[5]))), rel=1e-2)
    low, high = (float(v) for v in row[4].strip("[]").split(", "))
    assert low < float(row[3]) < high


def test_dose_table_reads_every_network_at_the_dose_budget():
    base = np.linspace(0.5, 1.5, 101)
    dose = [network(400, "none", base, epochs=370, iterations=80),
            network(400, "rep-spectral + activation term", base + 0.1, epochs=370, iterations=80),
            network(400, "none", base, epochs=400, iterations=80)]
    # The main study's network: median 1.0 after its full 160 iterations, 1.3 after 80 (its trace).
    main = [network(400, "none", base, iterations=160,
                    trace={80: {"med_dist_correct": 1.3, "kept_1.0": 0.6, "attack_queries_mean": 1.0}}),
            network(500, "none", base, iterations=160),
            network(400, "all-layer-spectral", base, iterations=160,
                    trace={80: {"med_dist_correct": 1.2, "kept_1.0": 0.5, "attack_queries_mean": 1.0}})]
    rows = paper_study.dose_rows(dose, main)
    assert [(r["regularized"], r["source"]) for r in rows] == [(10, "dose"), (10, "dose"), (40, "dose"), (40, "main")]
    assert rows[-1]["median"] == 1.3 and rows[-1]["robust"] == 0.6
    table = paper_study.dose_table(dose, main)
    regularized = cell(table, "10", "rep-spectral + activation term")
    delta, low, high = map(float, re.findall(r"[+-]\d+\.\d+", regularized[6]))
    assert delta == pytest.approx(0.1) and low < 0.1 < high and high - low < 0.3
    # a bootstrap interval only where both networks' distances are at the dose budget: not for `main` rows
    main_row = next(line for line in table.splitlines() if "| main |" in line)
    assert main_row.split(" | ")[6] == "+0.3000"
    # A main-study network without the dose budget in its trace is left out, not read at another budget.
    assert paper_study.dose_rows(dose, [network(400, "none", base, iterations=160)]) == paper_study.dose_rows(dose, [])


def test_figures_are_drawn(tmp_path):
    base = np.linspace(0.5, 1.5, 101)
    dose = [network(400, "none", base, epochs=epochs, iterations=80) for epochs in (370, 380)]
    dose += [network(400, "rep-spectral + activation term", base + 0.1, strength=s, epochs=e, iterations=80)
             for s in (1e-3, 1e-2) for e in (370, 380)]
    paper_study.dose_figure(dose, tmp_path / "dose.png")
    paper_study.robust_figure(dose, tmp_path / "robust.png")
    layer = network(400, "all-layer-spectral", base + 0.2, iterations=80)
    layer["metrics"]["clean_acc"] = 0.84   # the line through none's and all-layer's means gets drawn
    paper_study.tradeoff_figure(dose + [layer], dose, tmp_path / "tradeoff.png")
    for name in ("dose.png", "robust.png", "tradeoff.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_arm_of_the_study_spaces_gets_its_own_name():
    """The readout follow-up is rep-spectral placed on the readout: it must not be tabulated as rep-spectral."""
    import specreg
    from specreg_platform.space.space import load_space

    names = set()
    for space in ("paper_fmnist_slp", "paper_fmnist_slp_readout"):
        sweep, _ = load_space(ROOT / "search_spaces" / f"{space}.yaml")
        names |= {paper_study.arm(specreg.validate_config(sweep.trial_config(p))) for p in sweep.grid_points()}
    assert names == set(paper_study.ARMS)


def test_time_table_gives_a_rate_only_for_attacks_run_in_one_piece():
    whole, resumed = network(400, "none", [1.0, 2.0]), network(400, "rep-spectral", [1.0, 2.0])
    for record, at in ((whole, 0), (resumed, 130)):
        record["metrics"].update(attack_seconds=500.0, attack_samples=1000, attack_queries_mean=2_000.0,
                                 attack_resumed_at=float(at))
        record["epoch_seconds"] = {360: 3.0, 361: 4.0}
    table = paper_study.time_table([whole, resumed])
    assert cell(table, "400", "none")[2:] == ["3", "4", "500", "4,000"]   # 2,000 × 1,000 rows in 500 s
    assert cell(table, "400", "rep-spectral")[4:] == ["500 (iterations 131–160 only)", "—"]


def test_clean_table_pairs_by_seed_and_matches_scipy_with_holm():
    clean = {"none": [0.8517, 0.8517, 0.8508], "rep-spectral": [0.8477, 0.8470, 0.8471],
             "all-layer-spectral": [0.8430, 0.8414, 0.8435]}
    records = []
    for name, accs in clean.items():
        for seed, acc in zip((600, 400, 500), accs[2:] + accs[:2]):   # out of seed order: pairing must use seeds
            r = network(seed, name, [1.0])
            r["metrics"]["clean_acc"] = acc
            records.append(r)
    table = paper_study.clean_table(records, [("rep-spectral", "none"), ("all-layer-spectral", "none")])
    p = [stats.ttest_rel(clean[a], clean["none"]).pvalue for a in ("rep-spectral", "all-layer-spectral")]
    rep, layer = cell(table, "rep-spectral − none", "3"), cell(table, "all-layer-spectral − none", "3")
    assert rep[2] == "-0.40, -0.47, -0.37" and rep[3] == "-0.41"
    assert float(rep[4]) == pytest.approx(p[0], rel=1e-2) and float(layer[4]) == pytest.approx(p[1], rel=1e-2)
    # Holm over two tests: the smaller p doubled, the larger kept (when it stays above the doubled smaller)
    low, high = sorted(p)
    holm = {p.index(low): 2 * low, p.index(high): max(high, 2 * low)}
    assert float(rep[5]) == pytest.approx(holm[0], rel=1e-2) and float(layer[5]) == pytest.approx(holm[1], rel=1e-2)


def test_tradeoff_points_put_every_network_at_the_dose_budget():
    base = np.linspace(0.5, 1.5, 101)
    main = [network(400, "none", base, iterations=160,
                    trace={80: {"med_dist_correct": 1.3, "kept_1.0": 0.6, "attack_queries_mean": 1.0}}),
            network(500, "none", base, iterations=160)]   # no 80-iteration trace: left out, not read at 160
    dose = [network(400, "rep-spectral + activation term", base + 0.1, strength=1e-2, epochs=370, iterations=80),
            network(400, "none", base, epochs=370, iterations=80)]
    points = paper_study.tradeoff_points(main, dose)
    assert [(q["source"], q["label"], q["median"]) for q in points] == [
        ("main", "none", 1.3), ("dose", "λ=0.01, 10 reg. ep.", pytest.approx(1.1)), ("dose", "none, 370 ep.", 1.0)]
    assert {q["budget"] for q in points} == {80} and points[0]["clean"] == pytest.approx(85.0)
    # without a dose sweep, every network at its full budget
    assert [q["median"] for q in paper_study.tradeoff_points(main, [])] == [1.0, 1.0]


def test_learning_curve_table_reads_the_prefix_and_shows_arms_that_left_it():
    curve = {e: e / 1000 for e in range(1, 401)}   # test accuracy e/1000 after epoch e
    records = [network(400, "none", [1.0]), network(400, "rep-spectral", [1.0]), network(500, "none", [1.0]),
               network(500, "rep-spectral", [1.0]), network(600, "rep-spectral", [1.0])]
    for r in records:
        r["test_acc"] = dict(curve)
    records[3]["test_acc"][360] = 0.5   # seed 500's rep-spectral did not resume the shared prefix
    table = paper_study.learning_curve_table(records)
    assert cell(table, "400", "0.1 / 0.5 / 2.0 / 3.0 / 10.0 / 20.0")[2:] == ["36.00", "2"]
    assert cell(table, "500", "0.1 / 0.5 / 2.0 / 3.0 / 10.0 / 20.0")[2:] == ["36.00, 50.00", "2"]
    # a seed without a `none` network (a dose sweep's first finished network) reads the prefix off another
    assert cell(table, "600", "0.1 / 0.5 / 2.0 / 3.0 / 10.0 / 20.0")[2:] == ["36.00", "1"]


def test_an_added_arm_leaves_the_other_intervals_as_they_were(monkeypatch):
    monkeypatch.setattr(paper_study, "BOOTSTRAP", 500)
    rng = np.random.default_rng(2)
    records = []
    for seed in (400, 500):
        base = rng.uniform(0.2, 2.0, 101)
        records += [network(seed, "none", base), network(seed, "rep-spectral", base + rng.uniform(0, 0.2, 101))]
    extra = [network(400, "all-layer-spectral", rng.uniform(0.2, 2.0, 101))]
    alone = paper_study.difference_table(records, [("rep-spectral", "none")])
    beside = paper_study.difference_table(records + extra, [("all-layer-spectral", "none"), ("rep-spectral", "none")])
    for statistic in ("median distance", "robust ε=1.0"):
        assert cell(alone, "rep-spectral − none", statistic)[4] == cell(beside, "rep-spectral − none", statistic)[4]


def test_learning_curve_table_marks_an_epoch_the_store_lacks():
    record = network(400, "none", [1.0])
    record["test_acc"] = {e: e / 1000 for e in range(1, 401) if e != 5}
    assert "| 0.1 / — / 2.0 / 3.0 / 10.0 / 20.0 |" in paper_study.learning_curve_table([record])


def exported_network(seed, arm, distances, **kwargs):
    """A network with every field the export keeps: run id, the prefix's tag, the epochs' histories."""
    record = network(seed, arm, distances, **kwargs)
    d = record["distances"]
    record["metrics"].update({"attack_seconds": 100.0, "attack_samples": float(len(d)), "acc_1.0": 0.4,
                              "adv_auc": 0.3, **{f"kept_{e}": float(np.mean(d > e)) for e in (0.5, 1.0, 2.0)}})
    return {**record, "run_id": f"run-{seed}-{arm}-{record['epochs']}-{record['strength']}", "burnin_tag": "b45aaa3",
            "epoch_seconds": {e: 2.5 + e / 1000 for e in range(1, record["epochs"] + 1)},
            "test_acc": {e: 0.5 + e / 1000 for e in range(10, record["epochs"] + 1, 10)} | {1: 0.2, 5: 0.5}}


def test_export_keeps_every_field_the_tables_read(tmp_path):
    trace = {10: {"med_dist_correct": 1.4, "kept_1.0": 0.7, "attack_queries_mean": 2514.0},
             40: {"med_dist_correct": 1.2, "kept_1.0": 0.6, "attack_queries_mean": 18154.0}}
    records = [exported_network(400, "none", [0.3, 1.7, np.inf], iterations=80, trace=trace),
               exported_network(400, "rep-spectral + activation term", [0.5, 2.0, 0.25], strength=1e-2, epochs=370)]
    records[1]["burnin_tag"] = None
    path = tmp_path / "networks-x.parquet"
    paper_study.write_networks(records, path)
    back = paper_study.read_networks(path)
    assert len(back) == 2
    for before, after in zip(records, back):
        assert set(after) == set(before)
        np.testing.assert_array_equal(after.pop("distances"), before["distances"])
        assert after == {k: v for k, v in before.items() if k != "distances"}
    # the histories come back keyed by their integer step, so `at` and the learning curve read them as before
    assert paper_study.at(back[0], 40, "med_dist_correct") == 1.2 and back[0]["test_acc"][5] == 0.5


def test_tables_from_the_dose_export_alone(tmp_path):
    base = np.linspace(0.5, 1.5, 101)
    dose = [exported_network(400, "none", base, epochs=370, iterations=80),
            exported_network(400, "rep-spectral + activation term", base + 0.2, strength=1e-2, epochs=370,
                             iterations=80)]
    paper_study.write_networks(dose, paper_study.export_path(tmp_path, paper_study.DOSE))
    text = paper_study.tables(tmp_path)
    assert text == (tmp_path / "tables.md").read_text()
    assert text.startswith("# paper-fmnist-slp-dose: the tables")
    assert "networks-paper-fmnist-slp-dose.parquet` (2 networks)" in text and "## Per arm" not in text
    assert cell(text, "400", "20.0 / 50.0 / 52.0 / 53.0 / 60.0 / 70.0")[2:] == ["86.00", "2"]
    assert cell(text, "10", "rep-spectral + activation term")[6].startswith("+0.2000 [")
    # the dose networks' own convergence and time rows, each named by λ and epochs
    assert cell(text, "400", "λ=0.01, 10 reg. ep.")[3] == "1.2000" and cell(text, "400", "none, 370 ep.")
    assert (tmp_path / "dose.png").exists() and not (tmp_path / "tradeoff.png").exists()


def test_tables_without_an_export_say_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="paper_study.py export"):
        paper_study.tables(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tables_from_the_main_and_dose_exports(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_study, "BOOTSTRAP", 200)
    base = np.linspace(0.5, 1.5, 101)
    trace = {80: {"med_dist_correct": 1.1, "kept_1.0": 0.6, "attack_queries_mean": 1.0}}
    main = [exported_network(seed, arm, base + shift, trace=trace)
            for seed in (400, 500) for arm, shift in (("none", 0.0), ("all-layer-spectral", 0.1))]
    for r in main[1::2]:
        r["metrics"]["clean_acc"] = 0.84   # all-layer's cost, so the trade-off figure's line has a slope
    dose = [exported_network(400, "none", base, epochs=370, iterations=80)]
    paper_study.write_networks(main, paper_study.export_path(tmp_path, paper_study.MAIN))
    paper_study.write_networks(dose, paper_study.export_path(tmp_path, paper_study.DOSE))
    text = paper_study.tables(tmp_path)
    assert cell(text, "all-layer-spectral − none", "median distance")[3] == "+0.1"
    # the dose table reads the main study's seed beside the dose networks, at the dose budget
    assert cell(text, "40", "none")[3:6] == ["main", "85.0", "1.1000"]
    assert text.count("## The attack's convergence") == 1
    assert all((tmp_path / name).exists() for name in ("dose.png", "robust_vs_eps.png", "tradeoff.png"))
