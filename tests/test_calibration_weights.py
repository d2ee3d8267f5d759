"""h̃ (docs/design.md section 4, "Calibration"): hand-computed values, bounds, saturation, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dora_engine.calibration import h_tilde


def _by_hand(c: list[float], gamma: list[float], beta: list[float], tau: float = 1.0) -> float:
    """The docs/design.md formula written out term by term, in plain Python floats."""
    n = len(c)
    total = 0.0
    for ck, gk, bk in zip(c, gamma, beta, strict=True):
        ck = min(max(ck, 1e-6), 1 - 1e-6)
        w = (gk * ck / (1 - ck)) ** tau
        total += 1.0 / (1.0 / n + bk / w)
    return total / n


def test_hand_computed_values():
    # n = 2, γ = 1, β = 1/2: term = 2c → h̃ = c_1 + c_2 = 0.9 + 0.3.
    assert h_tilde([0.9, 0.3]) == pytest.approx(1.2, rel=1e-12)
    # n = 2, γ = (3, 1/3), β = (0.25, 0.75): term_1 = 2.7/(1.35+0.025) = 1.963636…,
    # term_2 = 0.1/(0.05+0.525) = 0.173913…; h̃ = 1.068775…
    expected = (2.7 / (2.7 / 2 + 0.25 * 0.1) + 0.1 / (0.1 / 2 + 0.75 * 0.7)) / 2
    assert h_tilde([0.9, 0.3], gamma=[3.0, 1 / 3], beta=[0.25, 0.75]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.0687747035573123, rel=1e-12)


def test_batched_numpy_and_torch_match_per_prompt_values():
    rng = np.random.default_rng(0)
    c = rng.uniform(size=(5, 4))
    gamma = rng.uniform(0.2, 5.0, size=(5, 4))
    beta = rng.dirichlet(np.ones(4), size=5)
    expected = [_by_hand(list(c[b]), list(gamma[b]), list(beta[b])) for b in range(5)]
    got = h_tilde(c, gamma=gamma, beta=beta)
    assert isinstance(got, np.ndarray) and got.shape == (5,)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    got_t = h_tilde(torch.tensor(c, dtype=torch.float32), gamma=torch.tensor(gamma), beta=beta)
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float32 and got_t.shape == (5,)
    np.testing.assert_allclose(got_t.numpy(), expected, rtol=1e-6)


def test_scalar_gamma_broadcasts_and_per_slot_gamma_differs():
    c = [0.2, 0.7, 0.5]
    assert h_tilde(c, gamma=2.0) == pytest.approx(_by_hand(c, [2.0] * 3, [1 / 3] * 3), rel=1e-12)
    assert h_tilde(c, gamma=[2.0, 1.0, 1.0]) != pytest.approx(h_tilde(c, gamma=2.0))


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_default_beta_and_unit_gamma_give_n_times_c(n):
    rng = np.random.default_rng(n)
    c = rng.uniform(0.01, 0.99, size=(7, n))
    np.testing.assert_allclose(h_tilde(c), (n * c).mean(axis=1), rtol=1e-12)


def test_bound_zero_to_n_for_any_gamma_and_beta():
    rng = np.random.default_rng(1)
    for n in (2, 4, 6):
        c = rng.uniform(size=(200, n))
        gamma = 10.0 ** rng.uniform(-4, 4, size=(200, n))
        beta = 10.0 ** rng.uniform(-4, 0, size=(200, n))
        h = h_tilde(c, gamma=gamma, beta=beta)
        assert np.all(h > 0) and np.all(h < n)


def test_saturated_probabilities_are_clamped():
    n = 3
    top = h_tilde([1.0, 1.0, 1.0])
    bottom = h_tilde([0.0, 0.0, 0.0])
    assert math.isfinite(top) and math.isfinite(bottom)
    assert 0 < bottom < 1e-5 and n - 1e-5 < top < n
    assert top == pytest.approx(n * (1 - 1e-6), rel=1e-12)
    assert bottom == pytest.approx(n * 1e-6, rel=1e-12)
    # A large γ pushes the term towards n but not to it.
    assert 1.99 < h_tilde([1.0, 1.0], gamma=1e3) < 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"c": [0.5, 1.5]}, r"c\[1\] = 1.5 is outside \[0, 1\]"),
        ({"c": [[0.5, 0.2], [-0.1, 0.3]]}, r"c\[1, 0\] = -0.1 is outside \[0, 1\]"),
        ({"c": [0.5, float("nan")]}, r"c\[1\] = nan is not finite"),
        ({"c": [[[0.5]]]}, r"shape \(n,\) or \(B, n\)"),
        ({"c": []}, r"n >= 1"),
        ({"c": ["a", "b"]}, r"c must be numeric"),
        ({"c": [0.5, 0.5], "gamma": 0.0}, r"gamma\[0\] = 0.0 must be > 0"),
        ({"c": [0.5, 0.5], "gamma": float("inf")}, r"gamma\[0\] = inf is not finite"),
        ({"c": [0.5, 0.5], "beta": [0.5, 0.5, 0.5]}, r"beta of shape \(3,\) does not broadcast to c's shape \(2,\)"),
        ({"c": [0.5, 0.5], "beta": [0.5, -1.0]}, r"beta\[1\] = -1.0 must be > 0"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        h_tilde(**kwargs)


def test_ratio_power_flattens_towards_uniform():
    rng = np.random.default_rng(1)
    c = rng.uniform(size=(6, 4))
    gamma = rng.uniform(0.2, 5.0, size=(6, 4))
    beta = rng.dirichlet(np.ones(4), size=6)
    for tau in (0.0, 0.25, 0.5, 2.0):
        expected = [_by_hand(list(c[b]), list(gamma[b]), list(beta[b]), tau) for b in range(6)]
        np.testing.assert_allclose(h_tilde(c, gamma, beta, ratio_power=tau), expected, rtol=1e-12)
    # τ = 1 is the paper's h̃; τ = 0 weighs every prompt alike, n / (1 + n β) = n / 2 for uniform β
    assert h_tilde([0.9, 0.3], ratio_power=1.0) == pytest.approx(1.2, rel=1e-12)
    np.testing.assert_allclose(h_tilde(c, gamma, ratio_power=0.0), np.full(6, 2.0), rtol=1e-12)
    spreads = [np.std(h_tilde(c, gamma, ratio_power=tau)) for tau in (1.0, 0.5, 0.25, 0.0)]
    assert all(a > b for a, b in zip(spreads, spreads[1:], strict=False))


@pytest.mark.parametrize("tau", [-0.5, float("nan"), float("inf"), True, "1"])
def test_bad_ratio_power_is_named(tau):
    with pytest.raises(ValueError, match="ratio_power must be a finite number >= 0"):
        h_tilde([0.5, 0.5], ratio_power=tau)
