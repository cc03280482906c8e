"""The architecture's rule, checked on the source: no import cycles, and each layer imports only downward.

Imports inside functions count (they are how cycles used to hide); `if TYPE_CHECKING:` blocks do not
(they never run). See docs/ARCHITECTURE.md for the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "prunectl"

# Components (configs and algorithms) and the foundation they stand on: never a stage, the stage table,
# the study, the submission flow, the CLI or its rendering.
COMPONENTS = ["errors", "schema", "store", "artifacts", "lifecycle", "lineage", "metrics", "distributed",
              "checkpoints", "launch", "data", "model", "zero3", "loss", "memory", "masks", "distill", "train", "objectives", "sweep", "compare", "plots",
              "prune", "evaluate", "recipe"]
ABOVE_COMPONENTS = ("prunectl.stages", "prunectl.study", "prunectl.status", "prunectl.submission", "prunectl.cli",
                    "prunectl.render")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its code (TYPE_CHECKING blocks aside)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_imports_inside_functions_and_finds_a_cycle():
    graph = import_graph()
    assert "prunectl.stages.train" in graph["prunectl.study"]  # module level
    assert "prunectl.distributed" in graph["prunectl.train"]  # inside fit()
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("component", COMPONENTS)
def test_components_never_import_stages_or_the_app(component):
    graph = import_graph()
    mine = [m for m in graph if m == f"prunectl.{component}" or m.startswith(f"prunectl.{component}.")]
    assert mine, f"no module prunectl.{component}"
    bad = sorted({(m, t) for m in mine for t in graph[m] if t.startswith(ABOVE_COMPONENTS)})
    assert bad == []


def test_the_stage_table_is_imported_by_the_cli_and_the_study_only():
    graph = import_graph()
    importers = {m for m, targets in graph.items() if "prunectl.stages" in targets and not m.startswith("prunectl.stages")}
    assert importers <= {"prunectl.cli", "prunectl.study", "prunectl.submission"}


def test_the_launcher_knows_no_stage():
    graph = import_graph()
    assert not {t for t in graph["prunectl.launch"] if t.startswith(ABOVE_COMPONENTS) or t in (
        "prunectl.train", "prunectl.data", "prunectl.compare", "prunectl.recipe", "prunectl.distributed")}
    text = (PACKAGE / "launch.py").read_text()
    assert "stage ==" not in text and "StageJob" not in text
