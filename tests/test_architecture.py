"""The architecture, checked from the source: the platform enters the library only through `specreg`'s top
level, and neither package's modules import each other in a circle (function-level imports count)."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"specreg": ROOT / "specreg", "specreg_platform": ROOT / "platform"}
BELOW_THE_DOOR = re.compile(r"^\s*(?:from|import)\s+specreg\.\S+", re.MULTILINE)


def _modules(folder: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(folder.glob("*.py")) if path.stem != "__init__"}


def import_graph(package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement, wherever it stands."""
    modules = _modules(PACKAGES[package])
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from . import x / from .x import y
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.level == 0 and (node.module or "").startswith(package + "."):
                    targets = [node.module.split(".")[1]]
                elif node.level == 0 and node.module == package:
                    targets = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")]
            graph[name] |= {t.split(".")[0] for t in targets if t and t.split(".")[0] in modules} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state = {}  # absent: not visited; 1: on the current path; 2: done

    def visit(node, path):
        state[node] = 1
        for succ in sorted(graph[node]):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state:
                found = visit(succ, path + [succ])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_platform_imports_only_specreg_top_level():
    offenders = []
    for path in sorted(PACKAGES["specreg_platform"].glob("*.py")):
        source = path.read_text()
        offenders += [f"{path.name}: {m.group(0).strip()}" for m in BELOW_THE_DOOR.finditer(source)]
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("specreg.")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("specreg."):
                offenders.append(f"{path.name}: from {node.module} import ...")
    assert not offenders, "the platform goes around specreg's top level: " + "; ".join(sorted(set(offenders)))


def test_the_platform_uses_only_names_specreg_exports():
    import specreg

    used = set()
    for path in sorted(PACKAGES["specreg_platform"].glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "specreg":
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "specreg":
                used |= {a.name for a in node.names}
    missing = sorted(used - set(specreg.__all__) - {"__file__"})
    assert not missing, f"the platform uses specreg names that specreg.__all__ does not export: {missing}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package):
    graph = import_graph(package)
    assert graph, f"no modules found for {package}"
    cycle = find_cycle(graph)
    assert cycle is None, f"{package} imports in a circle: {' -> '.join(cycle)}"
