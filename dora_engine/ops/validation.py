"""Input checks of the public ops, run once by ``dora_engine.ops`` whatever the backend (docs/design.md section 7).

Each failure names the offending argument (and row/prompt where one is at fault). Shapes, dtypes and
devices are always checked; ``validate=False`` skips only the checks that read tensor values on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dora_engine.losses import ResolvedObjective

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IGNORE_INDEX = -100  # the label of a position that is not scored (prompt, padding): Hugging Face's convention


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, float64 for float64 (docs/design.md section 4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits_labels(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int, check_range: bool, name: str = "logits"
) -> None:
    """logits (N, T, V) float; labels (N, T) int64 on the same device; labels in [0, V) or ignore_index."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor (N, T, V), got shape {_shape(logits)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    check_labels(labels, logits.shape[:2], logits.shape[2], logits.device, ignore_index, check_range)


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """hidden (N, T, H), weight (V, H) and bias (V,) or None of one float dtype and device."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a 3-D tensor (N, T, H), got shape {_shape(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must have shape (V, H) with H = {hidden.shape[2]}, got {_shape(weight)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {_shape(bias)}")
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is None:
            continue
        if x.dtype not in FLOAT_DTYPES or x.dtype != hidden.dtype:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64 like hidden, got {x.dtype}")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden on {hidden.device}")


def check_labels(
    labels: torch.Tensor,
    leading: tuple[int, ...] | torch.Size,
    vocab: int,
    device: torch.device,
    ignore_index: int,
    check_range: bool,
) -> None:
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(leading):
        raise ValueError(f"labels must have shape {tuple(leading)} (N, T), got {_shape(labels)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits/hidden states on {device}")
    if check_range and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            n, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"labels[{n}, {t}] = {int(labels[n, t])} is outside [0, {vocab}) and is not "
                f"ignore_index ({ignore_index})"
            )


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


@dataclass(frozen=True)
class LossCall:
    """A validated call of ``dora_loss``: the resolved objective, batch geometry, and the per-prompt inputs
    of the per-batch stage (what every backend's primitives receive)."""

    objective: ResolvedObjective
    num_prompts: int
    num_responses: int
    scores: torch.Tensor
    h_tilde: torch.Tensor | None
    ref_logps: torch.Tensor | None
    process_group: Any


def check_loss_inputs(
    objective: ResolvedObjective,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    num_responses: int,
    scores: torch.Tensor,
    h_tilde: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    process_group: Any,
    response_limit: int | None,
    validate: bool,
) -> LossCall:
    """Validate everything about a ``dora_loss`` call but the logits/labels themselves (already checked:
    ``labels`` gives the rows and the device) and the objective (resolved by ``RobustObjective.resolve``).
    ``response_limit``: the most responses per prompt the backend handles (None: no limit)."""
    num_rows, device = labels.shape[0], labels.device
    if isinstance(num_responses, bool) or not isinstance(num_responses, int) or num_responses < 2:
        raise ValueError(f"num_responses (K) must be an integer >= 2, got {num_responses!r}")
    if num_rows % num_responses:
        raise ValueError(
            f"the number of rows N = {num_rows} is not divisible by num_responses K = {num_responses}"
        )
    B = num_rows // num_responses
    if B == 0:
        raise ValueError("the batch is empty (N = 0)")
    _check_tensor("scores", scores, (B, num_responses), device)
    if validate and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf")
    if h_tilde is None:
        if objective.strategy.needs_h_tilde:
            raise ValueError(
                f"strategy {objective.strategy.name!r} needs h_tilde (B,), got None: run calibration first"
            )
    else:
        _check_tensor("h_tilde", h_tilde, (B,), device)
        if validate:
            bad = ~(torch.isfinite(h_tilde) & (h_tilde > 0))
            if bool(bad.any()):
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"h_tilde must be finite and > 0; h_tilde[{b}] = {float(h_tilde[b])}")
    if objective.loss.needs_reference and ref_logps is None:
        raise ValueError(
            f"loss {objective.loss.name!r} needs a reference model: pass ref_logps (N,) = ({num_rows},)"
        )
    if ref_logps is not None:
        _check_tensor("ref_logps", ref_logps, (num_rows,), device)
    check_response_limit(num_responses, response_limit)
    if validate:
        check_valid_tokens(labels, ignore_index, num_responses)
    return LossCall(objective, B, num_responses, scores, h_tilde, ref_logps, process_group)


def _check_tensor(name: str, x: Any, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits/hidden states on {device}")


def check_valid_tokens(labels: torch.Tensor, ignore_index: int, num_responses: int) -> None:
    """Every response row must have at least one valid (non-ignored) label token."""
    empty = (labels != ignore_index).sum(dim=1) == 0
    if bool(empty.any()):
        n = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"response row {n} (prompt {n // num_responses}, response {n % num_responses}) has no valid "
            "label token (all ignore_index)"
        )


def check_response_limit(num_responses: int, limit: int | None) -> None:
    """K within what the fused per-batch stage handles (``limit``; None: the reference, no limit)."""
    if limit is not None and num_responses > limit:
        raise ValueError(
            f"num_responses K = {num_responses} exceeds the fused backend's limit of {limit} responses per "
            "prompt; use backend='reference' for larger K"
        )


def check_chunk_bytes(chunk_bytes: int | None, default: int) -> int:
    """The chunk size in bytes: ``chunk_bytes``, or ``default`` when None."""
    if chunk_bytes is None:
        return default
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive integer (bytes of one chunk's logits), got {chunk_bytes!r}")
    return chunk_bytes


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")
