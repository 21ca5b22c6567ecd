"""The paper study's tables in docs/results.md are copied by hand from the generated
docs/figures/paper-fmnist-slp/tables.md (which bench/paper_study.py writes from the MLflow store); a copying
slip fails here. Every number in results.md must be the generated one, rounded to the digits results.md shows."""
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
