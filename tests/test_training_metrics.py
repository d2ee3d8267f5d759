"""Per-step alignment statistics against values written out by hand."""

from __future__ import annotations

import pytest
import torch

from dora_engine.ops import DoRAOutput
from dora_engine.training.metrics import align_stats
from dora_engine.training.model import StepOutput


def _step(seq_logps: list[float], seq_lens: list[int], weights: list[float]) -> StepOutput:
    S, L = torch.tensor(seq_logps), torch.tensor(seq_lens)
    out = DoRAOutput(torch.tensor(0.0), torch.zeros(len(weights)), S, L, torch.tensor(weights))
    return StepOutput(torch.tensor(0.0), torch.tensor(0.0), S, L, out)


def test_align_stats_picks_best_and_worst_by_score():
    # prompt 0: best is response 2, worst response 1
    # prompt 1: the scores tie at the top, and the tie goes to list order: best is response 0, worst response 2
    step = _step([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], [1, 2, 4, 1, 1, 2], [0.25, 0.75])
    batch = {"scores": torch.tensor([[0.5, 0.1, 0.9], [2.0, 2.0, 1.0]]), "h_tilde": torch.tensor([1.5, 0.5])}

    simpo = align_stats(step, batch, "simpo", {"beta": 2.0})  # reward β·S/L, no reference
    chosen, rejected = 2.0 * -3.0 / 4 + 2.0 * -4.0 / 1, 2.0 * -2.0 / 2 + 2.0 * -6.0 / 2
    sums = simpo["sums"]
    assert sums["rewards/chosen"].item() == pytest.approx(chosen)
    assert sums["rewards/rejected"].item() == pytest.approx(rejected)
    assert sums["rewards/margins"].item() == pytest.approx(chosen - rejected)
    assert sums["rewards/accuracies"].item() == 1.0  # prompt 0 only: -1.5 > -2, but -8 < -6
    assert sums["logps/chosen"].item() == pytest.approx(-3.0 + -4.0)
    assert sums["logps/rejected"].item() == pytest.approx(-2.0 + -6.0)
    assert sums["h_tilde/mean"].item() == pytest.approx(2.0)
    assert simpo["count"] == 2
    assert simpo["w_sq"].item() == pytest.approx(0.25**2 + 0.75**2) and simpo["w_max"].item() == 0.75

    batch["ref_logps"] = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -7.0])
    dpo = align_stats(step, batch, "dpo", {"beta": 0.5})  # reward β·(S − S_ref)
    assert dpo["sums"]["rewards/chosen"].item() == pytest.approx(0.5 * (-2.0 + -3.0))
    assert dpo["sums"]["rewards/rejected"].item() == pytest.approx(0.5 * (-1.0 + 1.0))
    assert dpo["sums"]["rewards/accuracies"].item() == 0.0
