"""The fused row passes at huge logits (|logit| 1e4 … 1e10) against the float64 reference on the same input
values (docs/design.md section 5.3, "Magnitudes").

Values and gradients are exact to rounding at any magnitude: token log-probs are formed as
(z_y − m) − log s with s = Σ e^(z − m), and the forward saves the normaliser as the pair (m, log s) — m one
of the row's logits, exact in the accumulation dtype — so the backward's p = e^((z − m) − log s) is the
softmax to rounding. (A single stored lse = m + log s, rounded, would put a factor up to e^(spacing(lse)/2)
on every p: 1 ± 5e-4 at |lse| = 1e4 in fp32, beyond e^500 at 1e10.)
"""

from __future__ import annotations

import pytest
import torch
from test_fused_op import DEVICES, TOLERANCE, assert_close

from dora_engine import ops

OFFSETS = [1e4, -1e4, 1e6, -1e6, 5e8, -5e8, 1e10, -1e10]
V = 301  # not a multiple of any vector width
DTYPES = [torch.float32, torch.bfloat16]


def row_batch(offset: float, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 5, V) logits offset + 3·N(0, 1) in `dtype` (at 5e8 and beyond fp32 rounds most of a row to a few
    values: ties the reference resolves exactly) and labels anywhere in the row."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 3 + offset).to(dtype)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[1, 0] = -100
    return z.to(device), labels.to(device)


def fused_and_reference(z: torch.Tensor, labels: torch.Tensor):
    """((S, d logits) of the fused op, the same of the float64 reference) under the weights (1, −0.5) on S."""
    weights = torch.tensor([1.0, -0.5], dtype=torch.float64, device=z.device)
    results = []
    for backend, x in (("fused", z), ("reference", z.double())):
        logits = x.clone().requires_grad_(True)
        S, _ = ops.sequence_logprobs(logits, labels, backend=backend)
        (S.double() * weights).sum().backward()
        results.append((S, logits.grad))
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_values_and_gradients_match_the_reference_at_any_magnitude(
    device: str, dtype: torch.dtype, offset: float
) -> None:
    z, labels = row_batch(offset, dtype, device)
    (S, grad), (S_ref, grad_ref) = fused_and_reference(z, labels)
    assert torch.isfinite(S).all() and torch.isfinite(grad).all()
    assert_close(S, S_ref, TOLERANCE[torch.float32], f"S at offset {offset:g}")
    assert_close(grad, grad_ref, TOLERANCE[dtype], f"d logits at offset {offset:g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e4, -1e4, 5e8, -5e8, 1e10, -1e10])
def test_one_moderate_logit_among_huge_ones(device: str, dtype: torch.dtype, offset: float) -> None:
    # Each row: logit 0 at position 7, all others at `offset`; the label elsewhere. Below the moderate logit
    # the softmax is one-hot on it (d logits: g at the label, −g at position 7); above it, uniform over the
    # V − 1 huge ones (position 7 gets 0), with the log-sum-exp offset + log(V − 1) finer than fp32 holds it.
    z = torch.full((2, 5, V), offset, dtype=dtype)
    z[..., 7] = 0.0
    labels = torch.randint(8, V, (2, 5), generator=torch.Generator().manual_seed(1))
    (S, grad), (S_ref, grad_ref) = fused_and_reference(z.to(device), labels.to(device))
    assert_close(S, S_ref, TOLERANCE[torch.float32], "S")
    assert_close(grad, grad_ref, TOLERANCE[dtype], "d logits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1e10, -1e10])
def test_the_saved_normaliser_is_the_row_max_and_the_log_of_its_sum(
    device: str, dtype: torch.dtype, offset: float
) -> None:
    # seq_logprobs_fwd's third output (N, T, 2): the row's maximum as it is (no rounding at any magnitude)
    # and log Σ e^(z − m); zeros at ignored tokens.
    z, labels = row_batch(offset, dtype, device)
    _, _, lse = torch.ops.dora_engine.seq_logprobs_fwd(z, labels, -100)
    valid = labels != -100
    zd = z.double()
    m = zd.amax(-1)
    assert lse.shape == (*labels.shape, 2)
    assert torch.equal(lse[..., 0].double()[valid], m[valid])
    log_s = torch.log(torch.exp(zd - m.unsqueeze(-1)).sum(-1))
    assert_close(lse[..., 1][valid], log_s[valid], TOLERANCE[torch.float32], "log s")
    assert (lse[~valid] == 0).all()
