"""Atomic file writes: nothing a user wrote is ever left half-written (docs/design.md section 7.4).

Permissions. A new file gets what ``open`` would give it (0o666 less the umask), a new folder 0o777 less
the umask. A destination that is a regular file keeps its permission bits, never its setuid, setgid or
sticky bit. A destination that is a symbolic link is never followed: the new file replaces the link itself
(the link's target is untouched) and gets a new file's mode.

Every temporary name made here (and by the training export) has the form ``.<name>.<8 random
characters>.tmp[<suffix>]`` beside its destination, so that ``remove_stale_temporaries`` can find the
remains of a write that was killed before its rename, and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it before Python 3.13; done once, at import, not per write
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _new_file_mode(path: Path) -> int:
    """The permissions ``path`` gets (module docstring): the permission bits of the regular file it is,
    else (missing, a link, anything else) what ``open`` would give a new file, 0o666 less the process's
    umask at import. ``mkstemp``'s own 0o600 would hide a user's file from their group."""
    with contextlib.suppress(FileNotFoundError):
        status = path.lstat()
        if stat.S_ISREG(status.st_mode):
            return stat.S_IMODE(status.st_mode) & 0o777
    return 0o666 & ~_UMASK


def give_default_modes(tree: str | os.PathLike) -> None:
    """Give ``tree`` and everything below it a new folder's or file's mode (module docstring), before a
    folder made with ``temporary_dir`` is renamed into place: ``mkdtemp`` makes 0o700 and some writers
    (safetensors) 0o600. Links are not followed."""
    tree = Path(tree)
    for folder, _subfolders, files in os.walk(tree):
        os.chmod(folder, 0o777 & ~_UMASK)
        for name in files:
            entry = Path(folder, name)
            if not entry.is_symlink():
                os.chmod(entry, 0o666 & ~_UMASK)


def temporary_dir(destination: str | os.PathLike) -> Path:
    """A new empty folder beside ``destination`` under a temporary name (module docstring), to be filled,
    passed to ``give_default_modes`` and renamed over ``destination``."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``.

    On any exception the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _new_file_mode(path))
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that take a file name (torch.save, savefig).

    The temporary path is renamed over ``path`` when the block succeeds and removed when it fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _new_file_mode(path))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


TEMPORARY_NAME = re.compile(r"^\..+\.(?:[a-z0-9_]{8}|old-\d+)\.tmp(?:\.[^/]*)?$")
"""Names of the temporaries of ``atomic_write``, ``atomic_path`` and the training export (module docstring)."""


def remove_stale_temporaries(directory: str | os.PathLike, *, older_than_s: float = 0.0) -> list[Path]:
    """Remove the temporaries of killed writes (``TEMPORARY_NAME``) directly inside ``directory``.

    Only names of our own making are touched. ``older_than_s`` spares files modified more recently, for
    a folder that another process may be writing to at the same time (a shared cache). Returns what was
    removed; a missing folder removes nothing.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        if not TEMPORARY_NAME.match(entry.name):
            continue
        try:
            if older_than_s and now - entry.lstat().st_mtime < older_than_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        removed.append(entry)
    return removed
