"""What the front of a ``--num-procs`` run knows about its ranks (docs/design.md section 7.7).

The front creates a folder and names it to the ranks in ``STATE_ENV``; each rank writes
``rank-<R>.json`` there when it starts (rank, local rank, pid) and again when it exits on its own (with
its exit code). A rank whose process is gone without an exit record was killed by a signal. The front
watches the records while the run goes on (``RankWatch``), so that when a launch fails it can name the
rank that died first and how, rather than the ranks that failed after it (``Connection reset by peer``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dora_engine.atomic import atomic_write

STATE_ENV = "DORA_ENGINE_RUN_STATE"


@dataclass(frozen=True)
class RankRecord:
    rank: int
    local_rank: int
    pid: int
    exit_code: int | None = None
    exited_at: float | None = None  # time.time() of the exit record


def _record_path(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank}.json"


def _write(record: RankRecord, environ: Mapping[str, str]) -> None:
    folder = environ.get(STATE_ENV)
    if not folder or not Path(folder).is_dir():
        return
    with atomic_write(_record_path(Path(folder), record.rank)) as handle:
        json.dump(record.__dict__, handle)


def record_start(environ: Mapping[str, str] | None = None) -> RankRecord:
    """Record this rank (``RANK``, ``LOCAL_RANK`` of the launcher's environment; ``os.environ`` when None)
    as started."""
    environ = os.environ if environ is None else environ
    record = RankRecord(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)), os.getpid())
    _write(record, environ)
    return record


def record_exit(record: RankRecord, code: int, environ: Mapping[str, str] | None = None) -> None:
    """Record that this rank is exiting on its own with ``code`` (``environ``: as for ``record_start``)."""
    environ = os.environ if environ is None else environ
    _write(RankRecord(record.rank, record.local_rank, record.pid, code, time.time()), environ)


def read_records(folder: Path) -> dict[int, RankRecord]:
    """The records in ``folder`` by rank (a record being replaced is read on the next call)."""
    records = {}
    for path in folder.glob("rank-*.json"):
        try:
            record = RankRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        records[record.rank] = record
    return records


def zombie_signal(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The signal that ended ``pid`` while it waits to be reaped (a zombie), read from the exit status
    in ``/proc/<pid>/stat`` (Linux ≥ 3.5); None when it is not a zombie killed by a signal."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 50 or fields[0] != "Z":
        return None
    status = int(fields[49])
    return status & 0x7F or None


@dataclass
class Death:
    """A rank that ended without recording an exit: killed by ``signum`` (None: a signal not seen)."""

    record: RankRecord
    signum: int | None
    noticed_at: float = field(default_factory=time.time)  # when the front saw the rank gone

    def describe(self) -> str:
        how = "was killed by a signal"
        if self.signum:
            try:
                how = f"was killed by {signal.Signals(self.signum).name}"
            except ValueError:
                how = f"was killed by signal {self.signum}"
        return f"rank {self.record.rank} (local rank {self.record.local_rank}, pid {self.record.pid}) {how}"


class RankWatch:
    """The front's view of its ranks: call ``poll()`` often; ``deaths`` lists the ranks that ended without
    an exit record, first death first."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.deaths: list[Death] = []
        self.started: dict[int, RankRecord] = {}
        self._signals: dict[int, int] = {}

    def poll(self) -> None:
        import psutil

        dead = {d.record.rank for d in self.deaths}
        for rank, record in read_records(self.folder).items():
            self.started[rank] = record
            if record.exit_code is not None or rank in dead:
                continue
            signum = zombie_signal(record.pid)
            if signum:
                self._signals[rank] = signum
            try:
                running = psutil.Process(record.pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                running = False
            if not running and record.exit_code is None:
                self._settle(rank)

    def _settle(self, rank: int) -> None:
        """Re-read ``rank``'s record (it may have been written just before the process ended) and note a death."""
        record = read_records(self.folder).get(rank, self.started[rank])
        if record.exit_code is None:
            self.deaths.append(Death(record, self._signals.get(rank)))

    def unfinished(self) -> list[RankRecord]:
        """Started ranks with neither an exit record nor a noted death."""
        dead = {d.record.rank for d in self.deaths}
        return [r for rank, r in sorted(self.started.items()) if r.exit_code is None and rank not in dead]
