"""What a pairwise judge is given and what it answers (``dora_engine.eval.judges``, ``.http_judge``).

A judge maps comparisons (prompt, policy response, golden response) to verdicts from the policy's
point of view: ``win``, ``lose``, ``tie`` or ``error`` (the judge gave no usable answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Verdict = Literal["win", "lose", "tie", "error"]
VERDICTS: tuple[Verdict, ...] = ("win", "lose", "tie", "error")


@dataclass(frozen=True)
class Comparison:
    """One judgement to make: ``policy`` is the evaluated model's response, ``golden`` the target's."""

    id: str
    instruction: str
    policy: str
    golden: str


class Judge(Protocol):
    name: str

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]: ...
