"""Pure-PyTorch backend of the op (docs/design.md sections 4-5): the fallback and the oracle.

Primitives only; ``dora_engine.ops`` validates the inputs and composes them. Autograd differentiates
everything here. It materialises the fp32 log-softmax of each (chunk of) logits, which the fused
backend never does; its job is to be obviously right, not fast.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from dora_engine.losses import PromptBatch
from dora_engine.ops.chunking import prompts_per_chunk, spans, tokens_per_chunk
from dora_engine.ops.distributed import gather_for_global_loss, local_slice
from dora_engine.ops.output import DoRAOutput, NLLOutput
from dora_engine.ops.validation import LossCall, accumulation_dtype

#: The per-batch stage has no limit on the responses per prompt.
MAX_RESPONSES = None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """lp[n, t] = z[n, t, y] − logsumexp_v z[n, t, v] in the accumulation dtype; 0 at ignored tokens; NaN, with
    a NaN gradient row, at an unchecked label outside [0, V) (docs/design.md section 7.1)."""
    z = logits.to(accumulation_dtype(logits.dtype))
    valid = labels != ignore_index
    outside = valid & ((labels < 0) | (labels >= z.shape[-1]))
    target = labels.masked_fill(~valid | outside, 0)
    lp = z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    lp = lp * torch.where(outside, float("nan"), 1.0).to(lp.dtype)  # a constant: NaN reaches only those rows
    return torch.where(valid, lp, torch.zeros_like(lp))


def row_pass(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """S[n] = Σ_t lp[n, t] and L[n] = #valid t, both in the accumulation dtype (fp32 or float64).

    ``inplace_backward`` only permits overwriting the logits; autograd here keeps them intact.
    """
    lp = token_logprobs(logits, labels, ignore_index)
    return lp.sum(dim=-1), (labels != ignore_index).sum(dim=-1).to(lp.dtype)


def _linear_token_logprobs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Token log-probs (n,) of the logits x (n, H) @ weightᵀ + bias for labels y (n,)."""
    logits = torch.nn.functional.linear(x, weight, bias)
    return token_logprobs(logits.unsqueeze(1), y.unsqueeze(1), ignore_index).squeeze(1)


def linear_row_pass(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, L) of hidden @ weightᵀ + bias, the fused backend's recompute schedule: token chunks of
    ``chunk_bytes`` logits, each recomputed in backward (activation checkpointing), so only one chunk's
    logits are alive at a time."""
    N, T, H = hidden.shape
    x, y = hidden.reshape(N * T, H), labels.reshape(N * T)
    per_chunk = tokens_per_chunk(chunk_bytes, weight.shape[0], hidden.element_size())
    parts = [
        checkpoint(_linear_token_logprobs, x[t0:t1], weight, bias, y[t0:t1], ignore_index, use_reentrant=False)
        for t0, t1 in spans(N * T, per_chunk)
    ]
    lp = torch.cat(parts).view(N, T)
    return lp.sum(dim=1), (labels != ignore_index).sum(dim=1).to(lp.dtype)


def single_pass_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    chunk_bytes: int,
) -> NLLOutput:
    """``nll_linear(mode="single_pass")``: −Σ S of ``linear_row_pass`` (the values do not depend on the
    schedule; autograd here has no gradient to form in forward)."""
    return NLLOutput.of(*linear_row_pass(hidden, weight, bias, labels, ignore_index, chunk_bytes))


def robust_loss(S: torch.Tensor, L: torch.Tensor, call: LossCall) -> DoRAOutput:
    """Stages (2a)-(2b) of docs/design.md section 5 on per-sequence S, L (N,): ℓ_b, then the strategy."""
    B, K = call.num_prompts, call.num_responses
    dtype = S.dtype
    batch = PromptBatch(
        S=S.view(B, K),
        L=L.view(B, K).to(dtype),
        scores=call.scores.to(dtype),
        S_ref=None if call.ref_logps is None else call.ref_logps.to(dtype).view(B, K),
    )
    ell = call.objective.per_sample_loss(batch)
    h = torch.ones_like(ell) if call.h_tilde is None else call.h_tilde.to(dtype)
    process_group = call.process_group
    if process_group is None:
        loss, weights = call.objective.reduce(ell, h)
    else:
        both = gather_for_global_loss(torch.stack([ell, h]), process_group)  # one exchange for ℓ and h̃
        loss, global_weights = call.objective.reduce(both[0], both[1])
        weights = local_slice(global_weights, ell, process_group)
    return DoRAOutput(loss, ell.detach(), S.detach(), L.detach(), weights.detach())


def single_pass_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    chunk_bytes: int, call: LossCall,
) -> DoRAOutput:
    """``dora_loss_linear(mode="single_pass")``: chunks of whole prompts (K·T rows each, scored or not), each
    chunk's logits kept for backward (nothing recomputed), then the per-batch stage."""
    K, T, V = call.num_responses, hidden.shape[1], weight.shape[0]
    per_chunk = prompts_per_chunk(chunk_bytes, K * T, V, hidden.element_size())
    rows = [(p0 * K, p1 * K) for p0, p1 in spans(call.num_prompts, per_chunk)]
    parts = [
        row_pass(torch.nn.functional.linear(hidden[r0:r1], weight, bias), labels[r0:r1], ignore_index, False)
        for r0, r1 in rows
    ]
    S, L = (torch.cat(x) for x in zip(*parts, strict=True))
    return robust_loss(S, L, call)
