"""How the fused-linear ops cut N·T rows of logits into chunks (docs/design.md section 5, "Fused-linear").

Both backends chunk the same way, so that ``chunk_bytes`` means one thing whichever computes.
"""

from __future__ import annotations

#: Bytes of one chunk's logits when ``chunk_bytes`` is None, by device type.
DEFAULT_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}


def tokens_per_chunk(chunk_bytes: int, vocab: int, element_size: int) -> int:
    """Token rows of V logits that fit ``chunk_bytes`` (at least one): the recompute schedule."""
    return max(1, chunk_bytes // (vocab * element_size))


def prompts_per_chunk(chunk_bytes: int, rows_per_prompt: int, vocab: int, element_size: int) -> int:
    """Whole prompts (K·T token rows each) that fit ``chunk_bytes`` (at least one): the single-pass schedule."""
    return max(1, chunk_bytes // (rows_per_prompt * vocab * element_size))


def group_spans(counts: list[int], rows_per_chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive groups (prompts with ``counts`` scored rows each) packed greedily into
    chunks of at most ``rows_per_chunk`` rows, a group never split and a chunk at least one group: the
    single-pass schedule."""
    chunks, start, rows = [], 0, 0
    for i, count in enumerate(counts):
        if i > start and rows + count > rows_per_chunk:
            chunks.append((start, i))
            start, rows = i, 0
        rows += count
    if counts:
        chunks.append((start, len(counts)))
    return chunks


def spans(total: int, per_chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive chunks of ``per_chunk`` items covering ``total``."""
    return [(start, min(start + per_chunk, total)) for start in range(0, total, per_chunk)]
