"""The loss/strategy registry against independent scalar re-computations of docs/design.md section 4.

The expected values are written out per prompt with Python floats and the ``math`` module, not by calling
the vectorised implementation.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from dora_engine.losses import (
    LOSSES,
    STRATEGIES,
    ObjectiveError,
    PromptBatch,
    RobustObjective,
    encode_params,
    get_loss,
    objective_of,
    per_sample_loss,
    resolve_params,
    robust_objective,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def rank(scores: list[float]) -> list[int]:
    """Indices by score descending, ties by list order."""
    return sorted(range(len(scores)), key=lambda k: (-scores[k], k))


def logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def expected_loss(name: str, S, L, R, sc, p) -> float:
    """ℓ of one prompt from the docs/design.md formulas (lists of floats)."""
    order = rank(sc)
    c, r = order[0], order[-1]
    rho = [S[k] - R[k] for k in range(len(S))] if R is not None else None
    A = [S[k] / max(L[k], 1) for k in range(len(S))]
    if name == "dpo":
        return -log_sigmoid(p["beta"] * (rho[c] - rho[r]))
    if name == "rdpo":
        return -log_sigmoid(p["beta"] * (rho[c] - rho[r]) + p["alpha"] * (L[c] - L[r]))
    if name == "ipo":
        if p["length_normalize"]:  # TRL's convention: per-token log-ratios
            return (rho[c] / max(L[c], 1) - rho[r] / max(L[r], 1) - 1 / (2 * p["beta"])) ** 2
        return (rho[c] - rho[r] - 1 / (2 * p["beta"])) ** 2
    if name == "robust_dpo":
        h = p["beta"] * (rho[c] - rho[r])
        e = p["eps"]
        return ((1 - e) * -log_sigmoid(h) - e * -log_sigmoid(-h)) / (1 - 2 * e)
    if name == "exo":
        a, b = p["beta"] * rho[c], p["beta"] * rho[r]
        z = logsumexp([a, b])
        pc, pr = math.exp(a - z), math.exp(b - z)
        e = p["eps"]
        return pc * (math.log(pc) - math.log(1 - e)) + pr * (math.log(pr) - math.log(e))
    if name == "simpo":
        return -log_sigmoid(p["beta"] * (A[c] - A[r]) - p["gamma"])
    if name == "dpo_pl":
        u = [p["beta"] * rho[k] for k in order]
        return -sum(u[k] - logsumexp(u[k:]) for k in range(len(u) - 1))
    if name == "rrhf":
        hinge = sum(
            max(0.0, A[i] - A[j]) for i in range(len(S)) for j in range(len(S)) if sc[i] < sc[j]
        )
        return hinge - p["alpha_sft"] * A[c]
    if name == "lire":
        if p["reward_norm"] == "softmax":
            z = logsumexp(sc)
            rew = [math.exp(s - z) for s in sc]
        else:
            mean = sum(sc) / len(sc)
            std = math.sqrt(sum((s - mean) ** 2 for s in sc) / len(sc))
            rew = [(s - mean) / std if std > 0 else 0.0 for s in sc]
        z = logsumexp([s / p["temperature"] for s in S])
        probs = [math.exp(s / p["temperature"] - z) for s in S]
        return max(rew) - sum(pk * rk for pk, rk in zip(probs, rew, strict=True))
    raise AssertionError(name)


def expected_objective(strategy: str, ell: list[float], h: list[float], lam: float) -> float:
    B = len(ell)
    if strategy == "erm":
        return sum(ell) / B
    if strategy == "reweight":
        return sum(a * b for a, b in zip(h, ell, strict=True)) / B
    if strategy == "dro":
        return lam * (logsumexp([x / lam for x in ell]) - math.log(B))
    if strategy == "dora":
        return lam * (logsumexp([a * b / lam for a, b in zip(h, ell, strict=True)]) - math.log(B))
    if strategy == "drdpo":
        return -lam * (logsumexp([-x / lam for x in ell]) - math.log(B))
    raise AssertionError(strategy)


def random_batch(B: int, K: int, *, seed: int, ties: bool = False, dtype=torch.float64) -> PromptBatch:
    g = torch.Generator().manual_seed(seed)
    S = -torch.rand(B, K, generator=g, dtype=dtype) * 40 - 1
    L = torch.randint(1, 30, (B, K), generator=g).to(dtype)
    R = -torch.rand(B, K, generator=g, dtype=dtype) * 40 - 1
    scores = torch.randint(0, 3, (B, K), generator=g).to(dtype) if ties else torch.randn(B, K, generator=g, dtype=dtype)
    return PromptBatch(S, L, scores, R)


PARAM_SETS = {
    "lire": [{}, {"reward_norm": "zscore", "temperature": 0.7}],
    "robust_dpo": [{}, {"eps": 0.0}, {"eps": 0.3, "beta": 0.5}],
    "exo": [{}, {"eps": 0.2}],
    "ipo": [{}, {"length_normalize": True, "beta": 0.4}],
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("K", [2, 3, 5, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_each_loss_matches_formula(name: str, K: int, ties: bool) -> None:
    batch = random_batch(6, K, seed=K * 31 + ties, ties=ties)
    for overrides in PARAM_SETS.get(name, [{}]) + [{}]:
        params = resolve_params(name, overrides)
        got = per_sample_loss(name, batch, overrides)
        for b in range(6):
            row = [x[b].tolist() for x in (batch.S, batch.L, batch.S_ref, batch.scores)]
            want = expected_loss(name, *row, params)
            assert got[b].item() == pytest.approx(want, rel=1e-10, abs=1e-10), (name, overrides, b)


def test_length_normalisation_changes_simpo_and_rrhf() -> None:
    S = torch.tensor([[-10.0, -10.0]], dtype=torch.float64)
    scores = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    short = PromptBatch(S, torch.tensor([[2.0, 10.0]], dtype=torch.float64), scores)
    # A_c = -5 < A_r = -1: the chosen is worse per token, so SimPO's margin is negative.
    assert per_sample_loss("simpo", short).item() == pytest.approx(-log_sigmoid(2.0 * (-5 + 1) - 0.8))
    # RRHF: the rejected (lower score) has the higher A, so the hinge fires: (-1) - (-5) = 4, minus A_best.
    assert per_sample_loss("rrhf", short).item() == pytest.approx(4.0 + 5.0)


def test_all_losses_except_robust_dpo_are_nonnegative() -> None:
    batch = random_batch(32, 4, seed=3)
    for name in LOSSES:
        ell = per_sample_loss(name, batch)
        if name in ("robust_dpo", "rrhf"):
            continue  # robust_dpo can be negative by design; rrhf has the −α_sft·A term (A ≤ 0 keeps it ≥ 0)
        assert bool((ell >= 0).all()), name
    assert bool((per_sample_loss("rrhf", batch) >= 0).all())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("lam", [0.05, 1.0, 30.0])
def test_each_strategy_matches_formula(strategy: str, lam: float) -> None:
    rnd = random.Random(7)
    ell = [rnd.uniform(-2, 5) for _ in range(9)]
    h = [rnd.uniform(0.1, 3) for _ in range(9)]
    loss, weights = robust_objective(strategy, torch.tensor(ell, dtype=torch.float64),
                                     torch.tensor(h, dtype=torch.float64), lam)
    assert loss.item() == pytest.approx(expected_objective(strategy, ell, h, lam), rel=1e-12, abs=1e-12)
    assert weights.sum().item() == pytest.approx(1.0)
    s = {"erm": [0.0] * 9, "reweight": None, "dro": [x / lam for x in ell],
         "dora": [a * b / lam for a, b in zip(h, ell, strict=True)], "drdpo": [-x / lam for x in ell]}[strategy]
    if s is None:
        want = [x / sum(h) for x in h]
    else:
        z = logsumexp(s)
        want = [math.exp(x - z) for x in s]
    assert weights.tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_gradcheck_every_loss_and_strategy(name: str, strategy: str) -> None:
    batch = random_batch(3, 4, seed=11)
    # keep SimPO/RRHF inputs away from hinge kinks: distinct averages
    S = batch.S.clone().requires_grad_(True)
    h = torch.tensor([0.5, 1.3, 2.0], dtype=torch.float64)

    def f(S: torch.Tensor) -> torch.Tensor:
        ell = per_sample_loss(name, PromptBatch(S, batch.L, batch.scores, batch.S_ref))
        return robust_objective(strategy, ell, h, 0.7)[0]

    assert torch.autograd.gradcheck(f, (S,))


def test_param_encoding_follows_declared_order() -> None:
    assert encode_params("lire", resolve_params("lire", {"reward_norm": "zscore"})) == [2.0, 1.0]
    assert encode_params("rdpo", resolve_params("rdpo", {"alpha": 0.5})) == [0.1, 0.5]
    assert encode_params("ipo", resolve_params("ipo")) == [0.1, 0.0]
    assert encode_params("ipo", resolve_params("ipo", {"length_normalize": True})) == [0.1, 1.0]


def test_flags_are_booleans_and_numbers_are_not() -> None:
    assert resolve_params("ipo") == {"beta": 0.1, "length_normalize": False}
    assert resolve_params("ipo", {"length_normalize": True})["length_normalize"] is True
    for bad in (1, 1.0, "true", None):
        with pytest.raises(ValueError, match="'length_normalize'] for loss 'ipo' must be true or false"):
            resolve_params("ipo", {"length_normalize": bad})
    with pytest.raises(ValueError, match=r"\['beta'\] for loss 'ipo' must be a number, got True"):
        resolve_params("ipo", {"beta": True})
    assert [spec.code for spec in LOSSES.values()] == list(range(len(LOSSES)))
    assert [spec.code for spec in STRATEGIES.values()] == list(range(len(STRATEGIES)))


def test_exo_default_eps_is_sigmoid_of_minus_ten() -> None:
    assert get_loss("exo").defaults["eps"] == pytest.approx(1 / (1 + math.exp(10)))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: get_loss("dpoo"), "unknown loss 'dpoo'; valid losses: dpo, rdpo"),
        (lambda: resolve_params("dpo", {"gamma": 1.0}), "unknown loss_params ['gamma'] for loss 'dpo'; valid: beta"),
        (lambda: resolve_params("dpo", {"beta": -1}), "['beta'] for loss 'dpo' must be a finite number > 0"),
        (lambda: resolve_params("robust_dpo", {"eps": 0.5}), "['eps'] for loss 'robust_dpo' must be in [0"),
        (lambda: resolve_params("exo", {"eps": 0.0}), "loss_params['eps'] for loss 'exo' must be in (0"),
        (lambda: resolve_params("lire", {"reward_norm": "rank"}), "must be one of ('softmax', 'zscore')"),
        (lambda: resolve_params("simpo", {"gamma": math.nan}), "['gamma'] for loss 'simpo' must be a finite number"),
        (lambda: robust_objective("cvar", torch.ones(2), None, 1.0), "unknown strategy 'cvar'; valid strategies: erm"),
        (lambda: robust_objective("dora", torch.ones(2), None, 1.0), "strategy 'dora' needs h_tilde"),
    ],
)
def test_registry_errors_name_the_field(call, message: str) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


# --------------------------------------------------------------------------------------------------
# The objective as one value
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "field", "message"),
    [
        (RobustObjective(loss="dpoo"), "loss", "unknown loss 'dpoo'"),
        (RobustObjective(loss="dpo", loss_params={"gamma": 1.0}), "loss_params", "unknown loss_params ['gamma']"),
        (RobustObjective(loss="exo", loss_params={"eps": 1.0}), "loss_params", "must be in (0, 1.0), got 1.0"),
        (RobustObjective(strategy="minimax"), "strategy", "unknown strategy 'minimax'"),
        (RobustObjective(lam=0.0), "lam", "lam must be a finite number > 0, got 0.0"),
        (RobustObjective(lam=True), "lam", "lam must be a finite number > 0"),
        (RobustObjective(lam=float("inf")), "lam", "lam must be a finite number > 0"),
    ],
)
def test_resolve_names_the_field_at_fault(objective: RobustObjective, field: str, message: str) -> None:
    with pytest.raises(ObjectiveError) as err:
        objective.resolve()
    assert err.value.field == field and message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_resolve_completes_and_types_the_parameters() -> None:
    resolved = RobustObjective("lire", {"temperature": 3}, "dro", 2).resolve()
    assert (resolved.loss, resolved.strategy, resolved.lam) == (LOSSES["lire"], STRATEGIES["dro"], 2.0)
    assert dict(resolved.params) == {"temperature": 3.0, "reward_norm": "softmax"}
    assert isinstance(resolved.params["temperature"], float)
    assert resolved.encoded_params == [3.0, 0.0]
    assert resolved.resolve() is resolved
    with pytest.raises(TypeError):
        resolved.params["temperature"] = 1.0  # read-only: validated once


def test_flat_arguments_build_the_objective_and_cannot_be_mixed_with_it() -> None:
    assert objective_of(None) == RobustObjective().resolve()
    assert objective_of(None, loss="simpo", strategy="erm") == RobustObjective("simpo", strategy="erm").resolve()
    assert objective_of(RobustObjective("dpo", lam=0.5)) == RobustObjective("dpo", {}, "dora", 0.5).resolve()
    with pytest.raises(ValueError, match="either objective or loss, lam, not both"):
        objective_of(RobustObjective(), loss="dpo", lam=0.5)
    with pytest.raises(TypeError, match="objective must be a RobustObjective, got dict"):
        objective_of({"loss": "dpo"})
