"""DeepSpeed's shared-memory all-reduce buffers (docs/design.md section 7.7).

On CPU, with every rank on one machine, DeepSpeed's ``deepspeed_shm_comm`` op gives each rank a
buffer of about 69 MB in ``/dev/shm``, named ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
which every other rank maps, and never unlinks. A run removes the name of its own buffer as soon as every
rank has mapped all of them (``release_own_buffer``): the memory stays mapped for the run and the kernel
frees it when the last rank exits, however it exits. Buffers of older runs whose ranks are all gone
(``stale_buffers``: mapped by no process, older than ``STALE_AGE_S``) are removed when a run starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

SHARED_MEMORY = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"
STALE_AGE_S = 60.0  # younger buffers may belong to ranks still starting (created, not yet mapped)


def buffer_name(rank: int, environ: Mapping[str, str] | None = None) -> str:
    """The name of rank ``rank``'s buffer in a run rendezvousing at ``MASTER_ADDR``:``MASTER_PORT`` (of
    ``environ``, else ``os.environ``)."""
    environ = os.environ if environ is None else environ
    return f"{PREFIX}_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_{environ.get('MASTER_PORT', '')}_{rank}"


def release_own_buffer(rank: int, root: Path = SHARED_MEMORY) -> None:
    """Unlink this rank's buffer name; call it once every rank has mapped every buffer (after a barrier
    that follows the process group's start)."""
    (root / buffer_name(rank)).unlink(missing_ok=True)


def _mapped_names(proc: Path = Path("/proc")) -> set[str]:
    names = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        names.update(line.rsplit("/", 1)[-1] for line in text.splitlines() if "/dev/shm/" in line)
    return names


def stale_buffers(root: Path = SHARED_MEMORY, now: float | None = None) -> list[Path]:
    """This user's buffers that no process maps and that are older than ``STALE_AGE_S``."""
    now = time.time() if now is None else now
    candidates = []
    for path in root.glob(f"{PREFIX}_{os.getuid()}_*"):
        try:
            if now - path.stat().st_mtime >= STALE_AGE_S:
                candidates.append(path)
        except OSError:
            continue
    if not candidates:
        return []
    mapped = _mapped_names()
    return [p for p in candidates if p.name not in mapped]


def remove_stale_buffers(root: Path = SHARED_MEMORY) -> str | None:
    """Remove ``stale_buffers``; the line saying what was removed, None when nothing was."""
    removed, size = [], 0
    for path in stale_buffers(root):
        try:
            size += path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    if not removed:
        return None
    return (f"removed {len(removed)} shared-memory buffer(s) of DeepSpeed ({size / 2**20:.0f} MB) in {root} "
            "left by runs that were killed")
