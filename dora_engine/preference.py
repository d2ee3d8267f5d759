"""Preference statistics of a step and the data-parallel group they (and the loss) reduce over
(docs/design.md section 5.5; launch/README.md "What a run writes"): the engine's ``metrics.jsonl`` and the
trainer integrations' logs compute them here.

Names follow TRL: ``rewards/chosen|rejected|margins|accuracies`` and ``logps/chosen|rejected``, chosen and
rejected being the best and worst response of a prompt by score. The implicit reward is β·(S − S_ref) for a
loss with a reference and β·S/L (SimPO's length-normalised reward) for one without, β being the loss's
``beta`` (1 when it has none). ``robust/ess`` = 1/Σw² (the effective number of prompts) and
``robust/weight_max`` describe the strategy's distribution w over a batch (section 4.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dora_engine.losses import chosen_rejected, get_loss
from dora_engine.ops import DoRAOutput
from dora_engine.ops.distributed import data_parallel_group

__all__ = ["data_parallel_group", "preference_stats", "weight_moments", "weight_stats"]


def preference_stats(
    out: DoRAOutput, scores: torch.Tensor, ref_logps: torch.Tensor | None, loss: str, params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Per-prompt (B,) statistics of a step, detached, on the device of ``out`` (see the module docstring).
    The reward uses ``ref_logps`` (N,) when the loss has a reference and they are given."""
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


def weight_moments(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σw², max w) of the strategy's weights, as float64 device tensors (no host synchronisation)."""
    w = weights.detach().double()
    return (w * w).sum(), w.max()


def weight_stats(weights: torch.Tensor) -> dict[str, float]:
    """``robust/ess`` and ``robust/weight_max`` of the strategy's distribution over a whole batch."""
    sum_sq, top = weight_moments(weights)
    return {"robust/ess": float(1.0 / sum_sq), "robust/weight_max": float(top)}
