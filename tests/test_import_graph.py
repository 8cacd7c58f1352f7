"""No import cycles in extract/, matching/, pipelines/, counting the imports inside functions too, and the
layers in their order: the shared leaves import no package module, extract never imports matching or
pipelines, matching never imports pipelines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("extract", "matching", "pipelines")
LEAVES = {"extract.safeio", "extract.runtime", "extract.safepickle"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the project modules it imports, anywhere in its body (functions included)."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            targets.update(n for n in names if n in modules and n != name)
        graph[name] = {t for t in targets if t.split(".")[0] in PACKAGES and t not in PACKAGES}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a list of modules (first repeated at the end), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40
    assert "extract.roi_outputs" in graph["extract.torchvision_backend"]  # the graph sees real imports
    assert "matching.tasks" in graph["matching.checkpoint"]  # …including those inside functions
    assert find_cycle(graph) == [], " → ".join(find_cycle(graph))


def test_the_layers_import_downwards_only():
    graph = import_graph()
    for module, targets in graph.items():
        if module in LEAVES:
            assert not targets, f"{module} is a leaf but imports {targets}"
        if module.startswith("extract."):
            assert not any(t.startswith(("matching", "pipelines")) for t in targets), (module, targets)
        if module.startswith("matching."):
            allowed = {"extract.shards", *LEAVES}
            assert all(t.startswith("matching") or t in allowed for t in targets), (module, targets)
