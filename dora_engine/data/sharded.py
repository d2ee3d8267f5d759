"""Resumable, shard-by-shard processing of a dataset (used by ``data augment`` and ``data score``).

The input records are cut into consecutive shards of ``shard_size``. Each finished shard is written
atomically to ``<work_dir>/shard-<i>.jsonl``; a rerun after an interruption loads the finished shards
and processes only the rest, so no prompt is lost or processed twice. ``process(shard, i)`` receives
the shard and its index; a random step that seeds itself from the records
(``dora_engine.generation.derived_seed``) makes a resumed run give exactly the output of an uninterrupted
one. When every shard is done, the output file is written atomically and the work directory removed.

``<work_dir>/run.json`` holds a fingerprint of the input records and of the step's settings; a work
directory left by a different run is refused (pass ``restart=True``, ``--restart`` on the command line,
to discard it). ``ShardedRun(...)`` makes that check and says how much an earlier run already did before
the step loads its model; ``.run(process)`` then does the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write
from dora_engine.data.schema import Record, RecordError, RecordsFile, iter_records, read_records, write_records
from dora_engine.errors import UserValueError


def default_work_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.shards"


def fingerprint(records: Iterable[Record], settings: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able identity of one run: a hash of the input records plus the settings (one pass, streamed)."""
    digest = hashlib.sha256()
    count = 0
    for rec in records:
        digest.update(json.dumps(rec.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
        count += 1
    return {"input_sha256": digest.hexdigest(), "num_records": count, **settings}


def _read_manifest(work_dir: Path) -> dict[str, Any] | None:
    manifest = work_dir / "run.json"
    return json.loads(manifest.read_text(encoding="utf-8")) if manifest.exists() else None


def _load_shard(path: Path, expected: Sequence[Record]) -> list[Record]:
    done = read_records(path)
    if [r.id for r in done] != [r.id for r in expected]:
        raise RecordError(f"{path}: the shard's record ids do not match the input; delete the work directory")
    return done


class ShardedRun:
    """One resumable run over ``records`` (see the module docstring).

    Creating it checks the work directory and reports on stderr how much an earlier, interrupted run of
    the same input and settings already did; a work directory of a different run is refused unless
    ``restart``. Nothing is written until ``run``.
    """

    def __init__(
        self,
        records: Sequence[Record] | str | os.PathLike,
        output: str | os.PathLike,
        *,
        settings: dict[str, Any],
        shard_size: int = 256,
        work_dir: str | os.PathLike | None = None,
        restart: bool = False,
        desc: str = "records",
    ) -> None:
        if shard_size < 1:
            raise UserValueError(f"shard_size must be >= 1, got {shard_size}")
        # A path is streamed: read once for the fingerprint and once while processing, never held at once.
        self.input = Path(records) if isinstance(records, str | os.PathLike) else None
        self.records = None if self.input is not None else list(records)
        self.output = output
        self.shard_size = shard_size
        self.work = Path(work_dir) if work_dir is not None else default_work_dir(output)
        self.restart = restart
        self.desc = desc
        self.fingerprint = fingerprint(self._all(), {**settings, "shard_size": shard_size})
        self.count = self.fingerprint["num_records"]
        self.num_shards = -(-self.count // shard_size)
        previous = _read_manifest(self.work)
        finished = len(self.finished_shards()) if previous is not None else 0
        if restart:
            if previous is not None:
                print(f"{desc}: --restart: discarding {finished} finished shard(s) in {self.work}", file=sys.stderr)
            return
        if previous is not None and previous != self.fingerprint:
            now = self.fingerprint
            changed = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
            raise UserValueError(
                f"{self.work} holds {finished} finished shard(s) of a different run (differs in {changed}); "
                "rerun with the same input and settings to resume, or pass --restart to discard them"
            )
        if finished:
            prompts = sum(self._shard_len(i) for i in self.finished_shards())
            print(f"{desc}: resuming: {finished} of {self.num_shards} shards ({prompts} of {self.count} "
                  f"prompts) already done in {self.work}", file=sys.stderr)

    def _all(self) -> Iterable[Record]:
        return self.records if self.input is None else iter_records(self.input)

    def _shard_len(self, index: int) -> int:
        return min(self.shard_size, self.count - index * self.shard_size)

    def shards(self) -> Iterator[list[Record]]:
        """The input cut into consecutive shards, read as they are needed."""
        shard: list[Record] = []
        for rec in self._all():
            shard.append(rec)
            if len(shard) == self.shard_size:
                yield shard
                shard = []
        if shard:
            yield shard

    def shard_path(self, index: int) -> Path:
        return self.work / f"shard-{index:06d}.jsonl"

    def finished_shards(self) -> list[int]:
        return [i for i in range(self.num_shards) if self.shard_path(i).exists()]

    def run(self, process: Callable[[list[Record], int], list[Record]]) -> Sequence[Record]:
        """Apply ``process`` to every unfinished shard; write the output and remove the work directory.
        Returns the output records (read back from the output file as they are iterated)."""
        from tqdm.auto import tqdm

        if self.restart and self.work.exists():
            shutil.rmtree(self.work)
        if _read_manifest(self.work) is None:
            self.work.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.work / "run.json") as handle:
                json.dump(self.fingerprint, handle, indent=1, sort_keys=True)
        with tqdm(total=self.count, desc=self.desc, unit="prompt") as bar:
            for index, shard in enumerate(self.shards()):
                path = self.shard_path(index)
                if path.exists():
                    _load_shard(path, shard)
                else:
                    done = process(shard, index)
                    if [r.id for r in done] != [r.id for r in shard]:
                        raise RuntimeError(f"shard {index}: the step returned records out of order or incomplete")
                    write_records(path, done)
                bar.update(len(shard))
        count = write_records(self.output, (rec for i in range(self.num_shards)
                                            for rec in iter_records(self.shard_path(i))))
        shutil.rmtree(self.work)
        return RecordsFile(self.output, count)

