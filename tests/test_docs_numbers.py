"""The paper study's tables in docs/results.md are copied by hand from the generated
docs/figures/paper-fmnist-slp/tables.md and docs/figures/paper-fmnist-slp-dose/tables.md (which
bench/paper_study.py writes from the sweeps' exports); a copying slip fails here. Every number in results.md must be the generated one, rounded to the digits results.md shows."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
NUMBER = re.compile(r"[+\-−]?\d+(?:\.\d+)?(?:e[+\-]\d+)?")  # tables.md writes tiny p as 5.68e-05

# results.md's shorter row names -> tables.md's
ARMS = {"`none`": "none", "rep-spectral + activation term (their `eig-ub`)": "rep-spectral + activation term",
        "rep-spectral": "rep-spectral", "all-layer spectral": "all-layer-spectral",
        "readout spectral (their `spectral`)": "readout spectral (their `spectral`)"}
SHORT = {"`none`": "none", "rep-spectral + term": "rep-spectral + activation term", "rep-spectral": "rep-spectral",
         "all-layer": "all-layer-spectral", "readout": "readout spectral (their `spectral`)"}


def rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells) of every markdown table whose header row starts with `header_start`."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith(header_start):
            inside = True
        elif inside and line.startswith("|"):
            if not line.startswith("|---"):   # the header's separator row
                out.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            inside = False
    return out


def numbers(cell: str) -> list[float]:
    return [float(n.replace("−", "-")) for n in NUMBER.findall(cell)]


def decimals(cell: str) -> list[int]:
    return [len(n.split("e")[0].split(".")[1]) if "." in n else 0 for n in NUMBER.findall(cell)]


def agrees(shown: str, generated: str) -> bool:
    """Every number in `shown` is the corresponding one of `generated` rounded to the digits shown."""
    a, b = numbers(shown), numbers(generated)
    if len(a) != len(b):
        return False
    return all(abs(x - y) <= 0.5 * 10 ** -d + 1e-12 for x, y, d in zip(a, b, decimals(shown)))


@pytest.fixture(scope="module")
def results():
    """The paper study's section of results.md (later sections have tables of other studies)."""
    text = (DOCS / "results.md").read_text()
    return text.split("## The paper's Fashion-MNIST experiment")[1].split("\n## ")[0]


@pytest.fixture(scope="module")
def tables():
    return (DOCS / "figures" / "paper-fmnist-slp" / "tables.md").read_text()


def test_per_arm_table_is_the_generated_one(results, tables):
    made = {r[0]: r[2:] for r in rows(tables, "| arm | seeds | clean acc")}
    shown = rows(results, "| arm | clean acc (%) | median distance")
    assert len(shown) == len(made)
    for row in shown:
        assert row[1:] == made[ARMS[row[0]]], row[0]


def test_paired_table_is_the_generated_one(results, tables):
    paired = {(r[0], r[1]): r for r in rows(tables, "| arm − base | statistic |")}
    clean = {r[0]: r for r in rows(tables, "| arm − base | seeds | per seed")}
    shown = rows(results, "| comparison | median distance | Holm p")
    assert shown
    for row in shown:
        a, b = (SHORT[s.strip()] for s in row[0].split(" − "))
        name = f"{a} − {b}"
        median, robust = paired[(name, "median distance")], paired[(name, "robust ε=1.0")]
        assert agrees(row[1], f"{median[3]} {median[4]}"), (name, row[1], median)
        assert agrees(row[2], median[6]) and agrees(row[3], median[7]), (name, row[2:4], median)
        assert agrees(row[4], f"{robust[3]} {robust[4]}") and agrees(row[5], robust[6]), (name, row[4:6], robust)
        assert agrees(row[6], f"{clean[name][3]} {clean[name][5]}"), (name, row[6], clean[name])


def test_the_check_catches_a_slip():
    assert agrees("+0.084 [+0.039, +0.145]", "+0.0841 [+0.0394, +0.145]")
    assert not agrees("+0.084 [+0.039, +0.145]", "+0.0841 [+0.0404, +0.145]")
    assert agrees("0.85", "0.846") and not agrees("0.84", "0.846")
    assert agrees("−0.41, 0.015", "-0.41 0.0153") and not agrees("−0.41, 0.015", "+0.41 0.0153")
    assert agrees("0.0002", "1.7e-04") and not agrees("0.0002", "5.68e-05")


def test_dose_table_is_the_generated_one(results, tables):
    """results.md's dose table: the restarted sweep's rows are its generated tables.md's; the 40-epoch rows
    come from the lost store's tables.md (its dose section, and the convergence table at 80 iterations for
    seed 400's `none`); each `− none` is the row's median less `none`'s after the same epochs."""
    dose = {(r[0], r[2]): r for r in rows((DOCS / "figures" / "paper-fmnist-slp-dose" / "tables.md").read_text(),
                                            "| regularized epochs | arm | λ |")}
    lost = {(r[0], r[2]): r for r in rows(tables, "| regularized epochs | arm | λ |")}
    lost[("40", "—")] = next(["40", "none", "—", "main", None, r[3].split(" / ")[3], "—",
                              r[5].split(" / ")[3], None] for r in rows(tables, "| seed | arm | queries")
                             if r[:2] == ["400", "none"])
    shown = rows(results, "| regularized epochs | λ | clean (%)")
    assert len(shown) >= 6
    medians = {(r[0], r[1]): float(made[5]) for r in shown
               for made in [(dose if r[7] == "dose" else lost)[(r[0], r[1])]]}
    for row in shown:
        made = (dose if row[7] == "dose" else lost)[(row[0], row[1])]
        pairs = [(row[3], made[5]), (row[5], made[7])] + [(a, b) for a, b in ((row[2], made[4]), (row[6], made[8]))
                                                          if b is not None]
        assert all(agrees(a, b) for a, b in pairs), (row, made)
        if row[1] == "—":
            continue
        if row[7] == "dose":   # the generated difference and its interval
            assert agrees(row[4], made[6]), (row, made)
        else:                  # the lost store's dose table had no `none` at 40 epochs: the difference by hand
            assert agrees(row[4], f"{medians[(row[0], row[1])] - medians[(row[0], '—')]:+.4f}"), row
