"""Resumable, shard-by-shard processing of a dataset (used by ``data augment`` and ``data score``).

The input records are cut into consecutive shards of ``shard_size``. Each finished shard is written
atomically to ``<work_dir>/shard-<i>.jsonl``; a rerun after an interruption loads the finished shards
and processes only the rest, so no prompt is lost or processed twice. ``process(shard, i)`` receives
the shard and its index; a random step that seeds itself from the records (``derived_seed``) makes a
resumed run give exactly the output of an uninterrupted one. When every shard is done, the output
file is written atomically and the work directory removed.

``<work_dir>/run.json`` holds a fingerprint of the input records and of the step's settings; a work
directory left by a different run is refused (pass ``restart=True`` to discard it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write
from dora_engine.data.schema import Record, RecordError, read_records, write_records
from dora_engine.errors import UserValueError


def default_work_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.parent / f".{output.name}.shards"


def fingerprint(records: Sequence[Record], settings: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able identity of one run: a hash of the input records plus the settings."""
    digest = hashlib.sha256()
    for rec in records:
        digest.update(json.dumps(rec.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return {"input_sha256": digest.hexdigest(), "num_records": len(records), **settings}


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts``, stable across processes and platforms."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def _prepare_work_dir(work_dir: Path, run: dict[str, Any], restart: bool) -> None:
    manifest = work_dir / "run.json"
    if restart and work_dir.exists():
        shutil.rmtree(work_dir)
    if manifest.exists():
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous != run:
            changed = sorted(k for k in set(previous) | set(run) if previous.get(k) != run.get(k))
            raise UserValueError(
                f"{work_dir} holds shards of a different run (differs in {changed}); "
                "rerun with the same input and settings to resume, or restart to discard them"
            )
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(manifest) as handle:
        json.dump(run, handle, indent=1, sort_keys=True)


def _load_shard(path: Path, expected: Sequence[Record]) -> list[Record]:
    done = read_records(path)
    if [r.id for r in done] != [r.id for r in expected]:
        raise RecordError(f"{path}: the shard's record ids do not match the input; delete the work directory")
    return done


def run_sharded(
    records: Sequence[Record],
    process: Callable[[list[Record], int], list[Record]],
    output: str | os.PathLike,
    *,
    settings: dict[str, Any],
    shard_size: int = 256,
    work_dir: str | os.PathLike | None = None,
    restart: bool = False,
    desc: str = "records",
) -> list[Record]:
    """Apply ``process`` shard by shard with resume (see the module docstring); returns all output records."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise UserValueError(f"shard_size must be >= 1, got {shard_size}")
    work = Path(work_dir) if work_dir is not None else default_work_dir(output)
    _prepare_work_dir(work, fingerprint(records, {**settings, "shard_size": shard_size}), restart)
    starts = range(0, len(records), shard_size)
    results: list[Record] = []
    with tqdm(total=len(records), desc=desc, unit="prompt") as bar:
        for index, start in enumerate(starts):
            shard = list(records[start:start + shard_size])
            path = work / f"shard-{index:06d}.jsonl"
            if path.exists():
                done = _load_shard(path, shard)
            else:
                done = process(shard, index)
                if [r.id for r in done] != [r.id for r in shard]:
                    raise RuntimeError(f"shard {index}: the step returned records out of order or incomplete")
                write_records(path, done)
            results.extend(done)
            bar.update(len(shard))
    write_records(output, results)
    shutil.rmtree(work)
    return results
