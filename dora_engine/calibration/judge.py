"""Agreement of c with a judge: the rank correlation between c and AlpacaEval-style preference annotations.

An annotation file (``--judge-file``; JSONL or a JSON list, gzipped or not) has rows with ``instruction``,
``output_1``, ``output_2`` and ``preference`` in [1, 2] (1: output_1 is better, 2: output_2 is better), as
AlpacaEval's annotators write them. Each output that is a response of the scored dataset (the same
instruction and output text, up to surrounding white space) gets the judge's preference for it:
``preference − 1`` for output_2, ``2 − preference`` for output_1. Per source, the Spearman rank correlation
between those preferences and the responses' c says whether, among one source's responses, the ones the
judge prefers are also the ones the classifier finds more like the target.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import numpy as np

from dora_engine.data.schema import Record, RecordError
from dora_engine.errors import UserValueError

MIN_PAIRS = 3


def _key(prompt: str, response: str) -> tuple[str, str]:
    return prompt.strip(), response.strip()


def _preference(row: Any, index: int, path: str) -> float:
    value = row.get("preference") if isinstance(row, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 1.0 - 1e-6 <= value <= 2.0 + 1e-6:
        raise RecordError(f"{path}: row {index}: field 'preference' must be a number in [1, 2], got {value!r}")
    return min(max(float(value), 1.0), 2.0)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's ρ (ties get their average rank); ``None`` when either side is constant or n < 3."""
    from scipy.stats import rankdata

    if len(x) < MIN_PAIRS:
        return None
    rx, ry = rankdata(x), rankdata(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def strength(rho: float | None) -> str:
    if rho is None:
        return "undefined"
    size = abs(rho)
    word = "no" if size < 0.1 else "weak" if size < 0.3 else "moderate" if size < 0.5 else "strong"
    return word if word == "no" else f"{word} {'positive' if rho > 0 else 'negative'}"


def judge_correlation(scored: list[Record], path: str | os.PathLike) -> dict[str, Any]:
    """Per source of ``scored`` (records with ``meta["calibration_c"]``): the annotations matched, the mean
    judge preference and Spearman's ρ between c and that preference. An error when nothing matches."""
    from dora_engine.calibration.pipeline import PROBS_META_KEY
    from dora_engine.data.converters import read_rows

    path = os.fspath(path)
    responses: dict[tuple[str, str], tuple[str, float]] = {}
    for record in scored:
        prompt = record.prompt_text()
        for response, c in zip(record.responses, record.meta[PROBS_META_KEY], strict=True):
            responses[_key(prompt, response.text)] = (response.source, float(c))
    rows = read_rows(path)
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("instruction", "output_1",
                                                                                       "output_2")):
            raise RecordError(f"{path}: row {index} needs string fields 'instruction', 'output_1' and 'output_2'")
        preference = _preference(row, index, path)
        for output, liked in (("output_2", preference - 1.0), ("output_1", 2.0 - preference)):
            hit = responses.get(_key(row["instruction"], row[output]))
            if hit is not None:
                pairs[hit[0]].append((hit[1], liked))
    if not pairs:
        raise UserValueError(
            f"--judge-file {path}: none of its {len(rows)} annotations names a response of the dataset (matched "
            "by instruction and output text); pass the annotations of the responses being calibrated"
        )
    sources = {}
    for source, values in sorted(pairs.items()):
        c, liked = np.array(values).T
        rho = spearman(c, liked)
        sources[source] = {"n": len(values), "mean_preference": float(liked.mean()), "spearman": rho,
                           "agreement": strength(rho)}
    return {"file": path, "annotations": len(rows), "sources": sources}


def judge_sentence(judge: dict[str, Any]) -> str:
    """What the correlations mean, in one paragraph."""
    parts = [f"{source} ρ = {'–' if s['spearman'] is None else format(s['spearman'], '.3f')} "
             f"(n = {s['n']}, {s['agreement']})" for source, s in judge["sources"].items()]
    return (
        f"Judge agreement ({judge['file']}): Spearman ρ between c and the judge's preference for each response, "
        f"within each source: {'; '.join(parts)}. ρ > 0 means that among one source's responses those the judge "
        "prefers look more like the target to the classifier, so h̃ also leans towards better responses; ρ near 0 "
        "means c tells the sources apart without following the judge's quality ranking within a source."
    )
