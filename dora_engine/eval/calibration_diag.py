"""The paper's reward–confidence diagnostic (``dora-engine eval calibration``).

For each model (e.g. the DoRA policy and an ERM baseline), every generated response y to a prompt x
gets a classifier confidence c(x, y) ≈ P(golden | x, y) and a reward r(x, y). A model whose responses
look more like the golden distribution *and* earn more reward for it shows a positive slope of reward
on confidence.

Rewards are normalised over the responses of all models pooled, so that every model shares one axis:

    minmax: r̂ = (r − min r) / (max r − min r)        zscore: r̂ = (r − mean r) / std r

(all-equal rewards give r̂ = 0). Per model, the ordinary least-squares line r̂ ≈ a + b·c has

    b = Σ(c − c̄)(r̂ − r̄) / Σ(c − c̄)²,   a = r̄ − b·c̄,   r = Σ(c − c̄)(r̂ − r̄) / sqrt(Σ(c − c̄)² Σ(r̂ − r̄)²)

(b and r are NaN when every c is equal). One PNG shows every model's scatter and line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dora_engine.atomic import atomic_path
from dora_engine.data.schema import RecordError, iter_jsonl
from dora_engine.errors import UserValueError

if TYPE_CHECKING:
    from dora_engine.calibration.pipeline import Calibration

NORMALISATIONS = ("minmax", "zscore", "none")


@dataclass(frozen=True)
class LinearFit:
    slope: float
    intercept: float
    r: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class ScoredResponses:
    """One model's responses: prompts and texts, with confidence c and raw reward r once known."""

    model: str
    instructions: list[str]
    outputs: list[str]
    confidence: list[float | None]
    reward: list[float | None]


def ols_fit(x: Sequence[float], y: Sequence[float]) -> LinearFit:
    """The least-squares line y ≈ intercept + slope·x and Pearson's r (see the module docstring)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size < 2:
        raise ValueError(f"ols_fit needs two 1-D arrays of equal length >= 2, got shapes {xs.shape} and {ys.shape}")
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    slope = sxy / sxx if sxx > 0 else math.nan
    intercept = float(ys.mean() - slope * xs.mean()) if sxx > 0 else float(ys.mean())
    r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
    return LinearFit(slope, intercept, r, int(xs.size))


def normalise_rewards(rewards: Sequence[float], method: str = "minmax") -> np.ndarray:
    """Rewards normalised by ``method`` (minmax, zscore or none) over the whole given pool."""
    if method not in NORMALISATIONS:
        raise UserValueError(f"unknown normalisation {method!r}; valid: {', '.join(NORMALISATIONS)}")
    r = np.asarray(rewards, dtype=np.float64)
    if method == "none":
        return r
    if method == "minmax":
        spread = r.max() - r.min()
        return (r - r.min()) / spread if spread > 0 else np.zeros_like(r)
    std = r.std()
    return (r - r.mean()) / std if std > 0 else np.zeros_like(r)


def diagnose(
    groups: Sequence[ScoredResponses], method: str = "minmax"
) -> tuple[dict[str, np.ndarray], dict[str, LinearFit]]:
    """Normalised rewards per model (pooled normalisation) and each model's OLS fit of r̂ on c."""
    for g in groups:
        for field in ("confidence", "reward"):
            missing = [i for i, v in enumerate(getattr(g, field)) if v is None]
            if missing:
                raise RecordError(f"model {g.model!r}: response {missing[0]} has no {field}")
    pooled = normalise_rewards([v for g in groups for v in g.reward], method)
    normalised, fits, start = {}, {}, 0
    for g in groups:
        normalised[g.model] = pooled[start:start + len(g.reward)]
        start += len(g.reward)
        fits[g.model] = ols_fit(g.confidence, normalised[g.model])
    return normalised, fits


def plot_diagnostic(
    groups: Sequence[ScoredResponses], normalised: dict[str, np.ndarray], fits: dict[str, LinearFit],
    path: str | os.PathLike, method: str = "minmax",
) -> None:
    """Every model's (c, r̂) scatter and fitted line on one figure, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    grid = np.linspace(0.0, 1.0, 50)
    for i, g in enumerate(groups):
        colour = f"C{i}"
        fit = fits[g.model]
        ax.scatter(g.confidence, normalised[g.model], s=10, alpha=0.4, color=colour)
        ax.plot(grid, fit.intercept + fit.slope * grid, color=colour,
                label=f"{g.model}: slope {fit.slope:.3f}, r {fit.r:.2f} (n={fit.n})")
    ax.set_xlabel("classifier confidence c = P(golden | x, y)")
    ax.set_ylabel(f"reward ({method}-normalised)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("Reward vs. confidence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def load_scored(path: str | os.PathLike, model: str) -> ScoredResponses:
    """Rows with string ``instruction`` and ``output``, and optional numeric ``confidence`` and ``reward``."""
    group = ScoredResponses(model, [], [], [], [])
    for i, row in iter_jsonl(path):
        where = f"{path}: line {i + 1}"
        if not isinstance(row, dict):
            raise RecordError(f"{where}: expected an object")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise RecordError(f"{where}: field {key!r} must be a string, got {row.get(key)!r}")
        group.instructions.append(row["instruction"])
        group.outputs.append(row["output"])
        for key in ("confidence", "reward"):
            value = row.get(key)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
                raise RecordError(f"{where}: field {key!r} must be a finite number, got {value!r}")
            if key == "confidence" and value is not None and not 0 <= value <= 1:
                raise RecordError(f"{where}: field 'confidence' must lie in [0, 1], got {value!r}")
            getattr(group, key).append(None if value is None else float(value))
    if len(group.outputs) < 2:
        raise RecordError(f"{path}: model {model!r} needs at least 2 responses for a fit, got {len(group.outputs)}")
    return group


DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class ConfidenceClassifier:
    """Where c = P(golden | x, y) comes from: a calibration folder (its target's classifier, every fold's
    copy, their log-odds averaged: the c that ``calibrate --apply`` gives a new prompt) or one binary
    classifier folder (c = p[1]), with the input length."""

    path: str
    max_length: int
    name: str | None = None
    calibration: Calibration | None = None


def resolve_classifier(path: str | os.PathLike, max_length: int | None = None) -> ConfidenceClassifier:
    """The classifier ``--classifier`` names: a calibration folder (``dora-engine calibrate``'s output, with
    ``calibration.json``), whose classifier of the target source is used with the calibration's input
    length; or one classifier folder (a binary classifier, class 1 = golden; a folder with ``config.json``
    or a hub id). A local folder that is neither is refused, saying what to pass."""
    from dora_engine.calibration.pipeline import CALIBRATION_FILE, load_calibration

    folder = Path(path)
    if (folder / CALIBRATION_FILE).is_file() or (folder.name == CALIBRATION_FILE and folder.is_file()):
        calibration = load_calibration(folder)
        if max_length is not None:
            calibration = replace(calibration, settings=replace(calibration.settings, max_length=max_length))
        rule = calibration.rules[calibration.target]
        return ConfidenceClassifier(os.fspath(path), calibration.settings.max_length, rule.classifier, calibration)
    if folder.exists() and not (folder / "config.json").is_file():
        raise UserValueError(
            f"--classifier {os.fspath(path)} is neither a calibration folder (with {CALIBRATION_FILE}) nor a "
            "classifier folder (with config.json): pass the folder `dora-engine calibrate` wrote (its "
            "--output-dir; by default <out name>-calibration beside --out), or one binary classifier folder"
        )
    return ConfidenceClassifier(os.fspath(path), max_length or DEFAULT_MAX_LENGTH)


def classifier_confidence(
    classifier: str | os.PathLike | ConfidenceClassifier, group: ScoredResponses, *, max_length: int | None = None,
    batch_size: int = 16, device: str = "auto", trust_remote_code: bool = False,
) -> list[float]:
    """P(golden | x, y) of every response of ``group`` from ``classifier`` (see ``resolve_classifier``);
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    from dora_engine.calibration.classifier import Example, predict
    from dora_engine.calibration.pipeline import source_probability

    if not isinstance(classifier, ConfidenceClassifier):
        classifier = resolve_classifier(classifier, max_length)
    examples = [Example(p, r) for p, r in zip(group.instructions, group.outputs, strict=True)]
    if classifier.calibration is not None:
        target = classifier.calibration.target
        return source_probability(classifier.calibration, target, examples, batch_size=batch_size,
                                  device=device, trust_remote_code=trust_remote_code).tolist()
    probs = predict(classifier.path, examples, max_length=classifier.max_length, batch_size=batch_size,
                    device=device, description=f"confidence {group.model}", trust_remote_code=trust_remote_code)
    if probs.shape[1] != 2:
        raise UserValueError(
            f"classifier {classifier.path} has {probs.shape[1]} classes; the diagnostic needs a binary one, "
            "or pass the calibration folder it belongs to"
        )
    return probs[:, 1].tolist()
