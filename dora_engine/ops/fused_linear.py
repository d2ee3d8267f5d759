"""Fused-linear primitives of the fused backend: hidden states and lm_head weight, one chunk of logits at a time.

docs/design.md section 5, "Fused-linear"; ``dora_engine.ops.dora_loss_linear`` validates and calls these. The
logits z = hidden @ weightᵀ + bias of the N = B·K rows are never held at once, and only the token rows with a
label (not ``ignore_index``: ``_ScoredRows``) take any, so a prompt's tokens and padding cost no GEMM; finding
them is each call's one host synchronisation. Per chunk, the extension's row kernels give S, L and the
per-token log-sum-exp (``seq_logprobs_fwd``) and write dz = gS[n]·(onehot(y) − softmax(z)) over the chunk's
logits in place (``seq_logprobs_bwd_``); the stage kernels give ℓ_b with ∂ℓ_b/∂S
(``prompt_loss``) and the robust reduction with ∂ℒ/∂ℓ_b (``robust_reduce``). The loss math lives in those
kernels and the registry of ``dora_engine.losses`` only; this module schedules GEMMs and rescales.

``mode="single_pass"`` (3 GEMMs, nothing recomputed): chunks of whole prompts, as many as fit ``chunk_bytes``
(at least one: a prompt is never cut, so a chunk holds at least one prompt's scored rows). Per chunk: logits
GEMM, row pass, ℓ_b of its prompts, dz in place, then d hidden = dz @ W and d weight += dzᵀ @ hidden. The
gradient accumulators always hold the gradient of the robust objective over the prompts seen so far, ℒ_seen. A
new chunk changes ℒ_seen, and with it ∂ℒ_seen/∂ℓ_i of every earlier prompt i by one common factor r
(dro/dora/drdpo: exp((M_old − M_new)/λ)·Z_old/Z_new, the online-softmax rescale; erm/reweight: B_old/B_new),
read off the stage kernel's gradients as r = g_new[i]/g_old[i] at the earlier prompt with the largest g_old
(never 0). r stays on the device (no host synchronisation per chunk): the weight and bias accumulators hold
their gradient divided by a running unit u (u ← u·r per chunk), each chunk's dz is formed divided by u
(through its gS, at no cost), and only when u would fall below a floor (dz/u must not overflow) are the
accumulators multiplied by u and u reset to 1, by a kernel that does nothing when the factor is 1
(``rescale_``); the last u goes into the final scale. d hidden of each chunk is scaled once, in backward
together with grad_output, by g_final/g_then. g_final comes from the reduction over all ranks' prompts when a
process group is given (the per-prompt local gradients are exact, only the strategy's weights are global), ×
world size because DeepSpeed averages gradients. Forward forms every gradient; backward only scales them by
grad_output.

``mode="recompute"`` (4 GEMMs, least memory): forward keeps only the scored rows' log-sum-exp, chunked in
tokens (down to one token); backward recomputes each chunk's logits.

``nll_linear(mode="single_pass")`` (the summed NLL −Σ S of SFT, 3 GEMMs): the token chunks of ``recompute``'s
forward (``_token_pass``), each chunk's dz formed at once with gS = −1 and its gradients taken as above. No
token's gradient depends on another's, so nothing is rescaled; backward scales them by grad_output.

Weight/bias gradients accumulate in fp32 (float64 for float64 inputs; where torch's mixed-dtype addmm works,
probed once per device type and dtype by ``mixed_addmm_works``, a bf16/fp16 GEMM writes straight into the fp32
accumulator) and are cast to the parameter's dtype once at the end.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from dora_engine.ops.builder import load_ops
from dora_engine.ops.chunking import group_spans, spans, tokens_per_chunk
from dora_engine.ops.output import DoRAOutput, NLLOutput
from dora_engine.ops.robust import robust_reduce
from dora_engine.ops.validation import LossCall, accumulation_dtype

_kernels = load_ops()

#: Whether ``addmm(..., out_dtype=fp32, out=acc)`` works, by (device type, operand dtype): ``mixed_addmm_works``.
_MIXED_ADDMM: dict[tuple[str, torch.dtype], bool] = {}


# --------------------------------------------------------------------------------------------------
# Stage (2a)-(2b) through the stage kernels
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LossInputs:
    """A validated ``dora_loss_linear`` call (its per-prompt tensors detached, in the accumulation dtype, h̃
    filled with ones where absent) or ``nll_linear`` call (``call`` None), minus the tensors that receive
    gradients."""

    labels: torch.Tensor
    ignore_index: int
    call: LossCall | None
    chunk_bytes: int
    needs_grad: tuple[bool, bool, bool]  # hidden, weight, bias


def _needs_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, bool, bool]:
    """Which of hidden, weight and bias receive a gradient from a call made now."""
    grad_on = torch.is_grad_enabled()
    return tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))


def _prompt_loss(S: torch.Tensor, L: torch.Tensor, p: _LossInputs, prompts: slice) -> tuple:
    """ℓ_b (B_c,) and ∂ℓ_b/∂S_n (N_c,) of the prompts in ``prompts`` (stage 2a)."""
    call = p.call
    K = call.num_responses
    rows = slice(prompts.start * K, prompts.stop * K)
    ref = None if call.ref_logps is None else call.ref_logps[rows]
    o = call.objective
    return _kernels.prompt_loss(S[rows], L[rows], ref, call.scores[prompts], o.loss.code, o.encoded_params)


def _robust_reduce(ell: torch.Tensor, h: torch.Tensor, p: _LossInputs, *, global_batch: bool) -> tuple:
    """(ℒ, weights, ∂ℒ/∂ℓ) of the strategy (stage 2b); over all ranks' prompts with ``global_batch``."""
    group = p.call.process_group if global_batch else None
    return robust_reduce(ell, h, p.call.objective.strategy.code, p.call.objective.lam, group)


# --------------------------------------------------------------------------------------------------
# GEMM helpers
# --------------------------------------------------------------------------------------------------


def mixed_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` with ``a``, ``b`` of ``dtype`` and an fp32
    ``acc`` gives the right numbers on ``device``'s type; probed once per (device type, dtype) on 2×2 operands.

    The overload exists from torch 2.8, but which kernels serve it varies: no CPU kernel, and torch 2.8/2.9's
    CUDA kernel requires ``acc`` in the operands' dtype. So its existence is not enough; a failing probe
    means the caller takes the other path.
    """
    key = (device.type, dtype)
    if key not in _MIXED_ADDMM:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device).to(dtype)
        acc = torch.ones(2, 2, device=device)
        try:
            torch.addmm(acc, a.t(), a, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM[key] = torch.equal(acc.cpu(), torch.tensor([[11.0, 15.0], [15.0, 21.0]]))
        except (RuntimeError, NotImplementedError, TypeError):  # no such overload, or no kernel for these types
            _MIXED_ADDMM[key] = False
    return _MIXED_ADDMM[key]


def _accumulate_weight_grad(acc: torch.Tensor, dz: torch.Tensor, x: torch.Tensor) -> None:
    """acc ← acc + dzᵀ @ x, with acc in the accumulation dtype (fp32 for bf16/fp16 operands)."""
    if dz.dtype == acc.dtype:
        torch.addmm(acc, dz.t(), x, out=acc)
    elif mixed_addmm_works(acc.device, dz.dtype):
        torch.addmm(acc, dz.t(), x, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype GEMM here (CPU, older torch): one low-precision product per chunk, summed in fp32
        acc.add_(dz.t() @ x)


def _linear_into(
    buffer: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (n, H) @ weightᵀ + bias written over the first n rows of ``buffer`` (one buffer serves every chunk)."""
    out = buffer[: x.shape[0]]
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


@dataclass(frozen=True)
class _ScoredRows:
    """The token rows of hidden (N, T, H) whose label is not ``ignore_index``, in order: every GEMM of the
    fused-linear path runs on these rows only, so prompt tokens and padding cost no logits."""

    index: torch.Tensor  # (n,) positions in the N·T rows, ascending
    x: torch.Tensor  # (n, H) their hidden states (a copy)
    labels: torch.Tensor  # (n, 1) their labels, each token its own length-1 row for the row kernels
    T: int

    @classmethod
    def of(cls, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, group: int = 1
           ) -> tuple[_ScoredRows, torch.Tensor, list[int]]:
        """The scored rows, L (N,) the number in each sequence (on the device), and their number in each
        group of ``group`` consecutive sequences: the call's one host synchronisation (it sizes the chunks)."""
        N, T, H = hidden.shape
        mask = (labels != ignore_index).reshape(-1)
        lengths = mask.view(N, T).sum(dim=1)
        counts = lengths.view(N // group, group).sum(dim=1).tolist()
        # A stable sort puts the scored rows first, in order, without a second synchronisation (nonzero's).
        index = torch.argsort((~mask).to(torch.uint8), stable=True)[: sum(counts)]
        return cls.at(index, hidden, labels), lengths, counts

    @classmethod
    def at(cls, index: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> _ScoredRows:
        """The rows of hidden and labels at ``index`` (a backward's, from its forward's)."""
        N, T, H = hidden.shape
        return cls(index, hidden.reshape(N * T, H).index_select(0, index),
                   labels.reshape(N * T, 1).index_select(0, index), T)

    def sequence_sums(self, values: torch.Tensor, sequences: slice, rows: slice) -> torch.Tensor:
        """Σ of ``values`` (one per scored row in ``rows``) over each sequence in ``sequences``, summed over
        its T positions as a dense row sum would (0 where nothing is scored)."""
        dense = values.new_zeros((sequences.stop - sequences.start) * self.T)
        dense.index_copy_(0, self.index[rows] - sequences.start * self.T, values)
        return dense.view(-1, self.T).sum(dim=1)


@dataclass
class _Gradients:
    """The gradient buffers of one fused-linear pass, None where no gradient is wanted: d hidden (N·T, H) in
    hidden's dtype (0 at rows without a label), d weight (V, H) and d bias (V,) accumulated in the
    accumulation dtype."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def allocate(cls, hidden: torch.Tensor, weight: torch.Tensor, needs_grad: tuple[bool, bool, bool]) -> _Gradients:
        need_hidden, need_weight, need_bias = needs_grad
        N, T, H = hidden.shape
        acc, device = accumulation_dtype(hidden.dtype), hidden.device
        return cls(
            hidden.new_zeros(N * T, H) if need_hidden else None,
            torch.zeros(weight.shape, dtype=acc, device=device) if need_weight else None,
            torch.zeros(weight.shape[0], dtype=acc, device=device) if need_bias else None,
        )

    @property
    def wanted(self) -> bool:
        return any(g is not None for g in (self.hidden, self.weight, self.bias))

    def add_chunk(
        self, logits: torch.Tensor, gS: torch.Tensor, lse: torch.Tensor, ignore_index: int, weight: torch.Tensor,
        scored: _ScoredRows, rows: slice,
    ) -> None:
        """The share of the scored rows ``rows``, whose logits ``logits`` holds: dz = gS[n]·(onehot(y) −
        softmax(z)) written over them, then d hidden[their positions] = dz @ W, d W += dzᵀ @ x and
        d b += Σ_rows dz."""
        _kernels.seq_logprobs_bwd_(logits, scored.labels[rows], lse, gS, ignore_index)
        dz = logits.view(-1, logits.shape[-1])
        if self.hidden is not None:
            self.hidden.index_copy_(0, scored.index[rows], dz @ weight)
        if self.weight is not None:
            _accumulate_weight_grad(self.weight, dz, scored.x[rows])
        if self.bias is not None:
            self.bias.add_(dz.sum(dim=0, dtype=self.bias.dtype))

    def rescale_(self, factor: torch.Tensor) -> None:
        """d weight and d bias ← factor · themselves (nothing read or written where factor is 1)."""
        for accumulator in (self.weight, self.bias):
            if accumulator is not None:
                _kernels.rescale_(accumulator, factor)

    def returned(self, shape: torch.Size, dtype: torch.dtype) -> tuple:
        """(d hidden of ``shape``, d weight, d bias in the parameters' ``dtype``) as backward returns them."""
        return (
            None if self.hidden is None else self.hidden.view(shape),
            None if self.weight is None else self.weight.to(dtype),
            None if self.bias is None else self.bias.to(dtype),
        )


def _token_pass(
    scored: _ScoredRows, N: int, weight: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
    chunk_bytes: int, grads: _Gradients | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S (N,) of the scored rows' hidden @ weightᵀ + bias in chunks of ``tokens_per_chunk`` rows (a chunk may
    end anywhere inside a sequence), one logits GEMM per chunk into one reused buffer. Without ``grads`` it
    also returns the scored rows' log-sum-exp (n, 1, 2) for a backward that recomputes the logits
    (``recompute``); with them each chunk's gradient of the summed NLL −Σ S (gS = −1) goes straight into
    ``grads`` (3 GEMMs per chunk, ``nll_linear``'s single pass) and nothing is kept."""
    n = scored.x.shape[0]
    acc = accumulation_dtype(scored.x.dtype)
    token_lp = scored.x.new_empty(n, dtype=acc)
    lse = scored.x.new_empty(n, 1, 2, dtype=acc) if grads is None else None  # seq_logprobs_fwd's (m, log s)
    per_chunk = tokens_per_chunk(chunk_bytes, weight.shape[0], scored.x.element_size())
    buffer = scored.x.new_empty(min(n, per_chunk), weight.shape[0])
    minus_one = None if grads is None else scored.x.new_full((min(n, per_chunk),), -1.0, dtype=acc)  # ∂(−Σ S)/∂S
    for t0, t1 in spans(n, per_chunk):
        logits = _linear_into(buffer, scored.x[t0:t1], weight, bias).unsqueeze(1)
        token_lp[t0:t1], _, chunk_lse = _kernels.seq_logprobs_fwd(logits, scored.labels[t0:t1], ignore_index)
        if grads is None:
            lse[t0:t1] = chunk_lse
        elif grads.wanted:
            grads.add_chunk(logits, minus_one[: t1 - t0], chunk_lse, ignore_index, weight, scored, slice(t0, t1))
    return scored.sequence_sums(token_lp, slice(0, N), slice(0, n)), lse


def _common_ratio(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new[i]/old[i] at the largest old[i]: the factor relating two proportional gradient vectors, as a 0-dim
    tensor on their device (no host synchronisation)."""
    i = old.argmax().view(1)
    return (new.index_select(0, i) / old.index_select(0, i)).squeeze(0)


#: The single-pass accumulators hold gradient / u; dz is formed divided by u, so 1/u is kept below 1/floor.
#: fp16 holds at most 65504: its accumulators are renormalised whenever u drops below 1.
_UNIT_FLOOR = {torch.float16: 1.0}
_DEFAULT_UNIT_FLOOR = 2.0**-64


# --------------------------------------------------------------------------------------------------
# mode="single_pass"
# --------------------------------------------------------------------------------------------------


def _single_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: _LossInputs):
    """Loss, statistics and the (unscaled) gradients in one pass over chunks of whole prompts (their scored
    rows): 3 GEMMs per chunk."""
    N, T, H = hidden.shape
    K, B = p.call.num_responses, p.call.num_prompts
    acc = accumulation_dtype(hidden.dtype)
    scored, lengths, counts = _ScoredRows.of(hidden, p.labels, p.ignore_index, group=K)
    grads = _Gradients.allocate(hidden, weight, p.needs_grad)
    S = hidden.new_zeros(N, dtype=acc)
    L = lengths.to(acc)
    ell = hidden.new_empty(B, dtype=acc)

    chunks = group_spans(counts, tokens_per_chunk(p.chunk_bytes, weight.shape[0], hidden.element_size()))
    offsets = [0, *itertools.accumulate(counts)]
    buffer = hidden.new_empty(max(offsets[p1] - offsets[p0] for p0, p1 in chunks), weight.shape[0])
    # Per chunk: its prompt with the largest ∂ℒ_seen/∂ℓ and that value then, divided by the unit then.
    tops, thens = [], []
    grad_seen = None
    unit = torch.ones((), dtype=acc, device=hidden.device)  # the weight and bias accumulators hold grad / unit
    floor = _UNIT_FLOOR.get(hidden.dtype, _DEFAULT_UNIT_FLOOR)
    for p0, p1 in chunks:
        prompts, sequences, rows = slice(p0, p1), slice(p0 * K, p1 * K), slice(offsets[p0], offsets[p1])
        scored_here = rows.stop > rows.start  # else nothing is scored in these prompts: S = 0, no gradient
        if scored_here:
            logits = _linear_into(buffer, scored.x[rows], weight, bias).unsqueeze(1)
            token_lp, _, lse = _kernels.seq_logprobs_fwd(logits, scored.labels[rows], p.ignore_index)
            S[sequences] = scored.sequence_sums(token_lp, sequences, rows)
        ell[prompts], dell_dS = _prompt_loss(S, L, p, prompts)
        if not grads.wanted:
            continue
        _, _, grad_now = _robust_reduce(ell[:p1], p.call.h_tilde[:p1], p, global_batch=False)
        if grad_seen is not None:
            # Every earlier prompt's ∂ℒ_seen/∂ℓ is now r times what the accumulators were formed with.
            unit = unit * _common_ratio(grad_now[:p0], grad_seen)
            low = unit < floor
            grads.rescale_(torch.where(low, unit, torch.ones_like(unit)))  # 1: rescale_ leaves them untouched
            unit = torch.where(low, torch.ones_like(unit), unit)
        top = grad_now[prompts].argmax().view(1) + p0
        tops.append(top)
        thens.append(grad_now.index_select(0, top) / unit)
        if scored_here:
            gS = (grad_now[prompts] / unit).repeat_interleave(K) * dell_dS  # dz is formed divided by the unit
            gS_rows = gS.index_select(0, scored.index[rows] // T - sequences.start)
            grads.add_chunk(logits, gS_rows, lse, p.ignore_index, weight, scored, rows)
        grad_seen = grad_now

    loss, weights, grad_final = _robust_reduce(ell, p.call.h_tilde, p, global_batch=True)
    scales = _GradScales()
    if grads.wanted:
        scales.params = _common_ratio(grad_final, grad_seen) * unit
        then = torch.cat(thens)
        final = grad_final.index_select(0, torch.cat(tops))
        # then = 0: the chunk's weights underflowed against earlier prompts; its gradient is already 0.
        chunk_scale = torch.where(then > 0, final / then, torch.zeros_like(then))
        scales.prompts = chunk_scale.new_empty(B)
        for c, (p0, p1) in enumerate(chunks):
            scales.prompts[p0:p1] = chunk_scale[c]  # on the device: no host synchronisation
    return DoRAOutput(loss, ell, S, L, weights), grads, scales


def _single_pass_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: _LossInputs):
    """The summed NLL −Σ S, the statistics and the gradients in one pass over token chunks (``_token_pass``):
    3 GEMMs per chunk. No token's gradient depends on another's, so nothing is rescaled."""
    scored, lengths, _ = _ScoredRows.of(hidden, p.labels, p.ignore_index)
    grads = _Gradients.allocate(hidden, weight, p.needs_grad)
    S, _ = _token_pass(scored, hidden.shape[0], weight, bias, p.ignore_index, p.chunk_bytes, grads)
    return NLLOutput(-S.sum(), S, lengths.to(S.dtype)), grads, _GradScales(params=1.0)


@dataclass
class _GradScales:
    """What turns single_pass's accumulated gradients into those of the final loss (applied in backward)."""

    params: torch.Tensor | float = 0.0  # weight and bias (a 0-dim tensor on the inputs' device)
    prompts: torch.Tensor | None = None  # (B,) d hidden of each prompt's rows; None: 1 for every row


class _SinglePass(torch.autograd.Function):
    """Gradients are formed in forward by ``run`` (``_single_pass`` or ``_single_pass_nll``: nothing is
    recomputed) and scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, run, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: _LossInputs):
        stats, grads, scales = run(hidden, weight, bias, p)
        ctx.grads, ctx.scales = grads, scales
        ctx.shape, ctx.param_dtype = hidden.shape, weight.dtype
        ctx.mark_non_differentiable(*stats[1:])
        return tuple(stats)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_unused):
        if ctx.grads is None:
            raise RuntimeError(
                "mode='single_pass' forms its gradients once and cannot be backpropagated twice (retain_graph); "
                "use mode='recompute'"
            )
        grads, scales = ctx.grads, ctx.scales
        ctx.grads = None
        if grads.hidden is not None:
            if scales.prompts is None:
                grads.hidden.mul_(grad_loss)
            else:
                grads.hidden.view(scales.prompts.numel(), -1).mul_((scales.prompts * grad_loss)[:, None])
        for accumulator in (grads.weight, grads.bias):
            if accumulator is not None:
                accumulator.mul_(grad_loss * scales.params)
        return None, *grads.returned(ctx.shape, ctx.param_dtype), None


# --------------------------------------------------------------------------------------------------
# mode="recompute" and sequence_logprobs_linear
# --------------------------------------------------------------------------------------------------


class _LinearSequenceLogprobs(torch.autograd.Function):
    """(S, L) of hidden @ Wᵀ + b in token chunks of the scored rows; keeps their log-sum-exp, recomputes
    the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_bytes: int):
        scored, lengths, _ = _ScoredRows.of(hidden, labels, ignore_index)
        S, lse = _token_pass(scored, hidden.shape[0], weight, bias, ignore_index, chunk_bytes, None)
        L = lengths.to(S.dtype)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, scored.index)
        ctx.ignore_index, ctx.chunk_bytes = ignore_index, chunk_bytes
        ctx.mark_non_differentiable(L)
        return S, L

    @staticmethod
    def backward(ctx, grad_S: torch.Tensor, _grad_L):
        hidden, weight, bias, labels, lse, index = ctx.saved_tensors
        scored = _ScoredRows.at(index, hidden, labels)
        n = index.shape[0]
        grad_rows = grad_S.to(lse.dtype).index_select(0, index // scored.T)
        grads = _Gradients.allocate(hidden, weight, ctx.needs_input_grad[:3])
        per_chunk = tokens_per_chunk(ctx.chunk_bytes, weight.shape[0], hidden.element_size())
        buffer = hidden.new_empty(min(n, per_chunk), weight.shape[0])
        for t0, t1 in spans(n, per_chunk):
            logits = _linear_into(buffer, scored.x[t0:t1], weight, bias).unsqueeze(1)
            grads.add_chunk(logits, grad_rows[t0:t1], lse[t0:t1], ctx.ignore_index, weight, scored, slice(t0, t1))
        return *grads.returned(hidden.shape, weight.dtype), None, None, None


# --------------------------------------------------------------------------------------------------
# Primitives of the fused backend (composed by dora_engine.ops)
# --------------------------------------------------------------------------------------------------


def linear_row_pass(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, L) of hidden @ weightᵀ + bias in token chunks of ``chunk_bytes`` logits; backward recomputes
    each chunk (4 GEMMs in all)."""
    return _LinearSequenceLogprobs.apply(hidden.contiguous(), weight, bias, labels, ignore_index, chunk_bytes)


def single_pass_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    chunk_bytes: int, call: LossCall,
) -> DoRAOutput:
    """``dora_loss_linear(mode="single_pass")``: chunks of whole prompts, 3 GEMMs each, gradients formed in
    forward and scaled by grad_output in backward."""
    acc = accumulation_dtype(hidden.dtype)
    prepared = replace(
        call,
        scores=call.scores.detach().to(acc),
        h_tilde=torch.ones(call.num_prompts, dtype=acc, device=hidden.device)
        if call.h_tilde is None else call.h_tilde.detach().to(acc),
        ref_logps=None if call.ref_logps is None else call.ref_logps.detach().to(acc),
    )
    inputs = _LossInputs(labels, ignore_index, prepared, chunk_bytes, _needs_grad(hidden, weight, bias))
    return DoRAOutput(*_SinglePass.apply(_single_pass, hidden.contiguous(), weight, bias, inputs))


def single_pass_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int,
    chunk_bytes: int,
) -> NLLOutput:
    """``nll_linear(mode="single_pass")``: token chunks, 3 GEMMs each, gradients formed in forward and
    scaled by grad_output in backward."""
    inputs = _LossInputs(labels, ignore_index, None, chunk_bytes, _needs_grad(hidden, weight, bias))
    return NLLOutput(*_SinglePass.apply(_single_pass_nll, hidden.contiguous(), weight, bias, inputs))
