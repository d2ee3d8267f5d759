"""Steps that are done once: a folder per step, with a manifest of its inputs' content hash (docs/design.md
section 10).

A step is named by its folder under the run's folder (``round2/align-dora``) and described by its
``inputs``: a JSON-able mapping of the config values it reads and the content digests of the files it
reads (an earlier step's outputs, a user's data file or model folder). Its key is the SHA-256 of the
inputs' canonical JSON. When the step has run, ``record`` writes ``manifest.json`` into its folder: the
key, the inputs, and the size and SHA-256 of every output file, whose digest (``Done.digest``) is what a
later step lists among its inputs. The manifest is written last and atomically, after every output, so a
step counts as done exactly when its manifest exists: ``finished`` returns it when the key matches and the
outputs are still there, ``None`` when the step has not finished (it is then run again), and refuses a
manifest written from other inputs, naming what differs. Two steps with the same inputs have the same key,
and one folder serves both (round 1's generation from the start policy, shared by every chain).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write
from dora_engine.errors import UserValueError
from dora_engine.training.digests import file_entry

MANIFEST = "manifest.json"


def digest_json(value: Any) -> str:
    """SHA-256 of ``value``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _files(path: Path) -> list[Path]:
    """The regular files under ``path`` (itself when it is one), sorted; links are not followed."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def content_digest(path: str | os.PathLike) -> str:
    """The content hash of a file (its bytes) or of a folder (each file's relative path, size and SHA-256)."""
    path = Path(path)
    if path.is_file():
        return file_entry(path)["sha256"]
    return digest_json({p.relative_to(path).as_posix(): file_entry(p) for p in _files(path)})


@dataclass(frozen=True)
class Step:
    """One step: its folder (``root / name``) and its inputs."""

    root: Path
    name: str
    inputs: Mapping[str, Any]

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def key(self) -> str:
        return digest_json(self.inputs)


@dataclass(frozen=True)
class Done:
    """A finished step's manifest: its key, its outputs (relative path -> size and SHA-256) and what the step
    reported about itself (``info``)."""

    key: str
    outputs: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """The content hash of the step's outputs: what later steps list among their inputs."""
        return digest_json(self.outputs)


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    """The dotted names under which two JSON values differ."""
    if isinstance(before, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(before) | set(now), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in before or key not in now:
                found.append(name)
            else:
                found += _differences(before[key], now[key], name)
        return found
    return [] if before == now else [prefix or "(the whole input)"]


def finished(step: Step) -> Done | None:
    """The step's manifest when the step is done with these inputs; ``None`` when it has not finished (no
    manifest, or an output has gone). A manifest written from other inputs is refused, naming them."""
    path = step.folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest["key"] != step.key:
        changed = ", ".join(_differences(manifest["inputs"], json.loads(json.dumps(step.inputs)))) or "the key"
        raise UserValueError(
            f"{step.folder} was written from other inputs (they differ in: {changed}), so the run cannot continue "
            "there; restore them, or set output_dir to a new folder"
        )
    outputs = manifest["outputs"]
    for name, entry in outputs.items():
        output = step.folder / name
        if not output.is_file() or output.stat().st_size != entry["bytes"]:
            return None
    return Done(manifest["key"], outputs, manifest.get("info", {}))


def record(step: Step, outputs: Iterable[str | os.PathLike], info: Mapping[str, Any] | None = None) -> Done:
    """Write the step's manifest (atomically, after its outputs): the key, the inputs, every output file's
    size and SHA-256 (an output that is a folder: each file in it), ``info``."""
    entries = {}
    for output in outputs:
        for path in _files(step.folder / output):
            entries[path.relative_to(step.folder).as_posix()] = file_entry(path)
    done = Done(step.key, entries, dict(info or {}))
    with atomic_write(step.folder / MANIFEST) as handle:
        json.dump({"key": step.key, "inputs": step.inputs, "outputs": entries, "info": done.info}, handle, indent=1,
                  ensure_ascii=False)
    return done
