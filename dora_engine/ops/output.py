"""The result type of the DoRA op (docs/design.md section 5)."""

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
