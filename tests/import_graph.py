"""The package's own imports, read from the source with ``ast`` (no module is imported): every ``import``
statement counts, at module level, inside a function or under ``if TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import dora_engine

PACKAGE_ROOT = Path(dora_engine.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, not ``.__init__``)."""
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of one of the package's ``modules`` in ``module``'s source."""
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []
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
                found.append((node.lineno, name))
    return sorted(set(found))
