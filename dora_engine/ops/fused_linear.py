"""Fused-linear DoRA loss: from hidden states and the lm_head weight, one chunk of logits at a time.

DESIGN.md section 5, "Fused-linear". The logits z = hidden @ weightᵀ + bias of the N = B·K rows are
never held at once. Per chunk, the extension's row kernels give S, L and the per-token log-sum-exp
(``seq_logprobs_fwd``) and write dz = gS[n]·(onehot(y) − softmax(z)) over the chunk's logits in place
(``seq_logprobs_bwd_``); the stage kernels give ℓ_b with ∂ℓ_b/∂S (``prompt_loss``) and the robust
reduction with ∂L/∂ℓ_b (``robust_reduce``). The loss math lives in those kernels and the registry of
``dora_engine.losses`` only; this module schedules GEMMs and rescales.

``mode="single_pass"`` (3 GEMMs, nothing recomputed): chunks of whole prompts. Per chunk: logits GEMM,
row pass, ℓ_b of its prompts, dz in place, then d hidden = dz @ W and d weight += dzᵀ @ hidden. The
gradient accumulators always hold the gradient of the robust objective over the prompts seen so far,
L_seen. A new chunk changes L_seen, and with it ∂L_seen/∂ℓ_i of every earlier prompt i by one common
factor r (dro/dora/drdpo: exp((M_old − M_new)/λ)·Z_old/Z_new, the online-softmax rescale; erm/reweight:
B_old/B_new), read off the stage kernel's gradients as r = g_new[i]/g_old[i] at the earlier prompt with
the largest g_old (never 0). The weight accumulator takes r as the GEMM's beta; d hidden of each chunk
is scaled once, in backward together with grad_output, by g_final/g_then. g_final comes from the
reduction over all ranks' prompts when a process group is given (the per-prompt local gradients are
exact, only the strategy's weights are global), × world size because DeepSpeed averages gradients.
Forward forms every gradient; backward only scales them by grad_output.

``mode="recompute"`` (4 GEMMs, least memory): forward keeps only the per-token log-sum-exp, chunked in
tokens (down to one token); backward recomputes each chunk's logits.

Weight/bias gradients accumulate in fp32 (float64 for float64 inputs; on CUDA a bf16/fp16 GEMM writes
straight into the fp32 accumulator) and are cast to the parameter's dtype once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.losses import encode_params
from dora_engine.ops.distributed import gather_uneven
from dora_engine.ops.reference import DoRAOutput
from dora_engine.ops.validation import (
    LossConfig,
    accumulation_dtype,
    check_labels,
    check_linear_inputs,
    check_loss_inputs,
    check_valid_tokens,
)

MODES = ("single_pass", "recompute")
#: Bytes of one chunk's logits when ``chunk_bytes`` is None.
DEFAULT_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}


def _kernels() -> Any:
    """The registered row and stage kernels (``torch.ops.dora_engine``), building the extension if needed."""
    from dora_engine.ops.builder import load_ops

    return load_ops()


# --------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------


def _chunk_budget(chunk_bytes: int | None, device: torch.device) -> int:
    if chunk_bytes is None:
        return DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive integer (bytes of one chunk's logits), got {chunk_bytes!r}")
    return chunk_bytes


def _spans(total: int, per_chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_chunk, total)) for start in range(0, total, per_chunk)]


# --------------------------------------------------------------------------------------------------
# Stage (2a)-(2b) through the stage kernels
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LossInputs:
    """A validated ``dora_loss_linear`` call, minus the tensors that receive gradients."""

    labels: torch.Tensor
    ignore_index: int
    config: LossConfig
    scores: torch.Tensor
    h_tilde: torch.Tensor
    ref_logps: torch.Tensor | None
    process_group: dist.ProcessGroup | None
    chunk_bytes: int
    needs_grad: tuple[bool, bool, bool]  # hidden, weight, bias

    @property
    def params(self) -> list[float]:
        return encode_params(self.config.loss.name, self.config.params)


def _prompt_loss(ops: Any, S: torch.Tensor, L: torch.Tensor, p: _LossInputs, prompts: slice) -> tuple:
    """ℓ_b (B_c,) and ∂ℓ_b/∂S_n (N_c,) of the prompts in ``prompts`` (stage 2a)."""
    K = p.config.num_responses
    rows = slice(prompts.start * K, prompts.stop * K)
    ref = None if p.ref_logps is None else p.ref_logps[rows]
    return ops.prompt_loss(S[rows], L[rows], ref, p.scores[prompts], p.config.loss.code, p.params)


def _robust_reduce(ops: Any, ell: torch.Tensor, h: torch.Tensor, p: _LossInputs, *, global_batch: bool) -> tuple:
    """(L, weights, ∂L/∂ℓ) of the strategy (stage 2b); over all ranks' prompts with ``global_batch``.

    Across ranks each rank returns its slice of the weights and of ∂L/∂ℓ, the latter × world size
    because DeepSpeed averages gradients (DESIGN.md section 5, "Data parallel").
    """
    code, lam = p.config.strategy.code, p.config.lam
    if not global_batch or p.process_group is None:
        return ops.robust_reduce(ell, h, code, lam)
    ell_all, offset, world = gather_uneven(ell, p.process_group)
    h_all, _, _ = gather_uneven(h, p.process_group)
    loss, weights, grad = ops.robust_reduce(ell_all, h_all, code, lam)
    mine = slice(offset, offset + ell.numel())
    return loss, weights[mine], grad[mine] * world


# --------------------------------------------------------------------------------------------------
# GEMM helpers
# --------------------------------------------------------------------------------------------------


def _accumulate_weight_grad(acc: torch.Tensor, dz: torch.Tensor, x: torch.Tensor, beta: float) -> None:
    """acc ← beta·acc + dzᵀ @ x, with acc in the accumulation dtype (fp32 for bf16/fp16 operands)."""
    if dz.dtype == acc.dtype:
        torch.addmm(acc, dz.t(), x, beta=beta, out=acc)
    elif acc.is_cuda:
        torch.addmm(acc, dz.t(), x, beta=beta, out_dtype=acc.dtype, out=acc)
    else:  # CPU has no mixed-dtype GEMM: one low-precision product per chunk, summed in fp32
        acc.mul_(beta).add_(dz.t() @ x)


def _linear_into(
    buffer: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (n, H) @ weightᵀ + bias written over the first n rows of ``buffer`` (one buffer serves every chunk)."""
    out = buffer[: x.shape[0]]
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _common_ratio(new: torch.Tensor, old: torch.Tensor) -> float:
    """new[i]/old[i] at the largest old[i]: the factor relating two proportional gradient vectors."""
    i = old.argmax()
    return float(new[i] / old[i])


# --------------------------------------------------------------------------------------------------
# mode="single_pass"
# --------------------------------------------------------------------------------------------------


def _single_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: _LossInputs):
    """Loss, statistics and the (unscaled) gradients in one pass over prompt chunks: 3 GEMMs per chunk."""
    ops = _kernels()
    N, T, H = hidden.shape
    V = weight.shape[0]
    K, B = p.config.num_responses, p.config.num_prompts
    acc = accumulation_dtype(hidden.dtype)
    need_hidden, need_weight, need_bias = p.needs_grad
    need_any = need_hidden or need_weight or need_bias
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(V, H, dtype=acc, device=hidden.device) if need_weight else None
    grad_bias = torch.zeros(V, dtype=acc, device=hidden.device) if need_bias else None
    S = hidden.new_empty(N, dtype=acc)
    L = hidden.new_empty(N, dtype=acc)
    ell = hidden.new_empty(B, dtype=acc)

    prompts_per_chunk = max(1, p.chunk_bytes // (K * T * V * hidden.element_size()))
    buffer = hidden.new_empty(min(B, prompts_per_chunk) * K * T, V)
    chunk_refs = []  # per chunk: (its prompts, its prompt with the largest ∂L_seen/∂ℓ, that value then)
    grad_seen = None
    for p0, p1 in _spans(B, prompts_per_chunk):
        rows = slice(p0 * K, p1 * K)
        x = hidden[rows].reshape(-1, H)
        logits = _linear_into(buffer, x, weight, bias).view(-1, T, V)
        labels = p.labels[rows]
        S[rows], L[rows], lse = ops.seq_logprobs_fwd(logits, labels, p.ignore_index)
        ell[p0:p1], dell_dS = _prompt_loss(ops, S, L, p, slice(p0, p1))
        if not need_any:
            continue
        _, _, grad_now = _robust_reduce(ops, ell[:p1], p.h_tilde[:p1], p, global_batch=False)
        rescale = 1.0 if grad_seen is None else _common_ratio(grad_now[:p0], grad_seen)
        top = p0 + grad_now[p0:p1].argmax()
        chunk_refs.append((p1 - p0, top, grad_now[top]))
        gS = grad_now[p0:p1].repeat_interleave(K) * dell_dS
        ops.seq_logprobs_bwd_(logits, labels, lse, gS, p.ignore_index)  # logits now hold dz
        dz = logits.view(-1, V)
        if need_hidden:
            torch.mm(dz, weight, out=grad_hidden[rows].view(-1, H))
        if need_weight:
            _accumulate_weight_grad(grad_weight, dz, x, rescale)
        if need_bias:
            grad_bias.mul_(rescale).add_(dz.sum(dim=0, dtype=acc))
        grad_seen = grad_now

    loss, weights, grad_final = _robust_reduce(ops, ell, p.h_tilde, p, global_batch=True)
    scales = _GradScales()
    if need_any:
        scales.params = _common_ratio(grad_final, grad_seen)
        sizes = torch.tensor([n for n, _, _ in chunk_refs], device=hidden.device)
        # then = 0: the chunk's weights underflowed against earlier prompts; its gradient is already 0.
        per_chunk = torch.stack([torch.where(then > 0, grad_final[top] / then, 0.0) for _, top, then in chunk_refs])
        scales.prompts = per_chunk.repeat_interleave(sizes)
    stats = DoRAOutput(loss, ell, S, L, weights)
    return stats, (grad_hidden, grad_weight, grad_bias), scales


@dataclass
class _GradScales:
    """What turns single_pass's accumulated gradients into those of the final loss (applied in backward)."""

    params: float = 0.0  # weight and bias
    prompts: torch.Tensor | None = None  # (B,) d hidden of each prompt's rows


class _SinglePassLoss(torch.autograd.Function):
    """Gradients are formed in forward (nothing is recomputed) and scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: _LossInputs):
        stats, grads, scales = _single_pass(hidden, weight, bias, p)
        ctx.grads, ctx.scales = grads, scales
        ctx.param_dtype = weight.dtype
        ctx.mark_non_differentiable(*stats[1:])
        return tuple(stats)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_unused):
        if ctx.grads is None:
            raise RuntimeError(
                "dora_loss_linear(mode='single_pass') forms its gradients once and cannot be backpropagated "
                "twice (retain_graph); use mode='recompute'"
            )
        (grad_hidden, grad_weight, grad_bias), scales = ctx.grads, ctx.scales
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden.view(scales.prompts.numel(), -1).mul_((scales.prompts * grad_loss)[:, None])
        params = [
            None if g is None else g.mul_(grad_loss * scales.params).to(ctx.param_dtype)
            for g in (grad_weight, grad_bias)
        ]
        return grad_hidden, *params, None


# --------------------------------------------------------------------------------------------------
# mode="recompute" and sequence_logprobs_linear
# --------------------------------------------------------------------------------------------------


class _LinearSequenceLogprobs(torch.autograd.Function):
    """(S, L) of hidden @ Wᵀ + b in token chunks; keeps the per-token log-sum-exp, recomputes logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_bytes: int):
        ops = _kernels()
        N, T, H = hidden.shape
        acc = accumulation_dtype(hidden.dtype)
        x, y = hidden.reshape(N * T, H), labels.reshape(N * T, 1)
        token_lp = hidden.new_empty(N * T, dtype=acc)
        lse = hidden.new_empty(N * T, 1, dtype=acc)
        tokens_per_chunk = max(1, chunk_bytes // (weight.shape[0] * hidden.element_size()))
        buffer = hidden.new_empty(min(N * T, tokens_per_chunk), weight.shape[0])
        for t0, t1 in _spans(N * T, tokens_per_chunk):
            # Each token is its own length-1 row, so a chunk may end anywhere inside a sequence.
            logits = _linear_into(buffer, x[t0:t1], weight, bias).unsqueeze(1)
            token_lp[t0:t1], _, lse[t0:t1] = ops.seq_logprobs_fwd(logits, y[t0:t1], ignore_index)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ignore_index, ctx.tokens_per_chunk = ignore_index, tokens_per_chunk
        L = (labels != ignore_index).sum(dim=1).to(acc)
        ctx.mark_non_differentiable(L)
        return token_lp.view(N, T).sum(dim=1), L

    @staticmethod
    def backward(ctx, grad_S: torch.Tensor, _grad_L):
        ops = _kernels()
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        N, T, H = hidden.shape
        V = weight.shape[0]
        acc = lse.dtype
        x, y = hidden.reshape(N * T, H), labels.reshape(N * T, 1)
        grad_token = grad_S.to(acc).repeat_interleave(T)
        grad_hidden = torch.empty_like(x) if need_hidden else None
        grad_weight = torch.zeros(V, H, dtype=acc, device=x.device) if need_weight else None
        grad_bias = torch.zeros(V, dtype=acc, device=x.device) if need_bias else None
        buffer = x.new_empty(min(N * T, ctx.tokens_per_chunk), V)
        for t0, t1 in _spans(N * T, ctx.tokens_per_chunk):
            logits = _linear_into(buffer, x[t0:t1], weight, bias).unsqueeze(1)
            ops.seq_logprobs_bwd_(logits, y[t0:t1], lse[t0:t1], grad_token[t0:t1], ctx.ignore_index)
            dz = logits.view(-1, V)
            if need_hidden:
                torch.mm(dz, weight, out=grad_hidden[t0:t1])
            if need_weight:
                _accumulate_weight_grad(grad_weight, dz, x[t0:t1], 1.0)
            if need_bias:
                grad_bias.add_(dz.sum(dim=0, dtype=acc))
        return (
            None if grad_hidden is None else grad_hidden.view(N, T, H),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------
# Public entry points (re-exported by dora_engine.ops.fused)
# --------------------------------------------------------------------------------------------------


def sequence_logprobs_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, L) of the logits hidden @ weightᵀ + bias (DESIGN.md section 4), holding one chunk of logits.

    Backward recomputes each chunk's logits (4 GEMMs in all). Rows with no valid token give S = L = 0.
    """
    check_linear_inputs(hidden, weight, bias)
    check_labels(labels, hidden.shape[:2], weight.shape[0], hidden.device, ignore_index, validate)
    budget = _chunk_budget(chunk_bytes, hidden.device)
    return _LinearSequenceLogprobs.apply(hidden.contiguous(), weight, bias, labels, ignore_index, budget)


def dora_loss_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    mode: str = "single_pass",
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
    """``dora_loss`` of the logits hidden @ weightᵀ + bias without materialising them (DESIGN.md section 5).

    ``chunk_bytes``: bytes of one chunk's logits (default 256 MiB on CUDA, 64 MiB on CPU); single_pass
    chunks hold whole prompts, so a chunk is at least one prompt's K·T·V logits. Gradients flow to
    hidden, weight and bias through ``loss`` only.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    check_linear_inputs(hidden, weight, bias)
    check_labels(labels, hidden.shape[:2], weight.shape[0], hidden.device, ignore_index, validate)
    config = check_loss_inputs(
        num_rows=hidden.shape[0], device=hidden.device, num_responses=num_responses, scores=scores,
        h_tilde=h_tilde, ref_logps=ref_logps, loss=loss, loss_params=loss_params, strategy=strategy,
        lam=lam, validate=validate,
    )
    if validate:
        check_valid_tokens((labels != ignore_index).sum(dim=1), num_responses)
    acc = accumulation_dtype(hidden.dtype)
    grad_on = torch.is_grad_enabled()
    inputs = _LossInputs(
        labels=labels,
        ignore_index=ignore_index,
        config=config,
        scores=scores.detach().to(acc),
        h_tilde=torch.ones(config.num_prompts, dtype=acc, device=hidden.device)
        if h_tilde is None else h_tilde.detach().to(acc),
        ref_logps=None if ref_logps is None else ref_logps.detach().to(acc),
        process_group=process_group,
        chunk_bytes=_chunk_budget(chunk_bytes, hidden.device),
        needs_grad=tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)),
    )
    hidden = hidden.contiguous()
    if mode == "single_pass":
        return DoRAOutput(*_SinglePassLoss.apply(hidden, weight, bias, inputs))
    from dora_engine.ops.fused import robust_loss_from_sequences  # imported late: fused re-exports this module

    S, L = _LinearSequenceLogprobs.apply(hidden, weight, bias, labels, ignore_index, inputs.chunk_bytes)
    return robust_loss_from_sequences(
        S, L, config=config, scores=inputs.scores, h_tilde=inputs.h_tilde, ref_logps=inputs.ref_logps,
        process_group=process_group,
    )
