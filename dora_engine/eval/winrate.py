"""Win / lose / tie rates of a model's responses against the golden responses, with bootstrap intervals.

Over the n comparisons the judge answered (``error`` verdicts are counted and reported but left out):

    win_rate = #win / n,   lose_rate = #lose / n,   tie_rate = #tie / n,
    win_rate_ties_half = (#win + #tie / 2) / n      (the AlpacaEval convention)

The 95% interval of each rate is the percentile bootstrap: ``n_boot`` resamples of the n verdicts with
replacement (numpy ``default_rng(seed)``), the rate recomputed on each, and the 2.5% and 97.5% quantiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dora_engine.data.schema import Record, RecordError
from dora_engine.eval.bootstrap import bootstrap_quantiles
from dora_engine.eval.comparison import VERDICTS, Comparison, Verdict
from dora_engine.eval.generate import Generation

RATES = ("win_rate", "lose_rate", "tie_rate", "win_rate_ties_half")
# Points each verdict earns towards each rate (win, lose, tie), in the order of RATES.
_POINTS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.5]])
TIES_HALF_POINTS: dict[str, float] = dict(zip(("win", "lose", "tie"), _POINTS[3].tolist(), strict=True))
"""Points of each verdict towards ``win_rate_ties_half``."""


@dataclass(frozen=True)
class WinRateSummary:
    judged: int
    wins: int
    losses: int
    ties: int
    errors: int
    win_rate: float
    lose_rate: float
    tie_rate: float
    win_rate_ties_half: float
    ci: dict[str, tuple[float, float]]
    confidence: float
    n_boot: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = {k: list(v) for k, v in self.ci.items()}
        return out


def summarise(
    verdicts: Sequence[Verdict], *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> WinRateSummary:
    """Rates and percentile-bootstrap intervals of ``verdicts`` (see the module docstring)."""
    unknown = sorted({v for v in verdicts} - set(VERDICTS))
    if unknown:
        raise ValueError(f"unknown verdict(s) {unknown}; valid verdicts: {', '.join(VERDICTS)}")
    codes = np.array([("win", "lose", "tie").index(v) for v in verdicts if v != "error"], dtype=np.int64)
    counts = np.bincount(codes, minlength=3)
    judged = int(codes.size)
    if judged == 0:
        nan = float("nan")
        point = dict.fromkeys(RATES, nan)
        ci = {k: (nan, nan) for k in RATES}
    else:
        point = dict(zip(RATES, (_POINTS @ counts / judged).tolist(), strict=True))
        lo, hi = bootstrap_quantiles(_POINTS.T[codes], n_boot=n_boot, seed=seed, confidence=confidence)
        ci = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(RATES)}
    return WinRateSummary(
        judged=judged, wins=int(counts[0]), losses=int(counts[1]), ties=int(counts[2]),
        errors=sum(v == "error" for v in verdicts), ci=ci, confidence=confidence, n_boot=n_boot, seed=seed,
        **point,
    )


def golden_response(record: Record, target_source: str) -> str:
    """The record's first response from ``target_source``; a clear error when it has none."""
    for response in record.responses:
        if response.source == target_source:
            return response.text
    sources = sorted({r.source for r in record.responses})
    raise RecordError(f"record id={record.id!r}: no response from target source {target_source!r} (has {sources})")


def pair_with_golden(
    generations: Sequence[Generation], records: Sequence[Record], target_source: str
) -> list[Comparison]:
    """Join generations to records by id and prompt text, else by prompt text alone (AlpacaEval files), else by id."""
    by_id = {r.id: r for r in records}
    by_text = {r.prompt_text(): r for r in records}
    comparisons = []
    for g in generations:
        candidate = by_id.get(g.id)
        same_prompt = candidate is not None and candidate.prompt_text() == g.instruction
        record = candidate if same_prompt else by_text.get(g.instruction, candidate)
        if record is None:
            raise RecordError(f"generation id={g.id!r}: no record with this id or prompt text in the golden data")
        comparisons.append(Comparison(g.id, record.prompt_text(), g.output, golden_response(record, target_source)))
    return comparisons


def format_summary(summary: WinRateSummary, judge: str) -> str:
    """A short human-readable report."""
    pct = int(round(summary.confidence * 100))
    lines = [
        f"judge {judge}: {summary.judged} judged, {summary.errors} errors "
        f"(win {summary.wins} / lose {summary.losses} / tie {summary.ties})"
    ]
    for key in RATES:
        lo, hi = summary.ci[key]
        lines.append(f"  {key:<19} {100 * getattr(summary, key):6.2f}%  [{pct}% CI {100 * lo:6.2f}, {100 * hi:6.2f}]")
    return "\n".join(lines)
