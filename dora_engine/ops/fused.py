"""The fused DoRA op: autograd functions over the C++/CUDA kernels (DESIGN.md section 5).

Same entry points and validation as ``dora_engine.ops.reference``; importing this module loads the
extension (``builder.load_ops``) and raises ``OpLoadError`` when it cannot, which the ``"auto"``
backend of ``dora_engine.ops`` turns into one warning and the reference.

Forward: the row pass gives S, L and the per-token log-sum-exp; the batch stage gives ℓ_b, the
strategy's loss and weights, and gS[n] = ∂L/∂ℓ_b·∂ℓ_b/∂S_n. Backward: grad_loss·gS, then the backward
row pass dz = g[n]·(onehot(y) − softmax(z)). No N×T×V tensor besides the gradient is ever allocated;
with ``inplace_backward=True`` not even that: the gradient overwrites the logits, for callers that do
not need them after the loss (the usual case: logits straight out of the lm_head).

torch.compile: the ops have fake kernels (``fake_kernels``), so the functions trace without a graph
break when ``validate=False``; ``validate=True`` reads values on the host (label range, h̃ > 0,
empty responses) and therefore breaks the graph there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dora_engine.losses import encode_params
from dora_engine.ops.builder import has_kernel, load_ops
from dora_engine.ops.distributed import gather_uneven
from dora_engine.ops.reference import DoRAOutput
from dora_engine.ops.validation import LossConfig, check_logits_labels, check_loss_inputs, check_valid_tokens

__all__ = [
    "DoRAOutput",
    "dora_loss",
    "dora_loss_linear",
    "robust_loss_from_sequences",
    "seq_logprobs_backward",
    "sequence_logprobs",
    "sequence_logprobs_linear",
]

_ops = load_ops()


def _check_backend(t: torch.Tensor) -> None:
    if t.is_cuda and not has_kernel("CUDA"):
        raise RuntimeError(
            "the dora_engine extension was built without CUDA kernels (torch without CUDA or nvcc not found "
            "at build time); run `dora-engine report`"
        )


def seq_logprobs_backward(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, gS: torch.Tensor, ignore_index: int,
    *, inplace: bool = False,
) -> torch.Tensor:
    """dz[n, t, :] = gS[n]·(onehot(labels[n, t]) − softmax(logits[n, t, :])), 0 at ignored tokens.

    ``inplace=True`` writes dz over ``logits`` and returns it (a new tensor when they are not contiguous).
    """
    if inplace and logits.is_contiguous():
        _ops.seq_logprobs_bwd_(logits, labels, lse, gS, ignore_index)
        return logits
    return _ops.seq_logprobs_bwd(logits, labels, lse, gS, ignore_index)


class _SequenceLogprobs(torch.autograd.Function):
    """(S, L) from the logits; S is differentiable, its backward is the backward row pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool):
        S, L, lse = _ops.seq_logprobs_fwd(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(L)
        return S, L

    @staticmethod
    def backward(ctx, grad_S: torch.Tensor, _grad_L: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = seq_logprobs_backward(
            logits, labels, lse, grad_S.to(lse.dtype).contiguous(), ctx.ignore_index, inplace=ctx.inplace_backward
        )
        return grad, None, None, None


class _RobustLoss(torch.autograd.Function):
    """Stages (2a)-(2b) on S: returns (L, ℓ, weights); only L is differentiable, ∂L/∂S = gS.

    Without a process group the whole stage is one ``batch_stage`` call. With one, ℓ_b and ∂ℓ_b/∂S come
    from ``prompt_loss`` locally, the ℓ_b and h̃_b of every rank are all-gathered, ``robust_reduce`` runs on
    the global batch (identical on every rank), and this rank keeps ∂L/∂ℓ of its own prompts times the
    world size, so that DeepSpeed's gradient averaging yields the gradient of the global loss.
    """

    @staticmethod
    def forward(ctx, S, L, S_ref, scores, h, loss_code: int, params: list[float], strategy_code: int, lam: float,
                process_group):
        if process_group is None:
            loss, ell, weights, gS = _ops.batch_stage(S, L, S_ref, scores, h, loss_code, params, strategy_code, lam)
        else:
            ell, dell_dS = _ops.prompt_loss(S, L, S_ref, scores, loss_code, params)
            ell_all, offset, world = gather_uneven(ell, process_group)
            h_all = None if h is None else gather_uneven(h, process_group)[0]
            loss, weights_all, dloss_dell_all = _ops.robust_reduce(ell_all, h_all, strategy_code, lam)
            mine = slice(offset, offset + ell.numel())
            weights = weights_all[mine]
            gS = (dloss_dell_all[mine] * world).repeat_interleave(scores.shape[1]) * dell_dS
        ctx.save_for_backward(gS)
        ctx.mark_non_differentiable(ell, weights)
        return loss, ell, weights

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ell, _grad_weights):
        (gS,) = ctx.saved_tensors
        return grad_loss * gS, None, None, None, None, None, None, None, None, None


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, validate: bool = True,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S[n] = Σ_t lp[n, t], L[n] = #valid t (N,) in fp32 (float64 for float64 logits); S = L = 0 for rows
    without a valid token. ``inplace_backward``: the backward overwrites ``logits`` with its gradient.
    """
    check_logits_labels(logits, labels, ignore_index=ignore_index, check_range=validate)
    _check_backend(logits)
    return _SequenceLogprobs.apply(logits, labels, ignore_index, inplace_backward)


def robust_loss_from_sequences(
    S: torch.Tensor,
    L: torch.Tensor,
    *,
    config: LossConfig,
    scores: torch.Tensor,
    h_tilde: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    process_group: dist.ProcessGroup | None = None,
) -> DoRAOutput:
    """Stages (2a)-(2b) of DESIGN.md section 5 on per-sequence S, L (N,) through the stage kernels."""
    dtype = S.dtype

    def prepared(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().to(dtype).contiguous()

    loss, ell, weights = _RobustLoss.apply(
        S, L.detach(), prepared(ref_logps), prepared(scores), prepared(h_tilde), config.loss.code,
        encode_params(config.loss.name, config.params), config.strategy.code, config.lam, process_group,
    )
    return DoRAOutput(loss, ell, S.detach(), L.detach(), weights)


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
    process_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    validate: bool = True,
    inplace_backward: bool = False,
) -> DoRAOutput:
    """The robust preference loss of B prompts × K responses from logits (N = B·K, T, V); see
    ``dora_engine.ops.dora_loss``. ``inplace_backward=True`` writes the gradient over ``logits``.
    """
    check_logits_labels(logits, labels, ignore_index=ignore_index, check_range=validate)
    config = check_loss_inputs(
        num_rows=logits.shape[0], device=logits.device, num_responses=num_responses, scores=scores,
        h_tilde=h_tilde, ref_logps=ref_logps, loss=loss, loss_params=loss_params, strategy=strategy,
        lam=lam, validate=validate,
    )
    _check_backend(logits)
    S, L = _SequenceLogprobs.apply(logits, labels, ignore_index, inplace_backward)
    if validate:
        check_valid_tokens(L, num_responses)
    return robust_loss_from_sequences(
        S, L, config=config, scores=scores, h_tilde=h_tilde, ref_logps=ref_logps, process_group=process_group
    )


from dora_engine.ops.fused_linear import dora_loss_linear, sequence_logprobs_linear  # noqa: E402
