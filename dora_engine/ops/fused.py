"""Fused backend of the op: autograd functions over the C++/CUDA kernels (docs/design.md section 5).

Primitives only; ``dora_engine.ops`` validates the inputs and composes them. Importing this module loads
the extension (``builder.load_ops``) and raises ``OpLoadError`` when it cannot; the front door also asks
``builder.check_kernels_for`` whether the extension has kernels for the inputs' device before it chooses this
backend (the one place that checks). The ``"auto"`` backend turns either into one warning and the reference.

Row pass: forward gives S, L and the per-token log-sum-exp, saved as the pair (row max m, log Σ e^(z − m))
(N, T, 2) so that the backward's softmax is exact at any magnitude of the logits; backward is
dz = g[n]·(onehot(y) − softmax(z)).
The kernels take any row strides with a unit stride over the vocabulary, so the logits, or a view such as
``logits[:, :-1]``, are read in place and saved for backward as they are: nothing is copied (only a view
whose vocabulary dimension is strided is copied, once, by the kernels). The backward allocates one N×T×V
gradient, or none with ``inplace_backward``: the gradient then overwrites the logits (a view too, as long
as its rows do not overlap), for callers that do not need them after the loss (the usual case: logits
straight out of the lm_head). The per-batch stage is ``dora_engine.ops.robust``, the fused-linear chunk
loops ``dora_engine.ops.fused_linear``.

torch.compile: the ops have fake kernels (``fake_kernels``), so these functions trace without a graph
break when the front door is called with ``validate=False``.
"""

from __future__ import annotations

import torch

from dora_engine.ops.builder import load_ops
from dora_engine.ops.contract import overwritable, read_contract
from dora_engine.ops.fused_linear import linear_row_pass, single_pass_loss, single_pass_nll
from dora_engine.ops.robust import robust_loss

__all__ = ["MAX_RESPONSES", "linear_row_pass", "robust_loss", "row_pass", "single_pass_loss", "single_pass_nll"]

_kernels = load_ops()

#: Responses per prompt the C++ per-batch stage handles, as the extension reports it (``kMaxResponses`` in
#: csrc/include/dora_math.h).
MAX_RESPONSES = read_contract(_kernels).max_responses


class _SequenceLogprobs(torch.autograd.Function):
    """(S, L) from the logits; S is differentiable, its backward is the backward row pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool):
        S, L, lse = _kernels.seq_logprobs_fwd(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(L)
        return S, L

    @staticmethod
    def backward(ctx, grad_S: torch.Tensor, _grad_L: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        gS = grad_S.to(lse.dtype).contiguous()
        if ctx.inplace_backward and overwritable(logits):
            _kernels.seq_logprobs_bwd_(logits, labels, lse, gS, ctx.ignore_index)
            return logits, None, None, None
        return _kernels.seq_logprobs_bwd(logits, labels, lse, gS, ctx.ignore_index), None, None, None


def row_pass(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inplace_backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """S[n] = Σ_t lp[n, t], L[n] = #valid t (N,) in the accumulation dtype; S = L = 0 for rows without a
    valid token. ``inplace_backward``: the backward overwrites ``logits`` with their gradient when they allow it
    (``overwritable``), else allocates it."""
    return _SequenceLogprobs.apply(logits, labels, ignore_index, inplace_backward)
