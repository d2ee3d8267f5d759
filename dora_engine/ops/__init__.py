"""The public DoRA op (docs/design.md section 5): the only place its functions and their checks are defined.

Each function validates its arguments once, picks a backend and composes that backend's primitives: the
row pass (per-sequence log-probs), the per-batch stage (loss → h̃ → robust reduction, with its backward)
and, for the ``*_linear`` functions, the chunk loop over the lm_head GEMM. Backends:

- ``"fused"``: the C++/CUDA extension (CPU or CUDA kernels by the tensors' device);
- ``"reference"``: pure PyTorch differentiated by autograd, the oracle;
- ``"auto"``: fused, falling back to the reference with one warning only when the extension cannot be
  built or loaded or has no kernels for the inputs' device, e.g. a build without CUDA kernels given CUDA
  tensors (``OpLoadError``); any other error propagates.

Labels are aligned with the logits: ``labels[n, t]`` is the token that ``logits[n, t]`` predicts, and
``ignore_index`` marks positions that are not scored. Hugging Face labels (``labels[n, t]`` is token t)
become aligned labels with ``shift_labels``; or pass ``logits[:, :-1]`` with ``labels[:, 1:]``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.losses import ResolvedObjective, RobustObjective, objective_of
from dora_engine.ops import reference
from dora_engine.ops.builder import OpLoadError, check_kernels_for
from dora_engine.ops.chunking import default_chunk_bytes
from dora_engine.ops.distributed import gather_uneven
from dora_engine.ops.output import DoRAOutput, NLLOutput
from dora_engine.ops.validation import (
    IGNORE_INDEX,
    LossCall,
    accumulation_dtype,
    check_choice,
    check_chunk_bytes,
    check_labels,
    check_linear_inputs,
    check_logits_labels,
    check_loss_inputs,
)

__all__ = [
    "FUSED_LINEAR_MODES",
    "IGNORE_INDEX",
    "OP_BACKENDS",
    "DoRAOutput",
    "NLLOutput",
    "RobustObjective",
    "dora_loss",
    "dora_loss_linear",
    "nll_linear",
    "sequence_logprobs",
    "sequence_logprobs_linear",
    "shift_labels",
]

OP_BACKENDS = ("auto", "fused", "reference")
FUSED_LINEAR_MODES = ("single_pass", "recompute")
_fallback_warned = False


def _load_fused() -> ModuleType:
    """The fused backend; importing it builds or loads the extension (``OpLoadError`` when it cannot)."""
    from dora_engine.ops import fused

    return fused


def _backend(name: str, inputs: torch.Tensor) -> ModuleType:
    """The module of backend ``name`` for tensors on the device of ``inputs`` (see the module docstring)."""
    global _fallback_warned
    check_choice("backend", name, OP_BACKENDS)
    if name == "reference":
        return reference
    try:
        fused = _load_fused()
        check_kernels_for(inputs)
        return fused
    except OpLoadError as err:
        if name == "fused":
            raise
        if not _fallback_warned:
            warnings.warn(
                f"dora_engine: fused op unavailable ({err}); using the PyTorch reference. "
                "Run `dora-engine report` for details.",
                RuntimeWarning,
                stacklevel=3,
            )
            _fallback_warned = True
        return reference


def _scale_h_tilde(call: LossCall, dtype: torch.dtype) -> LossCall:
    """``call`` with h̃ divided by the objective's ``h_divisor`` (docs/design.md section 4.3), in the
    accumulation dtype ``dtype``, before any backend reduces: the one place every path (reference, fused,
    fused-linear) scales h̃. For ``batch`` with a process group the divisor is the mean over all ranks'
    h̃ (all-gathered, so it is the same on every rank and the same as one process on the whole batch)."""
    objective = call.objective
    if not objective.scales_h:
        return call
    h = call.h_tilde.detach().to(dtype)
    h_batch = h
    if objective.h_scale == "batch" and call.process_group is not None:
        h_batch = gather_uneven(h, call.process_group)[0]
    return replace(call, h_tilde=h / objective.h_divisor(h_batch))


def _check_linear_call(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    validate: bool, chunk_bytes: int | None,
) -> int:
    """The checks of every ``*_linear`` function's tensors; returns the bytes of one chunk's logits."""
    check_linear_inputs(hidden, weight, bias)
    check_labels(labels, hidden.shape[:2], weight.shape[0], hidden.device, ignore_index, validate)
    return check_chunk_bytes(
        chunk_bytes, default_chunk_bytes(hidden.device.type, weight.shape[0], hidden.element_size())
    )


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Hugging Face labels (N, T) (``labels[:, t]`` is token t) → the op's aligned labels: ``labels[:, t + 1]``
    at position t, ``ignore_index`` at the last position. The logits stay whole (the fused kernels also read a
    sliced view such as ``logits[:, :-1]`` in place, without a copy)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a 2-D tensor (N, T), got {getattr(labels, 'shape', type(labels).__name__)}")
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    validate: bool = True,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token log-probs S[n] = Σ_t log softmax(logits[n, t])[labels[n, t]] and counts L[n] of valid tokens.

    Args:
        logits: (N, T, V) float32, bfloat16, float16 or float64; differentiable (through S).
        labels: (N, T) int64 aligned with ``logits`` (see the module docstring); values in [0, V) or
            ``ignore_index``.
        ignore_index: label value of positions that are not scored.
        backend: ``"auto"``, ``"fused"`` or ``"reference"``.
        validate: check the label range on the host (one synchronisation); shapes, dtypes and devices are
            always checked. With ``validate=False`` a label outside [0, V) other than ``ignore_index`` is not
            an error: on every backend and device its row's S is NaN (L counts the token) and its gradient
            row is NaN, nothing outside the logits is read, and the other rows are unaffected. NaN (or +inf)
            anywhere in a token's logits likewise makes its row's S and that token's gradient row NaN.
        inplace_backward: allow the backward to overwrite ``logits`` with their gradient (the fused backend
            then allocates no N·T·V buffer, also for a view such as ``logits[:, :-1]``); do not read
            ``logits`` after backward.

    Returns:
        (S, L), each (N,) in fp32 (float64 for float64 logits); a row without a valid token gives S = L = 0.

    Raises:
        ValueError / TypeError naming the argument at fault; ``OpLoadError`` for ``backend="fused"`` when the
        extension cannot be built or loaded, or has no kernels for the device of ``logits``.
    """
    check_logits_labels(logits, labels, ignore_index=ignore_index, check_range=validate)
    return _backend(backend, logits).row_pass(logits, labels, ignore_index, inplace_backward)


def sequence_logprobs_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_bytes: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logprobs`` of the logits hidden @ weightᵀ + bias, holding one chunk of them at a time.

    Args:
        hidden: (N, T, H) float; weight: (V, H) and bias: (V,) or None of the same dtype and device.
            All three are differentiable; the backward recomputes each chunk's logits.
        labels: (N, T) int64 aligned with the logits, in [0, V) or ``ignore_index``.
        chunk_bytes: bytes of one chunk's logits (default: ``chunking.default_chunk_bytes``);
            a chunk holds at least one token's V logits. On the fused backend only the rows with a label
            take logits.
        ignore_index, backend, validate: as in ``sequence_logprobs``.

    Returns:
        (S, L), each (N,) in the accumulation dtype (fp32, or float64 for float64 inputs).

    Raises:
        ValueError / TypeError naming the argument at fault; ``OpLoadError`` as in ``sequence_logprobs``.
    """
    budget = _check_linear_call(hidden, weight, bias, labels, ignore_index, validate, chunk_bytes)
    return _backend(backend, hidden).linear_row_pass(hidden, weight, bias, labels, ignore_index, budget)


def nll_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    mode: str = "single_pass",
    chunk_bytes: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> NLLOutput:
    """The summed token NLL −Σ_n S[n] of the logits hidden @ weightᵀ + bias, holding one chunk of them at a
    time (docs/design.md section 5.4): the loss of SFT, whose token mean is ``loss / seq_lens.sum()``.

    Args:
        hidden, weight, bias, labels, ignore_index, backend, validate: as in ``sequence_logprobs_linear``;
            hidden, weight and bias are differentiable through ``loss``.
        mode: ``"single_pass"`` (3 GEMMs per chunk of tokens, the gradients formed in forward and scaled by
            grad_output in backward; backward once only) or ``"recompute"`` (``sequence_logprobs_linear``'s
            4 GEMMs, least memory). Both give the same values.
        chunk_bytes: bytes of one chunk's logits (default: ``chunking.default_chunk_bytes``);
            a chunk holds at least one token's V logits.

    Returns:
        ``NLLOutput``: ``loss`` (scalar, the only differentiable output), ``seq_logps`` S (N,), ``seq_lens`` L
        (N,), in the accumulation dtype (fp32, or float64 for float64 inputs); a row without a valid token has
        S = L = 0 and no gradient.

    Raises:
        ValueError / TypeError naming the argument at fault; ``OpLoadError`` as in ``sequence_logprobs``.
    """
    check_choice("mode", mode, FUSED_LINEAR_MODES)
    budget = _check_linear_call(hidden, weight, bias, labels, ignore_index, validate, chunk_bytes)
    impl = _backend(backend, hidden)
    if mode == "single_pass":
        return impl.single_pass_nll(hidden, weight, bias, labels, ignore_index, budget)
    return NLLOutput.of(*impl.linear_row_pass(hidden, weight, bias, labels, ignore_index, budget))


def dora_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_responses: int,
    scores: torch.Tensor,
    h_tilde: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    objective: RobustObjective | ResolvedObjective | None = None,
    loss: str | None = None,
    loss_params: dict[str, Any] | None = None,
    strategy: str | None = None,
    lam: float | None = None,
    h_scale: str | None = None,
    h_mean: float | None = None,
    process_group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    validate: bool = True,
    inplace_backward: bool = False,
) -> DoRAOutput:
    """The robust preference loss of B prompts × K responses from their logits (docs/design.md section 4).

    ℓ_b is ``loss`` on prompt b's sequence log-probs S (minus ``ref_logps`` where the loss has a reference),
    and the batch objective is ``strategy`` over s_b = h̃_b·ℓ_b, e.g. dora: λ·log (1/B) Σ_b exp(h̃_b ℓ_b / λ),
    with h̃ first divided by the constant c of the objective's ``h_scale`` (docs/design.md section 4.3).

    Args:
        logits: (N, T, V) with N = B·K, row n = b·K + k; float32, bfloat16, float16 or float64;
            differentiable.
        labels: (N, T) int64 aligned with ``logits`` (module docstring), in [0, V) or ``ignore_index``;
            every row needs at least one valid token.
        num_responses: K ≥ 2 responses per prompt; the fused backend handles K ≤ 64
            (``fused.MAX_RESPONSES``), larger K raises ValueError there (use ``backend="reference"``).
        scores: (B, K) float, higher is better; they rank the responses (not differentiated).
        h_tilde: (B,) float > 0, the calibration weights; required by ``reweight`` and ``dora``.
        ref_logps: (N,) float, the reference model's S; required by dpo, rdpo, ipo, robust_dpo, exo, dpo_pl.
        objective: the loss, its parameters, the strategy and λ (``dora_engine.losses.RobustObjective``,
            validated by its ``resolve()``; a ``ResolvedObjective`` is used as it is). None: the one that
            the flat arguments below build.
        loss, loss_params, strategy, lam, h_scale, h_mean: convenience (kept for one release): the fields of
            the ``RobustObjective`` to build when ``objective`` is None, unset ones at its defaults (``dpo_pl``
            under ``dora``, λ = 1, h̃ as given). Giving them with ``objective`` is an error.
        process_group: reduce the strategy over the prompts of every rank of this group (data parallel);
            the gradient is then that of the global loss under DeepSpeed's gradient averaging.
        ignore_index: label value of positions that are not scored.
        backend: ``"auto"``, ``"fused"`` or ``"reference"``.
        validate: check values on the host (label range, finite scores, h̃ finite and > 0, a valid token
            in every row); shapes, dtypes and devices are always checked. Trainers that validated their data
            at load pass False, so a step makes no host synchronisation for checks. With False, a label
            outside [0, V) other than ``ignore_index`` gives its row a NaN S and a NaN gradient row on every
            backend and device (no error), so the loss is NaN; NaN or +inf in the logits propagate the same
            way (docs/design.md section 7.1).
        inplace_backward: allow the backward to overwrite ``logits`` with their gradient (fused: no extra
            N·T·V buffer, also for a view such as ``logits[:, :-1]``); do not read ``logits`` after backward.

    Returns:
        ``DoRAOutput``: ``loss`` (scalar, the only differentiable output), ``per_sample_loss`` ℓ (B,),
        ``seq_logps`` S (N,), ``seq_lens`` L (N,), ``weights`` (B,).

    Raises:
        ValueError / TypeError naming the argument (and row or prompt) at fault; ``OpLoadError`` for
        ``backend="fused"`` when the extension cannot be built or loaded, or has no kernels for the device of
        ``logits``.
    """
    resolved = objective_of(objective, loss=loss, loss_params=loss_params, strategy=strategy, lam=lam,
                            h_scale=h_scale, h_mean=h_mean)
    check_logits_labels(logits, labels, ignore_index=ignore_index, check_range=validate)
    impl = _backend(backend, logits)
    call = check_loss_inputs(
        resolved, labels, ignore_index=ignore_index, num_responses=num_responses, scores=scores, h_tilde=h_tilde,
        ref_logps=ref_logps, process_group=process_group, response_limit=impl.MAX_RESPONSES, validate=validate,
    )
    call = _scale_h_tilde(call, accumulation_dtype(logits.dtype))
    S, L = impl.row_pass(logits, labels, ignore_index, inplace_backward)
    return impl.robust_loss(S, L, call)


def dora_loss_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    num_responses: int,
    scores: torch.Tensor,
    h_tilde: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    objective: RobustObjective | ResolvedObjective | None = None,
    loss: str | None = None,
    loss_params: dict[str, Any] | None = None,
    strategy: str | None = None,
    lam: float | None = None,
    h_scale: str | None = None,
    h_mean: float | None = None,
    process_group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    mode: str = "single_pass",
    chunk_bytes: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> DoRAOutput:
    """``dora_loss`` of the logits hidden @ weightᵀ + bias without holding them all (docs/design.md section 5).

    Args:
        hidden: (N, T, H) float; weight: (V, H) and bias: (V,) or None of the same dtype and device. All
            three are differentiable through ``loss``.
        labels, num_responses, scores, h_tilde, ref_logps, objective (or loss, loss_params, strategy, lam,
        h_scale, h_mean), process_group, ignore_index, backend, validate: as in ``dora_loss``.
        mode: ``"single_pass"`` (3 GEMMs per chunk, nothing recomputed; chunks of whole prompts, so a chunk
            holds at least one prompt's scored rows, K·T·V logits at most; backward once only) or
            ``"recompute"`` (4 GEMMs, token chunks, least memory). Both give the same values; the reference
            backend computes the same (``recompute`` by activation checkpointing).
        chunk_bytes: bytes of one chunk's logits (default: ``chunking.default_chunk_bytes``); a
            chunk holds at least one token's V logits. On the fused backend only the rows with a label (not
            ``ignore_index``) take logits: a prompt's tokens and padding cost no GEMM.

    Returns / Raises: as ``dora_loss``.
    """
    resolved = objective_of(objective, loss=loss, loss_params=loss_params, strategy=strategy, lam=lam,
                            h_scale=h_scale, h_mean=h_mean)
    check_choice("mode", mode, FUSED_LINEAR_MODES)
    budget = _check_linear_call(hidden, weight, bias, labels, ignore_index, validate, chunk_bytes)
    impl = _backend(backend, hidden)
    call = check_loss_inputs(
        resolved, labels, ignore_index=ignore_index, num_responses=num_responses, scores=scores, h_tilde=h_tilde,
        ref_logps=ref_logps, process_group=process_group, response_limit=impl.MAX_RESPONSES, validate=validate,
    )
    call = _scale_h_tilde(call, accumulation_dtype(hidden.dtype))
    if mode == "single_pass":
        return impl.single_pass_loss(hidden, weight, bias, labels, ignore_index, budget, call)
    S, L = impl.linear_row_pass(hidden, weight, bias, labels, ignore_index, budget)
    return impl.robust_loss(S, L, call)
