"""Public API of the DoRA op (DESIGN.md section 5). Imports with torch alone.

``backend``: ``"fused"`` (the C++/CUDA extension, CPU or CUDA by the tensors' device), ``"reference"``
(pure PyTorch), ``"auto"`` (fused when the extension loads, else the reference with one warning).
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import torch

from dora_engine.ops import reference
from dora_engine.ops.reference import DoRAOutput

__all__ = [
    "DoRAOutput",
    "dora_loss",
    "dora_loss_linear",
    "sequence_logprobs",
    "sequence_logprobs_linear",
]

BACKENDS = ("auto", "fused", "reference")
_fallback_warned = False


def _fused() -> ModuleType:
    from dora_engine.ops import fused

    return fused


def _select(backend: str) -> ModuleType:
    global _fallback_warned
    if backend == "reference":
        return reference
    if backend == "fused":
        return _fused()
    if backend == "auto":
        try:
            return _fused()
        except Exception as err:  # the extension could not be built or loaded
            if not _fallback_warned:
                warnings.warn(
                    f"dora_engine: fused op unavailable ({err}); using the PyTorch reference. "
                    "Run `dora-engine report` for details.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _fallback_warned = True
            return reference
    raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, L): summed token log-probs and valid-token counts per row (N,), in fp32 (float64 for float64).

    Rows with no valid token give S = 0, L = 0. Differentiable in ``logits`` through S.
    """
    return _select(backend).sequence_logprobs(logits, labels, ignore_index=ignore_index, validate=validate)


def sequence_logprobs_linear(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    ignore_index: int = -100, chunk_bytes: int | None = None, backend: str = "auto", validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logprobs`` of hidden (N, T, H) @ weight (V, H)ᵀ + bias without holding all logits."""
    impl = _select(backend)
    extra = {} if impl is reference else {"chunk_bytes": chunk_bytes}
    return impl.sequence_logprobs_linear(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, validate=validate, **extra
    )


def dora_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_responses: int,
    scores: torch.Tensor,
    h_tilde: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    loss: str = "dpo_pl",
    loss_params: dict[str, Any] | None = None,
    strategy: str = "dora",
    lam: float = 1.0,
    process_group: Any = None,
    ignore_index: int = -100,
    backend: str = "auto",
    validate: bool = True,
) -> DoRAOutput:
    """The robust preference loss of B prompts × K responses from logits (N = B·K, T, V).

    ℓ_b is ``loss`` on the prompt's sequence log-probs S (minus ``ref_logps`` where the loss uses a
    reference); the batch objective is ``strategy`` over s_b = h̃_b ℓ_b, e.g. dora:
    λ·log (1/B) Σ_b exp(h̃_b ℓ_b / λ) (DESIGN.md section 4). With ``process_group`` the reduction is
    over the batch of all ranks (section 5).
    """
    return _select(backend).dora_loss(
        logits, labels, num_responses=num_responses, scores=scores, h_tilde=h_tilde, ref_logps=ref_logps,
        loss=loss, loss_params=loss_params, strategy=strategy, lam=lam, process_group=process_group,
        ignore_index=ignore_index, validate=validate,
    )


def dora_loss_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    mode: str = "single_pass",
    backend: str = "auto",
    **kwargs: Any,
) -> DoRAOutput:
    """``dora_loss`` of the logits hidden @ weightᵀ + bias, holding only a chunk of logits at a time.

    ``mode="single_pass"`` (3 GEMMs) or ``"recompute"`` (4 GEMMs, least memory); see DESIGN.md section 5.
    """
    impl = _select(backend)
    extra = {} if impl is reference else {"chunk_bytes": chunk_bytes, "mode": mode}
    return impl.dora_loss_linear(hidden, weight, labels, bias=bias, **extra, **kwargs)
