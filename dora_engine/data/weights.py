"""The per-prompt weight h̃ from classifier probabilities (docs/design.md section 4, "Calibration"; Eq. 5-6).

For a prompt with n responses, response k has classifier probability c_k ≈ P(golden | x, y_k), the
odds ratio γ_k of the classifier that scored it (γ_s = #label-0 / #label-1 in its training set) and
the mixture weight β_k of its slot (default 1/n). With c clamped to [1e-6, 1 − 1e-6]:

    w_k = γ_k c_k / (1 − c_k)        term_k = w_k^τ / (w_k^τ / n + β_k)        h̃ = (1/n) Σ_k term_k

w_k is the importance weight (density ratio) of Eq. 5 and τ ≥ 0 its power (``ratio_power``): τ = 1 is the
paper's h̃, term_k = γ_k c_k / (γ_k c_k / n + β_k (1 − c_k)), and with β_k = 1/n and γ_k = 1 exactly n · c_k;
τ < 1 flattens the weights towards uniform (importance-weight flattening, Shimodaira 2000: less variance from
a few extreme ratios for some bias); τ = 0 makes every term 1 / (1/n + β_k), so that with uniform β every
prompt gets h̃ = n/2 (with ``source_fraction`` β it still depends on the prompt's mix of sources). Each term
lies in (0, n) and so does h̃.

h̃ is a data weight, never differentiated: tensors are computed in float64 on the CPU and returned in
the input's floating dtype and device. It lives with the data, below the calibration that fits the
classifiers: a record carries h̃, and a converter computes it from released probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CLAMP_EPS = 1e-6
PAPER_RATIO_POWER = 1.0
"""τ of the paper's h̃ (no flattening): the default of the formula, ``h_tilde``."""
CALIBRATION_RATIO_POWER = 0.25
"""τ of ``dora-engine calibrate`` and ``calibration.score`` (and iterate's): chosen on the quality benchmark's
tuning seeds (benchmarks/RESULTS.md, "Flattening h̃")."""


def h_tilde(c: Any, gamma: Any = 1.0, beta: Any = None, ratio_power: float = PAPER_RATIO_POWER) -> Any:
    """h̃ for one prompt (``c`` of shape (n,)) or a batch of prompts (``c`` of shape (B, n)).

    Args:
        c: classifier probabilities in [0, 1]; a list, numpy array or torch tensor.
        gamma: the scoring classifier's γ per response: a positive scalar or an array broadcastable
            to ``c`` (e.g. (n,) or (B, n)).
        beta: the slot mixture weights β_k > 0, broadcastable to ``c``; ``None`` means 1/n for every slot.
        ratio_power: τ ≥ 0, the power of each importance weight (module docstring); 1 is the paper's h̃.

    Returns:
        A float for 1-D ``c``; an array (B,) for 2-D ``c`` (a tensor with ``c``'s dtype and device when
        ``c`` is a torch tensor).
    """
    torch_like = _as_torch_reference(c)
    result = h_tilde_terms(c, gamma, beta, ratio_power).mean(axis=-1)
    if torch_like is not None:
        import torch

        dtype = torch_like.dtype if torch_like.dtype.is_floating_point else torch.float64
        return torch.as_tensor(result, dtype=dtype, device=torch_like.device)
    return float(result) if result.ndim == 0 else result


def h_tilde_terms(c: Any, gamma: Any = 1.0, beta: Any = None, ratio_power: float = PAPER_RATIO_POWER) -> np.ndarray:
    """The terms term_k of h̃ (module docstring), float64 of ``c``'s shape: h̃ is their mean over the last
    axis. Arguments as in ``h_tilde``."""
    check_ratio_power(ratio_power)
    probs = _as_float64(c, "c")
    if probs.ndim not in (1, 2) or probs.shape[-1] < 1:
        raise ValueError(f"h_tilde: c must have shape (n,) or (B, n) with n >= 1, got shape {tuple(probs.shape)}")
    _check_finite(probs, "c")
    outside = (probs < 0) | (probs > 1)
    if outside.any():
        idx = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"h_tilde: c{list(idx)} = {float(probs[idx])!r} is outside [0, 1]")
    n = probs.shape[-1]
    gammas = _positive_broadcast(gamma, probs.shape, "gamma")
    betas = np.full(probs.shape, 1.0 / n) if beta is None else _positive_broadcast(beta, probs.shape, "beta")

    clamped = np.clip(probs, CLAMP_EPS, 1.0 - CLAMP_EPS)
    ratio = (gammas * clamped / (1.0 - clamped)) ** float(ratio_power)
    return ratio / (ratio / n + betas)


def check_ratio_power(ratio_power: Any, name: str = "h_tilde: ratio_power") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``ratio_power`` is a finite number ≥ 0."""
    if isinstance(ratio_power, bool) or not isinstance(ratio_power, int | float) or not math.isfinite(ratio_power) \
            or ratio_power < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (1 is the paper's h̃), got {ratio_power!r}")


def _as_torch_reference(x: Any) -> Any:
    """The tensor itself when ``x`` is a torch tensor (its dtype/device shape the output), else None."""
    module = type(x).__module__
    return x if module.startswith("torch") and hasattr(x, "detach") else None


def _as_float64(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"h_tilde: {name} must be numeric (a number, list, numpy array or tensor): {err}") from None
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = [int(i) for i in np.argwhere(bad)[0]]
        raise ValueError(f"h_tilde: {name}{idx} = {float(arr[tuple(idx)])!r} is not finite")


def _positive_broadcast(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = _as_float64(x, name)
    try:
        out = np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(
            f"h_tilde: {name} of shape {tuple(arr.shape)} does not broadcast to c's shape {tuple(shape)}"
        ) from None
    _check_finite(out, name)
    if (out <= 0).any():
        idx = [int(i) for i in np.argwhere(out <= 0)[0]]
        raise ValueError(f"h_tilde: {name}{idx} = {float(out[tuple(idx)])!r} must be > 0")
    return out
