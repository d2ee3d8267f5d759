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


def mean_h_tilde_by_target(records: Sequence[Record], target_source: str) -> dict[str, tuple[float, int]]:
    """Mean h̃ (and count) of the records with a ``target_source`` response and of those without one; a
    weight that tracks the target distribution is higher on the first. Records without h̃ are left out."""
    groups: dict[str, list[float]] = {"with_target": [], "without_target": []}
    for rec in records:
        if rec.h_tilde is not None:
            has = any(r.source == target_source for r in rec.responses)
            groups["with_target" if has else "without_target"].append(rec.h_tilde)
    return {k: (sum(v) / len(v) if v else float("nan"), len(v)) for k, v in groups.items()}
