"""The result types of the DoRA op and of the fused-linear NLL (docs/design.md section 5)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DoRAOutput(NamedTuple):
    """Result of ``dora_loss`` / ``dora_loss_linear``. Only ``loss`` carries gradient.

    loss: scalar robust objective; per_sample_loss (B,) ℓ_b; seq_logps (N,) S; seq_lens (N,) L;
    weights (B,) the strategy's distribution over prompts (with a process group: this rank's slice of
    the global distribution, which sums to 1 over all ranks).
    """

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    seq_logps: torch.Tensor
    seq_lens: torch.Tensor
    weights: torch.Tensor


class NLLOutput(NamedTuple):
    """Result of ``nll_linear``. Only ``loss`` carries gradient.

    loss: scalar −Σ_n S[n], the negative log-likelihood summed over the scored tokens (÷ Σ_n L[n]: the token
    mean); seq_logps (N,) S; seq_lens (N,) L.
    """

    loss: torch.Tensor
    seq_logps: torch.Tensor
    seq_lens: torch.Tensor

    @classmethod
    def of(cls, S: torch.Tensor, L: torch.Tensor) -> NLLOutput:
        """The summed NLL of per-row (S, L) whose S carries gradient."""
        return cls(-S.sum(), S.detach(), L.detach())
