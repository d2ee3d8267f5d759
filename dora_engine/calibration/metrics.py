"""Held-out quality of a calibration classifier: accuracy, ROC-AUC, expected calibration error.

For a binary classifier the scored probability is p = P(target | x, y) and the outcome is "the
response is from the target". A multiclass classifier is judged the same way on its target class
(target vs rest), which is what h̃ of target responses uses; its accuracy is the arg-max accuracy.

ECE with M equal-width bins: Σ_m (|B_m| / N) · |mean(y in B_m) − mean(p in B_m)|.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 10


def reliability_bins(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin of p: its range, count, mean prediction and observed frequency of y = 1."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for m in range(bins):
        mask = which == m
        if mask.any():
            out.append(
                {
                    "low": float(edges[m]),
                    "high": float(edges[m + 1]),
                    "count": int(mask.sum()),
                    "mean_prob": float(p[mask].mean()),
                    "frequency": float(y[mask].mean()),
                }
            )
    return out


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    total = len(p)
    return float(sum(b["count"] / total * abs(b["frequency"] - b["mean_prob"]) for b in reliability_bins(p, y, bins)))


def classifier_metrics(probs: np.ndarray, labels: np.ndarray, target_class: int) -> dict[str, Any]:
    """Accuracy, target-vs-rest ROC-AUC and ECE of held-out predictions ``probs`` (N, C) against ``labels``."""
    from sklearn.metrics import roc_auc_score

    if len(labels) == 0:
        return {"count": 0, "accuracy": None, "roc_auc": None, "ece": None, "reliability": []}
    p = probs[:, target_class]
    y = (labels == target_class).astype(np.float64)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None
    return {
        "count": int(len(labels)),
        "accuracy": float((probs.argmax(axis=1) == labels).mean()),
        "roc_auc": auc,
        "ece": expected_calibration_error(p, y),
        "reliability": reliability_bins(p, y),
    }
