"""Which classifiers a calibration trains, and how each response's c and γ come out of them.

docs/design.md section 4: c_k ≈ P(golden | x, y_k) from a classifier that separates the target (golden)
source from others, and γ = #label-0 / #label-1 in that classifier's training set. Every classifier is
described by its classes (each a set of sources) and every source by a ``SourceRule``: the class of the
target, the classes it is compared with, and

    c = p[target] / (p[target] + Σ_{j ∈ against} p[j]),     γ = Σ_{j ∈ against} N_j / N_target

with p the classifier's softmax and N_j its training counts. For a binary classifier (classes
(others, target)) this is c = p[1] and γ = N_0 / N_1 as in Eq. 5.

Schemes:
- ``per_source`` (default): one binary classifier per non-target source (target vs that source) for
  that source's responses; the target's own responses are scored by the pooled target-vs-rest
  classifier. With two sources both are the same classifier (trained once).
- ``pooled``: one target-vs-rest classifier for every response.
- ``multiclass``: one classifier whose classes are the sources. With priors π_j = N_j / N, the softmax
  estimates p(j | z) ∝ π_j q_j(z), so a response of source k gets c = p_T / (p_T + p_k) and
  γ = N_k / N_T: γ c / (1 − c) = (π_k p_T) / (π_T p_k) = q_T(z) / q_k(z), the density ratio of Eq. 5,
  exactly what the per-source binary classifier estimates. A target response gets c = p_T and
  γ = (N − N_T) / N_T, the pooled classifier's ratio q_T / q_rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dora_engine.errors import UserValueError

SCHEMES = ("per_source", "pooled", "multiclass")


@dataclass(frozen=True)
class ClassifierSpec:
    """A classifier to train: ``classes[j]`` are the sources whose responses get label j."""

    name: str
    classes: tuple[tuple[str, ...], ...]

    def label_of(self, source: str) -> int | None:
        for label, members in enumerate(self.classes):
            if source in members:
                return label
        return None


@dataclass(frozen=True)
class SourceRule:
    """How responses of one source are scored: by ``classifier``, target class vs ``against`` classes."""

    classifier: str
    target_class: int
    against: tuple[int, ...]

    def probability(self, probs: np.ndarray) -> np.ndarray:
        """c = p[target] / (p[target] + Σ p[against]) for probs (N, num_classes)."""
        p_target = probs[:, self.target_class]
        return p_target / (p_target + probs[:, list(self.against)].sum(axis=1))

    def gamma(self, class_counts: list[int]) -> float:
        """γ = Σ_{against} N_j / N_target over the classifier's training counts."""
        return sum(class_counts[j] for j in self.against) / class_counts[self.target_class]


def plan(sources: list[str], target: str, scheme: str) -> tuple[list[ClassifierSpec], dict[str, SourceRule]]:
    """The classifiers of ``scheme`` and the rule for every source (the target included)."""
    if scheme not in SCHEMES:
        raise UserValueError(f"unknown calibration scheme {scheme!r}; valid: {list(SCHEMES)}")
    if target not in sources:
        raise UserValueError(f"target source {target!r} not found in the data; sources found: {sorted(sources)}")
    others = tuple(sorted(s for s in sources if s != target))
    if not others:
        raise UserValueError(f"the data has only the target source {target!r}; calibration needs at least one other")
    pooled = ClassifierSpec(f"{target}-vs-rest" if len(others) > 1 else f"{target}-vs-{others[0]}", (others, (target,)))
    pooled_rule = SourceRule(pooled.name, 1, (0,))
    if scheme == "pooled" or len(others) == 1 and scheme == "per_source":
        return [pooled], {source: pooled_rule for source in sources}
    if scheme == "per_source":
        specs = [ClassifierSpec(f"{target}-vs-{s}", ((s,), (target,))) for s in others] + [pooled]
        rules = {s: SourceRule(f"{target}-vs-{s}", 1, (0,)) for s in others}
        return specs, {**rules, target: pooled_rule}
    multi = ClassifierSpec("multiclass", tuple((s,) for s in others) + ((target,),))
    target_class = len(others)
    rules = {s: SourceRule(multi.name, target_class, (j,)) for j, s in enumerate(others)}
    rules[target] = SourceRule(multi.name, target_class, tuple(range(len(others))))
    return [multi], rules
