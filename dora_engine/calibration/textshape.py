"""The shape of a response, read by the bag-of-words classifiers next to its n-grams (docs/design.md section 4.5).

Generators differ in how they open and close an answer ("Certainly! Here is ...", "I hope this helps") and
in how long and how formatted their answers are, more than in the words in between. Two views of that:

* ``edge_text``: the response's first and last ``EDGE_TOKENS`` tokens (lower-cased words and single
  punctuation marks), tagged ``B`` (beginning) or ``E`` (end), as one string for a word n-gram block:
  "Sure, here it is." → "Bsure B, Bhere Bit Bis B. Esure E, Ehere Eit Eis E." (A response shorter than
  ``EDGE_TOKENS`` appears whole in both halves; the bigram across the join, here "B. Esure", is a
  feature too.)
* ``shape_counts``: ``SHAPE_COUNTS`` numbers per response, each log(1 + value). The values: characters,
  words (split on white space), lines, lines whose first non-blank character is ``-``, ``*`` or ``•``
  (markdown bullets, and also lines opening with bold text), lines opening with digits and ``.`` or ``)``,
  lines whose first non-blank character is ``#``, occurrences of ``**`` and of three backticks, blank-line
  breaks (two line breaks in a row), and the mean number of words per sentence (text between ``.``, ``!``
  or ``?`` followed by white space).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

EDGE_TOKENS = 16
SHAPE_COUNTS = ("characters", "words", "lines", "bullet lines", "numbered lines", "heading lines", "bold marks",
                "code fences", "blank-line breaks", "words per sentence")

_TOKEN = re.compile(r"\w+|[^\w\s]")
_NUMBERED = re.compile(r"\s*\d+[.)]")
_SENTENCE_END = re.compile(r"[.!?]\s")


def edge_text(text: str) -> str:
    tokens = _TOKEN.findall(text.lower())
    return " ".join(["B" + t for t in tokens[:EDGE_TOKENS]] + ["E" + t for t in tokens[-EDGE_TOKENS:]])


def _counts(text: str) -> list[float]:
    lines = text.split("\n")
    stripped = [line.lstrip() for line in lines]
    sentences = [len(s.split()) for s in _SENTENCE_END.split(text) if s.strip()]
    return [len(text), len(text.split()), len(lines), sum(s.startswith(("-", "*", "•")) for s in stripped),
            sum(bool(_NUMBERED.match(line)) for line in lines), sum(s.startswith("#") for s in stripped),
            text.count("**"), text.count("```"), text.count("\n\n"), float(np.mean(sentences)) if sentences else 0.0]


def shape_counts(texts: Sequence[str]) -> np.ndarray:
    """(len(texts), len(SHAPE_COUNTS)) float64: log(1 + each count of ``SHAPE_COUNTS``)."""
    if not texts:
        return np.empty((0, len(SHAPE_COUNTS)))
    return np.log1p(np.array([_counts(t) for t in texts], dtype=np.float64))
