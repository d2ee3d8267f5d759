"""docs/design.md section 4 invariants as property tests, and numerical stability at the extremes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_engine import ops
from dora_engine.losses import LOSSES, STRATEGIES, PromptBatch, per_sample_loss, robust_objective

finite = st.floats(min_value=-100, max_value=100, allow_nan=False)
positive_h = st.floats(min_value=0.05, max_value=3.0, allow_nan=False)


@st.composite
def losses_and_weights(draw, max_size: int = 12):
    B = draw(st.integers(1, max_size))
    ell = torch.tensor(draw(st.lists(finite, min_size=B, max_size=B)), dtype=torch.float64)
    h = torch.tensor(draw(st.lists(positive_h, min_size=B, max_size=B)), dtype=torch.float64)
    return ell, h


@settings(max_examples=60, deadline=None)
@given(losses_and_weights(), st.floats(min_value=1e-2, max_value=1e3))
def test_dora_with_unit_h_equals_dro(data, lam: float) -> None:
    ell, _ = data
    dora, w_dora = robust_objective("dora", ell, torch.ones_like(ell), lam)
    dro, w_dro = robust_objective("dro", ell, None, lam)
    assert dora.item() == pytest.approx(dro.item(), rel=1e-12, abs=1e-12)
    assert torch.allclose(w_dora, w_dro)


@settings(max_examples=60, deadline=None)
@given(losses_and_weights())
def test_large_lambda_tends_to_the_mean(data) -> None:
    ell, h = data
    lam = 1e6
    for robust, plain, s in (("dora", "reweight", h * ell), ("dro", "erm", ell)):
        gap = abs(robust_objective(robust, ell, h, lam)[0].item() - robust_objective(plain, ell, h, lam)[0].item())
        assert gap <= s.var(unbiased=False).item() / (2 * lam) + 1e-6, (robust, gap)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000))
def test_dpo_pl_with_two_responses_equals_dpo(B: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch = PromptBatch(
        S=-torch.rand(B, 2, generator=g, dtype=torch.float64) * 50,
        L=torch.ones(B, 2, dtype=torch.float64),
        scores=torch.randn(B, 2, generator=g, dtype=torch.float64),
        S_ref=-torch.rand(B, 2, generator=g, dtype=torch.float64) * 50,
    )
    for beta in (0.1, 1.0):
        assert torch.allclose(
            per_sample_loss("dpo_pl", batch, {"beta": beta}), per_sample_loss("dpo", batch, {"beta": beta})
        )


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(2, 5), st.integers(0, 10_000), st.sampled_from(list(LOSSES)),
       st.sampled_from(list(STRATEGIES)))
def test_permutation_invariance(B: int, K: int, seed: int, loss: str, strategy: str) -> None:
    g = torch.Generator().manual_seed(seed)
    S = -torch.rand(B, K, generator=g, dtype=torch.float64) * 30
    L = torch.randint(1, 20, (B, K), generator=g).to(torch.float64)
    R = -torch.rand(B, K, generator=g, dtype=torch.float64) * 30
    scores = torch.randperm(B * K, generator=g).to(torch.float64).view(B, K)  # distinct: no ties
    h = torch.rand(B, generator=g, dtype=torch.float64) + 0.2

    def objective(perm_b: torch.Tensor, perm_k: torch.Tensor) -> float:
        def take(x: torch.Tensor) -> torch.Tensor:
            return x[perm_b][:, perm_k]

        ell = per_sample_loss(loss, PromptBatch(take(S), take(L), take(scores), take(R)))
        return robust_objective(strategy, ell, h[perm_b], 0.8)[0].item()

    base = objective(torch.arange(B), torch.arange(K))
    permuted = objective(torch.randperm(B, generator=g), torch.randperm(K, generator=g))
    assert permuted == pytest.approx(base, rel=1e-10, abs=1e-10)


@settings(max_examples=60, deadline=None)
@given(losses_and_weights(), st.floats(min_value=1e-2, max_value=1e2))
def test_dora_gradient_is_h_times_softmax(data, lam: float) -> None:
    ell, h = data
    ell = ell.clone().requires_grad_(True)
    loss, weights = robust_objective("dora", ell, h, lam)
    (grad,) = torch.autograd.grad(loss, ell)
    expected = h * torch.softmax(h * ell.detach() / lam, dim=0)
    assert torch.allclose(grad, expected, rtol=1e-9, atol=1e-12)
    assert weights.sum().item() == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(losses_and_weights(), st.sampled_from(list(STRATEGIES)), st.floats(min_value=1e-3, max_value=1e6))
def test_weights_are_a_distribution(data, strategy: str, lam: float) -> None:
    ell, h = data
    _, weights = robust_objective(strategy, ell, h, lam)
    assert bool((weights >= 0).all())
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Numerical stability
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["dro", "dora", "drdpo"])
@pytest.mark.parametrize("lam", [1e-3, 1e6])
def test_extreme_losses_and_lambdas_match_float64(strategy: str, lam: float) -> None:
    ell64 = torch.tensor([1e4, -1e4, 3.0, 1e4 - 0.5, 0.0, -7.25], dtype=torch.float64)
    h64 = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.7, 1.1], dtype=torch.float64)
    want, w_want = robust_objective(strategy, ell64, h64, lam)
    got, w_got = robust_objective(strategy, ell64.float(), h64.float(), lam)
    assert math.isfinite(got.item())
    # fp32 carries ~7 digits of the 1e4-sized terms; the robust form adds no error on top of that.
    assert got.item() == pytest.approx(want.item(), rel=2e-6, abs=2e-3)
    assert torch.allclose(w_got.double(), w_want, atol=1e-5)


def test_fp32_large_lambda_is_accurate_where_a_plain_logsumexp_is_not() -> None:
    """At λ = 1e6 a plain fp32 λ·(logsumexp(s/λ) − log B) is off by ~λ·2⁻²⁴; the robust form by a few ulps."""
    ell = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, -3.0])
    lam = 1e6
    want = robust_objective("dora", ell.double(), torch.ones(6, dtype=torch.float64), lam)[0].item()
    got = robust_objective("dora", ell, torch.ones(6), lam)[0].item()
    plain = (lam * (torch.logsumexp(ell / lam, dim=0) - math.log(6))).item()
    assert abs(got - want) < 1e-6
    assert abs(plain - want) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_match_float64(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 6, 50, generator=g) * 1e4).to(dtype)
    labels = torch.randint(0, 50, (4, 6), generator=g)
    labels[1, 3:] = -100
    S, L = ops.sequence_logprobs(logits, labels, backend="reference")
    S64, L64 = ops.sequence_logprobs(logits.double(), labels, backend="reference")
    assert S.dtype == torch.float32 and bool(torch.isfinite(S).all())
    assert torch.allclose(S.double(), S64, rtol=1e-6, atol=1e-2)
    assert torch.equal(L.double(), L64)
