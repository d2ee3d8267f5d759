"""Pure-PyTorch reference of every op (DESIGN.md sections 4-5): the fallback and the oracle.

It materialises the fp32 log-softmax and the full logits, which the fused op never does; its job is
to be obviously right, not fast.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from dora_engine.losses import PromptBatch
from dora_engine.ops.distributed import gather_for_global_loss, local_slice
from dora_engine.ops.validation import (
    accumulation_dtype,
    check_labels,
    check_linear_inputs,
    check_logits_labels,
    check_loss_inputs,
    check_valid_tokens,
)


class DoRAOutput(NamedTuple):
    """Result of ``dora_loss``. Only ``loss`` carries gradient.

    loss: scalar robust objective; per_sample_loss (B,) ℓ_b; seq_logps (N,) S; seq_lens (N,) L;
    weights (B,) the strategy's distribution over prompts (with a process group: this rank's slice of
    the global distribution, which sums to 1 over all ranks).
    """

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    seq_logps: torch.Tensor
    seq_lens: torch.Tensor
    weights: torch.Tensor


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """lp[n, t] = z[n, t, y] − logsumexp_v z[n, t, v] in the accumulation dtype; 0 at ignored tokens."""
    z = logits.to(accumulation_dtype(logits.dtype))
    valid = labels != ignore_index
    target = labels.masked_fill(~valid, 0)
    lp = z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """S[n] = Σ_t lp[n, t] and L[n] = #valid t, both in the accumulation dtype (fp32 or float64)."""
    check_logits_labels(logits, labels, ignore_index=ignore_index, check_range=validate)
    return _sequence_logprobs(logits, labels, ignore_index)


def _sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    lp = token_logprobs(logits, labels, ignore_index)
    return lp.sum(dim=-1), (labels != ignore_index).sum(dim=-1).to(lp.dtype)


def _linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    check_linear_inputs(hidden, weight, bias)
    return torch.nn.functional.linear(hidden, weight, bias)


def sequence_logprobs_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logprobs`` of the logits hidden @ weightᵀ + bias."""
    logits = _linear_logits(hidden, weight, bias)
    check_labels(labels, hidden.shape[:2], weight.shape[0], hidden.device, ignore_index, validate)
    return _sequence_logprobs(logits, labels, ignore_index)


def robust_loss_from_sequences(
    S: torch.Tensor,
    L: torch.Tensor,
    *,
    config,
    scores: torch.Tensor,
    h_tilde: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    process_group: dist.ProcessGroup | None = None,
) -> DoRAOutput:
    """Stages (2a)-(2b) of DESIGN.md section 5 on per-sequence S, L (N,): ℓ_b, then the strategy."""
    B, K = config.num_prompts, config.num_responses
    dtype = S.dtype
    batch = PromptBatch(
        S=S.view(B, K),
        L=L.view(B, K).to(dtype),
        scores=scores.to(dtype),
        S_ref=None if ref_logps is None else ref_logps.to(dtype).view(B, K),
    )
    ell = config.loss.fn(batch, **config.params)
    h = torch.ones_like(ell) if h_tilde is None else h_tilde.to(dtype)
    if process_group is None:
        loss, weights = config.strategy.fn(ell, h, config.lam)
    else:
        loss, global_weights = config.strategy.fn(
            gather_for_global_loss(ell, process_group), gather_for_global_loss(h, process_group), config.lam
        )
        weights = local_slice(global_weights, ell, process_group)
    return DoRAOutput(loss, ell.detach(), S.detach(), L.detach(), weights.detach())


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
) -> DoRAOutput:
    """L = strategy over b of ℓ_b(S, L, S_ref, scores), S and L from the logits (DESIGN.md section 4)."""
    check_logits_labels(logits, labels, ignore_index=ignore_index, check_range=validate)
    config = check_loss_inputs(
        num_rows=logits.shape[0], device=logits.device, num_responses=num_responses, scores=scores,
        h_tilde=h_tilde, ref_logps=ref_logps, loss=loss, loss_params=loss_params, strategy=strategy,
        lam=lam, validate=validate,
    )
    S, L = _sequence_logprobs(logits, labels, ignore_index)
    if validate:
        check_valid_tokens(L, num_responses)
    return robust_loss_from_sequences(
        S, L, config=config, scores=scores, h_tilde=h_tilde, ref_logps=ref_logps, process_group=process_group
    )


def dora_loss_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> DoRAOutput:
    """``dora_loss`` of the logits hidden @ weightᵀ + bias (materialised: this is the oracle)."""
    return dora_loss(_linear_logits(hidden, weight, bias), labels, **kwargs)
