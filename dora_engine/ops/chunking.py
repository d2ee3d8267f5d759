"""How the fused-linear ops cut rows of logits into chunks (docs/design.md section 5, "Fused-linear").

The fused backend chunks the rows that carry a label (``group_spans``, ``tokens_per_chunk``); the reference
backend chunks all N·T rows (``prompts_per_chunk``, ``tokens_per_chunk``): its values do not depend on them.
"""

from __future__ import annotations

#: Bytes of one chunk's logits when ``chunk_bytes`` is None, by device type (at least ``MIN_DEFAULT_ROWS`` rows).
DEFAULT_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}
#: Fewest logits rows of a default chunk: at a large vocabulary a short chunk makes short, slower GEMMs (on
#: CPU, 130-row chunks at V = 128256 made SFT's head 15 % slower than 512-row ones; benchmarks/RESULTS.md).
MIN_DEFAULT_ROWS = 512


def default_chunk_bytes(device_type: str, vocab: int, element_size: int) -> int:
    """The chunk size when ``chunk_bytes`` is None: the device's ``DEFAULT_CHUNK_BYTES`` (CUDA's for other
    devices), or ``MIN_DEFAULT_ROWS`` rows of ``vocab`` logits when that is more."""
    device_default = DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cuda"])
    return max(device_default, MIN_DEFAULT_ROWS * vocab * element_size)


def tokens_per_chunk(chunk_bytes: int, vocab: int, element_size: int) -> int:
    """Token rows of V logits that fit ``chunk_bytes`` (at least one): the recompute schedule."""
    return max(1, chunk_bytes // (vocab * element_size))


def prompts_per_chunk(chunk_bytes: int, rows_per_prompt: int, vocab: int, element_size: int) -> int:
    """Whole prompts (K·T token rows each) that fit ``chunk_bytes`` (at least one): the reference backend's
    single-pass chunks."""
    return max(1, chunk_bytes // (rows_per_prompt * vocab * element_size))


def group_spans(counts: list[int], rows_per_chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive groups (prompts with ``counts`` scored rows each) packed greedily while
    their rows fit ``rows_per_chunk``; a group is never split, so a chunk holds at least one group (and more
    rows than ``rows_per_chunk`` when that group has them): the fused single-pass schedule."""
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
