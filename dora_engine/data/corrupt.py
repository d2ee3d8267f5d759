"""Label noise for robustness experiments: permute the scores of a random subset of prompts.

Each record is corrupted independently with probability ``rate``. A corrupted record gets a uniformly
random *non-identity* permutation of its scores: for K = 2 that is the swap of the pairwise labels, for
K > 2 a listwise shuffle. ``meta["corrupted"]`` says which records were hit.

The random stream of a record is seeded by ``(seed, record id)``, so the outcome of a record does not
depend on its position in the file or on the other records: the same seed gives the same output, and a
subset of a dataset is corrupted exactly as it would be inside the whole.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from dora_engine.data.schema import Record, RecordError, Response
from dora_engine.errors import UserValueError


def _record_rng(seed: int, record_id: str) -> random.Random:
    # Seeding with a string hashes it with SHA-512: stable across processes (unlike hash()).
    return random.Random(f"{seed}:{record_id}")


def _non_identity_permutation(rng: random.Random, k: int) -> list[int]:
    identity = list(range(k))
    while True:
        perm = identity[:]
        rng.shuffle(perm)
        if perm != identity:
            return perm


def corrupt_record(record: Record, rate: float, seed: int, index: int | None = None) -> Record:
    """Return ``record`` with its scores permuted with probability ``rate`` (a new object; input untouched)."""
    if not record.has_scores:
        missing = next(k for k, r in enumerate(record.responses) if r.score is None)
        where = f"record {index} (id={record.id!r})" if index is not None else f"record id={record.id!r}"
        raise RecordError(f"{where}: field 'responses[{missing}].score' is missing; run `data score` first")
    rng = _record_rng(seed, record.id)
    hit = rng.random() < rate
    scores = [r.score for r in record.responses]
    if hit:
        perm = _non_identity_permutation(rng, len(scores))
        scores = [scores[j] for j in perm]
    responses = [Response(r.text, r.source, s) for r, s in zip(record.responses, scores, strict=True)]
    meta = dict(record.meta)
    meta["corrupted"] = bool(hit or meta.get("corrupted", False))
    return Record(record.id, record.prompt, responses, record.h_tilde, meta)


def corrupt_records(records: Iterable[Record], rate: float, seed: int = 0) -> list[Record]:
    """Corrupt each record with probability ``rate`` in [0, 1] (see the module docstring)."""
    if not 0.0 <= rate <= 1.0:
        raise UserValueError(f"rate must lie in [0, 1], got {rate}")
    return [corrupt_record(rec, rate, seed, index=i) for i, rec in enumerate(records)]
