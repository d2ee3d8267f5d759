"""A short human-readable summary of a dataset: record count, K distribution, sources, scoring state."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from dora_engine.data.schema import Record


def summarize(records: Sequence[Record]) -> str:
    """Lines like ``records: 805``, ``K: 2 x 805``, ``sources: chosen 805, rejected 805``, ``scored: 805/805``."""
    ks = Counter(rec.num_responses for rec in records)
    sources = Counter(r.source for rec in records for r in rec.responses)
    scored = sum(rec.has_scores for rec in records)
    with_h = sum(rec.h_tilde is not None for rec in records)
    corrupted = sum(bool(rec.meta.get("corrupted")) for rec in records)
    lines = [
        f"records: {len(records)}",
        "K: " + ", ".join(f"{k} x {n}" for k, n in sorted(ks.items())),
        "sources: " + ", ".join(f"{s} {n}" for s, n in sources.most_common()),
        f"scored: {scored}/{len(records)}",
    ]
    if with_h:
        lines.append(f"h_tilde: {with_h}/{len(records)}")
    if corrupted:
        lines.append(f"corrupted: {corrupted}/{len(records)}")
    return "\n".join(lines)
