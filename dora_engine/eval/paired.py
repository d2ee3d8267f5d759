"""Two models answering the same prompts: per-prompt paired differences with bootstrap intervals.

For each prompt i the baseline and the candidate give responses b_i and c_i, and the golden response g_i
is known. Two metrics per response (docs/design.md section 6):

    reward     r(x_i, y)                                   (the judge's reward, e.g. the synth oracle)
    win points w(y, g_i) = 1 if r(x_i, y) > r(x_i, g_i), 1/2 on a tie, else 0   (ties count half)

and their paired differences d_i = m(c_i) − m(b_i). The interval of the mean difference is the
percentile bootstrap over prompts: ``n_boot`` resamples of the n prompts with replacement (numpy
``default_rng(seed)``), the mean of d recomputed on each, and the 2.5% and 97.5% quantiles. Resampling
the *pairs* keeps what the two models share (the prompt's difficulty) out of the interval, which is what
makes it narrower than two separate intervals. ``paired_interval`` does the same for any list of
paired differences (per seed in ``benchmarks/bench_quality.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dora_engine.errors import UserValueError
from dora_engine.eval.bootstrap import bootstrap_quantiles
from dora_engine.eval.comparison import Comparison
from dora_engine.eval.generate import Generation
from dora_engine.eval.judges import RewardJudge
from dora_engine.eval.winrate import TIES_HALF_POINTS


@dataclass(frozen=True)
class Interval:
    """A mean and its percentile-bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        return f"{scale * self.mean:+.{digits}f} [{scale * self.lo:+.{digits}f}, {scale * self.hi:+.{digits}f}]"


def bootstrap_mean(values: Sequence[float], *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap interval (see the module docstring)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise UserValueError("no values to average")
    lo, hi = bootstrap_quantiles(data[:, None], n_boot=n_boot, seed=seed, confidence=confidence)
    return Interval(float(data.mean()), float(lo[0]), float(hi[0]), int(data.size))


def paired_interval(
    baseline: Sequence[float], candidate: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """The mean paired difference candidate − baseline with its bootstrap interval over the pairs."""
    if len(baseline) != len(candidate):
        raise UserValueError(f"paired values need equal lengths, got {len(baseline)} and {len(candidate)}")
    diffs = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return bootstrap_mean(diffs, n_boot=n_boot, seed=seed, confidence=confidence)


@dataclass(frozen=True)
class ModelScores:
    """Per-prompt reward and win points (against the golden response) of one model's generations."""

    name: str
    rewards: list[float]
    win_points: list[float]


def score_against_golden(name: str, comparisons: Sequence[Comparison], judge: RewardJudge) -> ModelScores:
    """Reward of each policy response and its win points against the golden one (the judge's verdict,
    ties half)."""
    rewards, golden = judge.rewards(comparisons)
    points = [TIES_HALF_POINTS[judge.verdict(r - g)] for r, g in zip(rewards, golden, strict=True)]
    return ModelScores(name, rewards, points)


def check_same_prompts(
    baseline: Sequence[Generation], candidate: Sequence[Generation], names: tuple[str, str] = ("baseline", "candidate")
) -> None:
    """Paired comparison needs the same prompts in the same order; the first mismatch is named."""
    if len(baseline) != len(candidate):
        raise UserValueError(f"{names[0]} answers {len(baseline)} prompts and {names[1]} {len(candidate)}; "
                             "a paired comparison needs the same prompts")
    for i, (b, c) in enumerate(zip(baseline, candidate, strict=True)):
        if b.id != c.id or b.instruction != c.instruction:
            raise UserValueError(f"row {i}: {names[0]} and {names[1]} answer different prompts "
                                 f"(ids {b.id!r} and {c.id!r})")


@dataclass(frozen=True)
class PairedReport:
    """Both models' mean metrics and the paired differences (candidate − baseline)."""

    baseline: str
    candidate: str
    reward: dict[str, Interval]  # baseline, candidate, difference
    win_rate: dict[str, Interval]

    def to_dict(self) -> dict[str, object]:
        return {
            "baseline": self.baseline, "candidate": self.candidate,
            "reward": {k: v.to_dict() for k, v in self.reward.items()},
            "win_rate_ties_half": {k: v.to_dict() for k, v in self.win_rate.items()},
        }


def paired_report(baseline: ModelScores, candidate: ModelScores, *, n_boot: int = 2000, seed: int = 0) -> PairedReport:
    """Means with intervals for each model and for the paired difference, for reward and win points."""

    def three(b: list[float], c: list[float]) -> dict[str, Interval]:
        return {
            "baseline": bootstrap_mean(b, n_boot=n_boot, seed=seed),
            "candidate": bootstrap_mean(c, n_boot=n_boot, seed=seed),
            "difference": paired_interval(b, c, n_boot=n_boot, seed=seed),
        }

    return PairedReport(baseline.name, candidate.name, three(baseline.rewards, candidate.rewards),
                        three(baseline.win_points, candidate.win_points))


def format_report(report: PairedReport, judge: str) -> str:
    """A markdown table: one row per metric, the two models and the difference, each with its 95% interval."""
    b, c = report.baseline, report.candidate
    rows = [
        f"| metric ({judge}, {report.reward['difference'].n} held-out prompts) | {b} | {c} | {c} − {b} |",
        "| --- | --- | --- | --- |",
    ]
    for label, intervals, scale, digits in (("mean reward", report.reward, 1.0, 3),
                                            ("win rate vs golden, ties half (%)", report.win_rate, 100.0, 1)):
        cells = [f"{scale * intervals[k].mean:.{digits}f} [{scale * intervals[k].lo:.{digits}f}, "
                 f"{scale * intervals[k].hi:.{digits}f}]" for k in ("baseline", "candidate")]
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {intervals['difference'].format(scale, digits)} |")
    return "\n".join(rows)
