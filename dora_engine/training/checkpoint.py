"""DeepSpeed checkpoints with the data position in client state, and ``--resume auto``.

Each checkpoint is a DeepSpeed tag directory ``<output_dir>/checkpoints/step_<N>``. The pointer file
``latest`` is written (atomically) only after every rank has finished writing the tag, so a run killed
mid-save resumes from the previous complete checkpoint; nothing half-written is ever pointed at.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.atomic import atomic_write

POINTER = "latest_complete"
META = "dora_checkpoint.json"
TAG_PATTERN = re.compile(r"^step_(\d+)$")
CLIENT_KEY = "dora_engine"  # our client state lives under one key: DeepSpeed reserves names like skipped_steps


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(directory: Path) -> str | None:
    """The newest complete checkpoint tag, or None."""
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    return tag if (directory / tag / META).is_file() else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves, prunes and restores the DeepSpeed engine's state plus the trainer's client state."""

    def __init__(self, directory: Path, *, keep: int, writer: bool):
        self.directory = directory
        self.keep = keep
        self.writer = writer  # the local rank 0 of each node writes pointers and prunes

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> str:
        tag = tag_for(step)
        state = {**client_state, "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={CLIENT_KEY: state}, save_latest=False)
        _barrier()
        if self.writer:
            with atomic_write(self.directory / tag / META) as handle:
                json.dump({k: v for k, v in client_state.items() if k != "config"} | {"tag": tag}, handle, indent=1)
            with atomic_write(self.directory / POINTER) as handle:
                handle.write(tag + "\n")
            self._prune(keep_tag=tag)
        _barrier()
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        complete = [t for t in tags if (self.directory / t / META).is_file()]
        stale = [t for t in complete[: max(len(complete) - self.keep, 0)] if t != keep_tag]
        stale += [t for t in tags if t not in complete and t < keep_tag]  # remains of an interrupted save
        for tag in stale:
            shutil.rmtree(self.directory / tag, ignore_errors=True)

    def load(self, engine: Any, tag: str) -> dict[str, Any]:
        """Restore module, optimizer, scheduler and RNG state; returns the client state."""
        path, client = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None or CLIENT_KEY not in (client or {}):
            raise RuntimeError(f"could not load checkpoint {self.directory / tag}")
        state = client[CLIENT_KEY]
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])
        return state


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out
