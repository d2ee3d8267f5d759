"""One run per ``output_dir`` (docs/design.md section 7.7).

A run holds an advisory lock (``flock``) on ``<output_dir>/.dora_engine.lock`` from its start to its end;
the file says who holds it (host and pid). The kernel releases the lock when its holder dies, however it
dies, so a lock never outlives its run. A second run on the same folder is refused at once, naming the
holder. ``dora-engine train --num-procs N`` holds it in the front process and tells its ranks so through
``HOLDER_ENV`` (the front's pid); otherwise rank 0 holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from dora_engine.errors import TrainingError

LOCK_NAME = ".dora_engine.lock"
HOLDER_ENV = "DORA_ENGINE_OUTPUT_LOCK_HOLDER"


class OutputDirInUse(TrainingError):
    """Another live run holds the output folder's lock."""


def held_by_ancestor(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``HOLDER_ENV`` (in ``environ``, else ``os.environ``) names a process this one descends from
    (the front of its launch)."""
    import psutil

    environ = os.environ if environ is None else environ
    try:
        holder = int(environ.get(HOLDER_ENV, ""))
    except ValueError:
        return False
    try:
        return any(parent.pid == holder for parent in psutil.Process().parents())
    except psutil.Error:
        return False


def _open_locked(path: Path) -> IO[str] | None:
    """The lock file opened and locked, or None when another process holds it. A file that was removed
    between our open and our lock (its last holder cleaning up) is opened again."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except BaseException:
            handle.close()
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()


def _holder(path: Path) -> str:
    try:
        host, _, pid = path.read_text().strip().partition(" ")
    except OSError:
        return "another run"
    return f"pid {pid} on {host}" if pid else "another run"


@contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``output_dir``'s run lock inside the block, or raise ``OutputDirInUse`` naming the holder.

    The folder is created for the lock; if the block leaves it holding nothing but the lock file (a run
    refused for bad input), both are removed again. Where the file system has no ``flock`` (some network
    mounts), the block runs unlocked."""
    folder = Path(output_dir)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        handle = _open_locked(path)
    except OSError:  # no flock here: run unlocked rather than not at all
        yield
        return
    if handle is None:
        raise OutputDirInUse(
            f"output_dir {folder} is in use by {_holder(path)} (lock {path}); wait for that run to end or "
            "stop it, or choose another output_dir"
        )
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{platform.node()} {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # something arrived meanwhile: keep it
                folder.rmdir()
        handle.close()
