"""What the trainer integrations share: the data-parallel group and the per-prompt statistics they log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.losses import chosen_rejected, get_loss
from dora_engine.ops import DoRAOutput


def data_parallel_group() -> dist.ProcessGroup | None:
    """The world group when several processes train (the robust reduction then spans every rank's prompts,
    docs/design.md section 5.5), else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def preference_stats(
    out: DoRAOutput, scores: torch.Tensor, ref_logps: torch.Tensor | None, loss: str, params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Per-prompt (B,) statistics under TRL's names, detached: ``rewards/chosen|rejected|margins|accuracies``
    and ``logps/chosen|rejected``, chosen/rejected being the best/worst response by score. Rewards are
    β·(S − S_ref) for a loss with a reference and β·S/L without (β = the loss's ``beta``, else 1), as in
    ``metrics.jsonl`` of the engine."""
    K = scores.shape[1]
    S = out.seq_logps.detach().view(-1, K)
    beta = float(params.get("beta", 1.0))
    if get_loss(loss).needs_reference and ref_logps is not None:
        reward = beta * (S - ref_logps.detach().to(S).view(-1, K))
    else:
        reward = beta * S / out.seq_lens.view(-1, K).clamp(min=1)
    chosen, rejected = chosen_rejected(reward, scores)
    logps_chosen, logps_rejected = chosen_rejected(S, scores)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(S.dtype),
        "logps/chosen": logps_chosen,
        "logps/rejected": logps_rejected,
    }


def weight_stats(weights: torch.Tensor) -> dict[str, float]:
    """``robust/ess`` (1/Σw², the effective number of prompts) and ``robust/weight_max`` of the strategy's
    distribution over a whole batch (docs/design.md section 4.3)."""
    w = weights.detach().double()
    return {"robust/ess": float(1.0 / (w * w).sum()), "robust/weight_max": float(w.max())}
