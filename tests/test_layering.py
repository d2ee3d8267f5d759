"""The package is one stack of layers and every import runs down it (docs/design.md section 2).

Lowest first; a module may import its own layer group and the layers below, never one above, nor a peer
group of its own layer. Every import counts: module level, inside a function, under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from import_graph import PACKAGE_ROOT, imports, package_modules

PACKAGE = PACKAGE_ROOT.name
REPO_ROOT = PACKAGE_ROOT.parent

LAYERS: tuple[tuple[str, ...], ...] = (
    # the version and the error types that every layer raises
    ("dora_engine", "errors"),
    # leaves: atomic file writes, the torch device, the prompt type, the registry of losses (the ground truth),
    # the one place that loads Hugging Face models (never their own code unless asked)
    ("atomic", "device", "prompt", "losses", "hf_loading"),
    # the loss op: torch and the registry only, so that the op imports light
    ("ops",),
    # sampling from a model: data augmentation and evaluation both call it, and it needs neither
    ("generation",),
    # records, converters, augmentation, reward scoring
    ("data",),
    # what every trainer shares: the row layout of records, and the preference statistics it logs
    ("rows", "preference"),
    # phase 1: h̃ from classifiers over records
    ("calibration",),
    # phase 2: the engine, and the loss inside other trainers; peers that must not depend on each other
    ("training", "integrations"),
    # generation and judging of trained models, calibration diagnostics
    ("eval",),
    # iterative self-training: rounds of generation, scoring, calibration, alignment and evaluation
    ("iterate",),
    # the command, over every phase's commands
    ("cli",),
)
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}


def group_of(module: str) -> str:
    """``dora_engine.data.schema`` -> ``data``; the package itself -> ``dora_engine``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def violations(modules: dict[str, Path]) -> list[str]:
    """One line per import that does not run down the stack, naming the file, the line and both layers."""
    found = []
    for module, path in sorted(modules.items()):
        source = group_of(module)
        if source not in RANK:
            found.append(f"{shown(path)}: {module} belongs to no layer; place {source!r} in LAYERS")
            continue
        for line, target in imports(module, path, modules):
            dest = group_of(target)
            if dest == source or RANK.get(dest, len(LAYERS)) < RANK[source]:
                continue
            way = "up" if RANK.get(dest, len(LAYERS)) > RANK[source] else "sideways"
            found.append(f"{shown(path)}:{line}: {module} (layer {RANK[source]}, {source}) imports {target} "
                         f"(layer {RANK.get(dest, '?')}, {dest}): {way} the stack")
    return found


def test_every_layer_exists() -> None:
    groups = {group_of(module) for module in package_modules()}
    assert groups == set(RANK), (f"layers without a module: {sorted(set(RANK) - groups)}; "
                                 f"modules without a layer: {sorted(groups - set(RANK))}")


def test_no_import_runs_up_the_stack() -> None:
    found = violations(package_modules())
    assert not found, "imports against the layer order (tests/test_layering.py, LAYERS):\n" + "\n".join(found)


@pytest.mark.parametrize("body,line", [
    ("def f():\n    from dora_engine.training.engine import Trainer\n", 2),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dora_engine.data.schema import Record\n", 3),
    ("import dora_engine.eval.winrate\n", 1),
    ("from dora_engine import cli\n", 1),
])
def test_an_upward_import_is_named(tmp_path: Path, body: str, line: int) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(body, encoding="utf-8")
    modules = {**package_modules(), f"{PACKAGE}.ops.planted": planted}
    found = [v for v in violations(modules) if v.startswith(str(planted))]
    assert len(found) == 1 and found[0].startswith(f"{planted}:{line}: {PACKAGE}.ops.planted (layer 2, ops) imports")
    assert found[0].endswith("up the stack")


def test_a_peer_import_and_an_unplaced_module_are_named(tmp_path: Path) -> None:
    peer = tmp_path / "peer.py"
    peer.write_text("from dora_engine.training.config import TrainingConfig\n", encoding="utf-8")
    stray = tmp_path / "stray.py"
    stray.write_text("", encoding="utf-8")
    modules = {**package_modules(), f"{PACKAGE}.integrations.peer": peer, f"{PACKAGE}.stray": stray}
    found = [v for v in violations(modules) if v.startswith((str(peer), str(stray)))]
    assert found == [
        f"{peer}:1: {PACKAGE}.integrations.peer (layer {RANK['integrations']}, integrations) imports "
        f"{PACKAGE}.training.config (layer {RANK['training']}, training): sideways the stack",
        f"{stray}: {PACKAGE}.stray belongs to no layer; place 'stray' in LAYERS",
    ]
