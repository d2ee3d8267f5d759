"""The percentile bootstrap of a mean, shared by the win rates (``winrate``) and the paired differences
(``paired``).

Given n items with a row of values each, ``n_boot`` resamples of the n rows with replacement (numpy
``default_rng(seed)``), each column's mean recomputed on every resample, and the (1 − confidence)/2 and
(1 + confidence)/2 quantiles of those means.
"""

from __future__ import annotations

import numpy as np

from dora_engine.errors import UserValueError


def bootstrap_quantiles(
    values: np.ndarray, *, n_boot: int, seed: int, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of each column's mean over the rows of ``values`` (n ≥ 1, columns), as arrays of the columns."""
    if n_boot < 1 or not 0 < confidence < 1:
        raise UserValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot} and {confidence}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)  # (n_boot, columns)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return lo, hi
