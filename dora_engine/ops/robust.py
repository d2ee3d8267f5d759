"""The fused per-batch stage: per-prompt loss, h̃ scaling and robust reduction (docs/design.md section 5).

Stage (2a) ``prompt_loss`` gives ℓ_b and ∂ℓ_b/∂S_n; stage (2b) ``robust_reduce`` gives the strategy's loss,
weights and ∂ℒ/∂ℓ_b; ``batch_stage`` is both in one kernel call. The math lives in the C++ header
``csrc/include/dora_math.h`` and in ``dora_engine.losses``; this module only calls the kernels.

Data parallel: with a process group the ℓ_b and h̃_b of every rank are all-gathered, the reduction runs on
the global batch (identical on every rank), and each rank keeps ∂ℒ/∂ℓ of its own prompts times the world
size, so that DeepSpeed's gradient averaging yields the gradient of the global loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dora_engine.ops.builder import load_ops
from dora_engine.ops.distributed import gather_uneven
from dora_engine.ops.output import DoRAOutput
from dora_engine.ops.validation import LossCall

_kernels = load_ops()  # importing the fused backend builds or loads the extension (OpLoadError otherwise)


def robust_reduce(
    ell: torch.Tensor, h: torch.Tensor | None, code: int, lam: float, process_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ℒ, weights, ∂ℒ/∂ℓ) of strategy ``code`` over ``ell``; with ``process_group`` over all ranks' prompts,
    returning this rank's slice of the weights and of ∂ℒ/∂ℓ (the latter × world size)."""
    if process_group is None:
        return _kernels.robust_reduce(ell, h, code, lam)
    if h is None:
        ell_all, offset, world = gather_uneven(ell, process_group)
        h_all = None
    else:  # one exchange for both (``robust_loss`` gives them one dtype)
        both, offset, world = gather_uneven(torch.stack([ell, h]), process_group)
        ell_all, h_all = both[0], both[1]
    loss, weights, grad = _kernels.robust_reduce(ell_all, h_all, code, lam)
    mine = slice(offset, offset + ell.numel())
    return loss, weights[mine], grad[mine] * world


class _RobustLoss(torch.autograd.Function):
    """Stages (2a)-(2b) on S: returns (ℒ, ℓ, weights); only ℒ is differentiable, ∂ℒ/∂S = gS."""

    @staticmethod
    def forward(ctx, S, L, S_ref, scores, h, loss_code: int, params: list[float], strategy_code: int, lam: float,
                process_group):
        if process_group is None:
            loss, ell, weights, gS = _kernels.batch_stage(S, L, S_ref, scores, h, loss_code, params, strategy_code, lam)
        else:
            ell, dell_dS = _kernels.prompt_loss(S, L, S_ref, scores, loss_code, params)
            loss, weights, dloss_dell = robust_reduce(ell, h, strategy_code, lam, process_group)
            gS = dloss_dell.repeat_interleave(scores.shape[1]) * dell_dS
        ctx.save_for_backward(gS)
        ctx.mark_non_differentiable(ell, weights)
        return loss, ell, weights

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ell, _grad_weights):
        (gS,) = ctx.saved_tensors
        return grad_loss * gS, None, None, None, None, None, None, None, None, None


def robust_loss(S: torch.Tensor, L: torch.Tensor, call: LossCall) -> DoRAOutput:
    """Stages (2a)-(2b) on per-sequence S, L (N,) through the stage kernels; differentiable in S."""
    dtype = S.dtype

    def prepared(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().to(dtype).contiguous()

    o = call.objective
    loss, ell, weights = _RobustLoss.apply(
        S, L.detach().to(dtype), prepared(call.ref_logps), prepared(call.scores), prepared(call.h_tilde),
        o.loss.code, o.encoded_params, o.strategy.code, o.lam, call.process_group,
    )
    return DoRAOutput(loss, ell, S.detach(), L.detach(), weights)
