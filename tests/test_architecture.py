"""The architecture, checked from the source: the platform enters the library only through `specreg`'s top
level, neither package's modules import each other in a circle (function-level imports count), and the
platform's layers (docs/architecture.md) import only downwards:
cli → present / results → run → track / space → base → specreg."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"specreg": ROOT / "specreg", "specreg_platform": ROOT / "platform"}
BELOW_THE_DOOR = re.compile(r"^\s*(?:from|import)\s+specreg\.\S+", re.MULTILINE)
# The platform's layers, highest first: a module may import its own layer's modules and those below.
# `present` and `results` share a rank, as do `track` and `space`; the package graph must still be a DAG.
LAYERS = {"cli": 5, "present": 4, "results": 4, "run": 3, "track": 2, "space": 2, "base": 1}


def _modules(folder: Path) -> dict[str, Path]:
    """{dotted name inside the package: path} of every module, subpackages included (`run.sweep`)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        if path.stem == "__init__" or "__pycache__" in path.parts:
            continue
        found[".".join(path.relative_to(folder).with_suffix("").parts)] = path
    return found


def _platform_files() -> list[Path]:
    return [p for p in sorted(PACKAGES["specreg_platform"].rglob("*.py")) if "__pycache__" not in p.parts]


def _targets(node, name: str, package: str, modules) -> set[str]:
    """The package's modules that one import statement of module `name` names."""
    candidates = []
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        elif node.module == package or (node.module or "").startswith(package + "."):
            base = []
        else:
            return set()
        inner = (node.module or "") if node.level else (node.module or "").removeprefix(package).lstrip(".")
        prefix = ".".join(base + ([inner] if inner else []))
        candidates = [prefix] + [f"{prefix}.{a.name}" if prefix else a.name for a in node.names]
    elif isinstance(node, ast.Import):
        candidates = [a.name.removeprefix(package + ".") for a in node.names if a.name.startswith(package + ".")]
    return {c for c in candidates if c in modules}


def import_graph(package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement, wherever it stands."""
    modules = _modules(PACKAGES[package])
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _targets(node, name, package, modules) - {name}
    return graph


def layer(module: str) -> str:
    return module.split(".")[0]


def upward_arrows(graph: dict[str, set[str]], ranks: dict[str, int]) -> list[str]:
    """Every import that runs up the layers (or from or to a module in no layer)."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = ranks.get(layer(source)), ranks.get(layer(target))
            if low is None or high is None or high > low:
                found.append(f"{source} -> {target}")
    return found


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed onto the layers (imports inside a layer dropped)."""
    out = {layer(m): set() for m in graph}
    for source, targets in graph.items():
        out[layer(source)] |= {layer(t) for t in targets} - {layer(source)}
    return out


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
    for path in _platform_files():
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
    for path in _platform_files():
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


def test_upward_arrows_and_layer_cycles_are_found_in_a_synthetic_graph():
    ranks = {"top": 3, "mid": 2, "side": 2, "low": 1}
    clean = {"top.a": {"mid.b", "low.c"}, "mid.b": {"low.c", "side.d"}, "side.d": {"low.c"}, "low.c": set()}
    assert upward_arrows(clean, ranks) == []
    assert find_cycle(layer_graph(clean)) is None
    upward = {**clean, "low.c": {"mid.b"}, "mid.b": {"top.a"}}
    assert upward_arrows(upward, ranks) == ["low.c -> mid.b", "mid.b -> top.a"]
    unplaced = {"top.a": {"nowhere.x"}, "nowhere.x": set()}
    assert upward_arrows(unplaced, ranks) == ["top.a -> nowhere.x"]  # a module in no layer is refused too
    sideways = {**clean, "side.d": {"mid.b"}}  # same rank both ways: no upward arrow, but a circle of layers
    assert upward_arrows(sideways, ranks) == [] and find_cycle(layer_graph(sideways)) == ["mid", "side", "mid"]


def test_the_graph_sees_subpackage_and_function_level_imports():
    graph = import_graph("specreg_platform")
    assert "run.sweep" in graph and "track.connection" in graph["run.sweep"]
    assert "run.sweep" in graph["results.confirm"]  # imported inside run_confirm
    assert "present.report" in graph["cli"]          # imported inside the report command


def test_every_platform_module_sits_in_a_layer_and_imports_only_downwards():
    graph = import_graph("specreg_platform")
    unplaced = sorted(m for m in graph if layer(m) not in LAYERS)
    assert not unplaced, f"modules in no layer (add their folder to LAYERS and docs/architecture.md): {unplaced}"
    arrows = upward_arrows(graph, LAYERS)
    assert not arrows, "imports that run up the platform's layers: " + "; ".join(arrows)
    cycle = find_cycle(layer_graph(graph))
    assert cycle is None, f"the platform's layers import each other in a circle: {' -> '.join(cycle)}"
