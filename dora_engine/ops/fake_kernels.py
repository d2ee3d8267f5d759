"""Fake (meta) kernels of the extension's ops, for torch.compile and ``torch.library.opcheck``.

They give each output's shape and dtype without computing it (schemas in csrc/bindings.cpp). Imported
by ``builder.load_ops`` once the library has registered the ops.
"""

from __future__ import annotations

import torch

from dora_engine.ops.validation import accumulation_dtype


@torch.library.register_fake("dora_engine::seq_logprobs_fwd")
def _seq_logprobs_fwd(logits, labels, ignore_index):
    N, T, _ = logits.shape
    acc = accumulation_dtype(logits.dtype)
    # lse: each token's (row max m, log Σ e^(z − m)), csrc/include/dora_math.h's RowNormaliser
    return logits.new_empty(N, dtype=acc), logits.new_empty(N, dtype=acc), logits.new_empty(N, T, 2, dtype=acc)


@torch.library.register_fake("dora_engine::seq_logprobs_bwd")
def _seq_logprobs_bwd(logits, labels, lse, gS, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("dora_engine::seq_logprobs_bwd_")
def _seq_logprobs_bwd_inplace(logits, labels, lse, gS, ignore_index):
    return None


@torch.library.register_fake("dora_engine::prompt_loss")
def _prompt_loss(S, L, S_ref, scores, loss_code, params):
    return S.new_empty(scores.shape[0]), S.new_empty(S.shape[0])


@torch.library.register_fake("dora_engine::robust_reduce")
def _robust_reduce(ell, h, strategy_code, lam):
    return ell.new_empty(()), torch.empty_like(ell), torch.empty_like(ell)


@torch.library.register_fake("dora_engine::batch_stage")
def _batch_stage(S, L, S_ref, scores, h, loss_code, params, strategy_code, lam):
    B = scores.shape[0]
    return S.new_empty(()), S.new_empty(B), S.new_empty(B), torch.empty_like(S)


@torch.library.register_fake("dora_engine::rescale_")
def _rescale_inplace(x, factor):
    return None
