"""The fused row passes at huge logits (|logit| 1e4 … 1e10) against the float64 reference on the same input
values (docs/design.md section 5.3, "Magnitudes").

S is exact at any magnitude: token log-probs are formed as (z_y − m) − log Σ e^(z − m). The backward reads
the per-token log-sum-exp as stored in the accumulation dtype, so each softmax probability is off by at most
the factor e^(spacing(lse)/2): the gradients are held to the reference within that, and never exceed |g| in
any entry (no blow-up, whatever the magnitude).
"""

from __future__ import annotations

import pytest
import torch
from test_fused_op import DEVICES, TOLERANCE, assert_close

from dora_engine import ops

OFFSETS = [1e4, -1e4, 1e6, -1e6, 5e8, -5e8, 1e10, -1e10]
V = 301  # not a multiple of any vector width


def row_batch(offset: float, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 5, V) logits offset + 3·N(0, 1) in `dtype` (at 5e8 and beyond fp32 rounds most of a row to a few
    values: ties the reference resolves exactly) and labels anywhere in the row."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[1, 0] = -100
    return z.to(device), labels.to(device)


def fused_and_reference(z: torch.Tensor, labels: torch.Tensor):
    weights = torch.tensor([1.0, -0.5], dtype=torch.float64, device=z.device)
    results = []
    for backend, x in (("fused", z), ("reference", z.double())):
        logits = x.clone().requires_grad_(True)
        S, _ = ops.sequence_logprobs(logits, labels, backend=backend)
        (S.double() * weights).sum().backward()
        results.append((S, logits.grad))
    return results, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", OFFSETS)
def test_log_probs_match_the_reference_at_any_magnitude(device: str, dtype: torch.dtype, offset: float) -> None:
    z, labels = row_batch(offset, dtype, device)
    ((S, grad), (S_ref, grad_ref)), weights = fused_and_reference(z, labels)
    assert torch.isfinite(S).all()
    assert_close(S, S_ref, TOLERANCE[torch.float32], f"S at offset {offset:g}")
    # The gradient: finite, and no entry beyond |g| (a softmax probability is at most 1).
    g = weights.abs().view(2, 1, 1).to(grad.device)
    assert torch.isfinite(grad).all()
    assert (grad.double().abs() <= g * (1 + 1e-6)).all(), f"|d logits| > |g| at offset {offset:g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1e4, -1e4, 1e6, -1e6])
def test_gradients_within_the_rounding_of_the_stored_lse(device: str, dtype: torch.dtype, offset: float) -> None:
    z, labels = row_batch(offset, dtype, device)
    ((_, grad), (_, grad_ref)), weights = fused_and_reference(z, labels)
    lse = torch.logsumexp(z.double(), -1)
    # p·e^δ with |δ| ≤ spacing(lse)/2 of the fp32 lse, plus fp32's own rounding (TOLERANCE) on top.
    spacing = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(lse.abs())))
    p = torch.softmax(z.double(), -1)
    g = weights.view(2, 1, 1).to(z.device)
    bound = g.abs() * p * torch.expm1(spacing / 2).unsqueeze(-1) + TOLERANCE[torch.float32] * g.abs()
    error = (grad.double() - grad_ref.double()).abs()
    if dtype == torch.bfloat16:  # the gradient itself is rounded to bf16
        bound = bound + grad_ref.double().abs() * 2.0**-8
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item():.3g} at offset {offset:g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [-5e8, -1e10])
def test_one_moderate_logit_among_huge_negative_ones(device: str, dtype: torch.dtype, offset: float) -> None:
    # Each row: logit 0 at position 7, all others at `offset`; the label elsewhere, so the token log-prob is
    # about `offset` and the gradient g at the label, −g at position 7 and 0 elsewhere, exactly as the reference.
    z = torch.full((2, 5, V), offset, dtype=dtype)
    z[..., 7] = 0.0
    labels = torch.randint(8, V, (2, 5), generator=torch.Generator().manual_seed(1))
    ((S, grad), (S_ref, grad_ref)), _ = fused_and_reference(z.to(device), labels.to(device))
    assert_close(S, S_ref, TOLERANCE[torch.float32], "S")
    assert_close(grad.double(), grad_ref.double(), TOLERANCE[dtype], "d logits")
