"""The c of ``h_scale="dataset"`` for the trainer integrations (docs/design.md sections 4.3 and 9): the mean
of the training dataset's h̃ column, taken once when the trainer is built."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from dora_engine.losses import STRATEGIES, ResolvedObjective, RobustObjective


def dataset_h_mean(dataset: Any, column: str) -> float:
    """Mean of the h̃ ``column`` over every example of ``dataset`` (a ``datasets.Dataset`` or a sequence of
    example mappings). ValueError when the dataset, the column or a value is missing."""
    why = "h_scale 'dataset' divides h̃ by its mean over the training dataset"
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if column not in names:
            raise ValueError(f"{why}, but the training dataset has no {column!r} column (run `dora-engine "
                             "calibrate`, or give h_mean)")
        values = list(dataset[column])
    elif isinstance(dataset, Sequence) and all(isinstance(ex, Mapping) for ex in dataset):
        values = [ex.get(column) for ex in dataset]
    else:
        raise ValueError(f"{why}, which cannot be read from a training dataset of type {type(dataset).__name__} "
                         "(give h_mean)")
    missing = [i for i, v in enumerate(values) if v is None]
    if not values or missing:
        raise ValueError(f"{why}, but " + (f"example {missing[0]} has no {column!r} value" if missing
                                          else "the training dataset is empty"))
    return sum(float(v) for v in values) / len(values)


def dataset_objective(objective: RobustObjective, dataset: Any, column: str) -> ResolvedObjective:
    """``objective`` resolved; under ``h_scale="dataset"`` without ``h_mean`` its c is ``dataset_h_mean`` of
    ``dataset``, or, where the strategy does not read h̃, the scale is dropped (it changes nothing there)."""
    strategy = STRATEGIES.get(objective.strategy)  # an unknown one: resolve() names it
    if objective.h_scale == "dataset" and objective.h_mean is None and strategy is not None:
        if strategy.needs_h_tilde:
            objective = replace(objective, h_mean=dataset_h_mean(dataset, column))
        else:
            objective = replace(objective, h_scale="none")
    return objective.resolve()
