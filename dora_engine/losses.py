"""Registry of preference losses and robust strategies: the pure-PyTorch ground truth (docs/design.md section 4).

Every path of the project (reference op, fused C++/CUDA op, trainer, CLI, benchmarks) resolves loss
and strategy names, parameters and defaults here. The fused kernels receive a loss/strategy *code* and
the parameters flattened in ``LossSpec.param_names`` order (``encode_params``).

The training objective travels as one value, ``RobustObjective`` (loss, its parameters, strategy, λ, the
scale of h̃);
``RobustObjective.resolve()`` validates it once and gives the ``ResolvedObjective`` every consumer reads.

Shapes: B prompts × K responses. ``S`` summed log-probs, ``L`` valid-token counts, ``S_ref`` reference
summed log-probs, ``scores`` per-response scores (higher is better), all (B, K); ``ell`` the per-prompt
loss ℓ (B,); ℒ the robust objective over the batch (a scalar, ``loss`` in code). Every function
computes in the dtype of its inputs; callers upcast bf16/fp16 to fp32 first (float64 stays float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from dora_engine.errors import UserValueError

# --------------------------------------------------------------------------------------------------
# Batch view shared by all losses
# --------------------------------------------------------------------------------------------------


class PromptBatch(NamedTuple):
    """Per-response statistics of B prompts × K responses, all (B, K)."""

    S: torch.Tensor
    L: torch.Tensor
    scores: torch.Tensor
    S_ref: torch.Tensor | None = None

    @property
    def rho(self) -> torch.Tensor:
        """ρ = S − S_ref (the implicit reward before β)."""
        if self.S_ref is None:
            raise ValueError("this loss needs reference log-probs (ref_logps)")
        return self.S - self.S_ref

    @property
    def avg(self) -> torch.Tensor:
        """A = S / max(L, 1): the length-normalised log-prob."""
        return self.S / self.L.clamp(min=1)

    @property
    def order(self) -> torch.Tensor:
        """τ: response indices by score descending, ties broken by list order (stable sort)."""
        return torch.argsort(-self.scores, dim=1, stable=True)


def rank_best_worst(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B,) of the best- and worst-ranked response of each prompt (docs/design.md section 3)."""
    order = torch.argsort(-scores, dim=1, stable=True)
    return order[:, 0], order[:, -1]


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[:, None]).squeeze(1)


def chosen_rejected(x: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, K) at the best- and at the worst-ranked response of each prompt: two (B,) tensors."""
    best, worst = rank_best_worst(scores)
    return _pick(x, best), _pick(x, worst)


# --------------------------------------------------------------------------------------------------
# Losses: each returns ℓ_b of shape (B,)
# --------------------------------------------------------------------------------------------------


def dpo(batch: PromptBatch, *, beta: float) -> torch.Tensor:
    """ℓ = −log σ(β(ρ_c − ρ_r)) (Rafailov et al., 2023)."""
    rc, rr = chosen_rejected(batch.rho, batch.scores)
    return -F.logsigmoid(beta * (rc - rr))


def rdpo(batch: PromptBatch, *, beta: float, alpha: float) -> torch.Tensor:
    """ℓ = −log σ(β(ρ_c − ρ_r) + α(L_c − L_r)) (R-DPO, Park et al., 2024)."""
    rc, rr = chosen_rejected(batch.rho, batch.scores)
    lc, lr = chosen_rejected(batch.L, batch.scores)
    return -F.logsigmoid(beta * (rc - rr) + alpha * (lc - lr))


def ipo(batch: PromptBatch, *, beta: float, length_normalize: bool = False) -> torch.Tensor:
    """ℓ = (ρ_c − ρ_r − 1/(2β))² (Azar et al., 2023), with the paper's summed log-ratios.

    ``length_normalize=True`` divides each log-ratio by its response's token count first,
    ℓ = (ρ_c/L_c − ρ_r/L_r − 1/(2β))² with L clamped to ≥ 1: TRL's convention for IPO.
    """
    rho = batch.rho / batch.L.clamp(min=1) if length_normalize else batch.rho
    rc, rr = chosen_rejected(rho, batch.scores)
    return (rc - rr - 1.0 / (2.0 * beta)) ** 2


def robust_dpo(batch: PromptBatch, *, beta: float, eps: float) -> torch.Tensor:
    """ℓ = ((1−ε)(−log σ(βh)) − ε(−log σ(−βh))) / (1 − 2ε), h = ρ_c − ρ_r (Chowdhury et al., 2024).

    Unbiased under label flips with rate ε; can be negative.
    """
    rc, rr = chosen_rejected(batch.rho, batch.scores)
    z = beta * (rc - rr)
    return ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def exo(batch: PromptBatch, *, beta: float, eps: float) -> torch.Tensor:
    """ℓ = Σ_k p_θ(k)(log p_θ(k) − log p_r(k)) over {c, r} (EXO, Ji et al., 2024).

    p_θ = softmax(β ρ_c, β ρ_r), p_r = (1 − ε, ε): the reverse KL to a nearly one-hot target.
    """
    rc, rr = chosen_rejected(batch.rho, batch.scores)
    logp = F.log_softmax(beta * torch.stack([rc, rr], dim=1), dim=1)
    log_target = torch.tensor([math.log1p(-eps), math.log(eps)], dtype=logp.dtype, device=logp.device)
    return (logp.exp() * (logp - log_target)).sum(dim=1)


def simpo(batch: PromptBatch, *, beta: float, gamma: float) -> torch.Tensor:
    """ℓ = −log σ(β(A_c − A_r) − γ), A = S / L (SimPO, Meng et al., 2024; no reference)."""
    ac, ar = chosen_rejected(batch.avg, batch.scores)
    return -F.logsigmoid(beta * (ac - ar) - gamma)


def dpo_pl(batch: PromptBatch, *, beta: float) -> torch.Tensor:
    """ℓ = −Σ_{k<K} (u_k − logsumexp_{j≥k} u_j), u_k = β ρ_τ(k), τ the score order (Plackett-Luce DPO)."""
    u = beta * batch.rho.gather(1, batch.order)
    # Suffix log-sum-exp: logsumexp over j ≥ k, computed as a reversed cumulative logsumexp.
    suffix = torch.logcumsumexp(u.flip(1), dim=1).flip(1)
    return -(u - suffix)[:, :-1].sum(dim=1)


def rrhf(batch: PromptBatch, *, alpha_sft: float) -> torch.Tensor:
    """ℓ = Σ_{score_i < score_j} max(0, A_i − A_j) − α_sft · A_best (RRHF, Yuan et al., 2023; no reference)."""
    a = batch.avg
    worse = batch.scores[:, :, None] < batch.scores[:, None, :]  # [b, i, j]: response i ranks below j
    hinge = torch.relu(a[:, :, None] - a[:, None, :]) * worse
    best, _ = rank_best_worst(batch.scores)
    return hinge.sum(dim=(1, 2)) - alpha_sft * _pick(a, best)


def _normalise_rewards(scores: torch.Tensor, reward_norm: str) -> torch.Tensor:
    if reward_norm == "softmax":
        return torch.softmax(scores, dim=1)
    centred = scores - scores.mean(dim=1, keepdim=True)
    std = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
    return torch.where(std > 0, centred / torch.where(std > 0, std, 1.0), torch.zeros_like(centred))


def lire(batch: PromptBatch, *, temperature: float, reward_norm: str) -> torch.Tensor:
    """ℓ = max_k R_k − Σ_k softmax_k(S_k / T) · R_k (LiRE, Zhu et al., 2024; no reference).

    R = softmax_k(scores), or the per-prompt z-score (population std; all-equal scores give R = 0)
    with ``reward_norm="zscore"``. The max_k R_k shift makes ℓ a non-negative regret. It adds to ℓ_b a
    constant c_b = max_k R_k that does not depend on S, so the gradient of the batch objective is
    unchanged only where that objective is linear in ℓ: under ``erm`` and ``reweight``. Under ``dro``,
    ``dora`` and ``drdpo`` ℓ enters through exp(·/λ), the shift moves the strategy's weights over
    prompts, and the gradient changes (unless c_b, for ``dora`` h̃_b·c_b, is the same for every prompt).
    """
    rewards = _normalise_rewards(batch.scores, reward_norm)
    p = torch.softmax(batch.S / temperature, dim=1)
    return rewards.max(dim=1).values - (p * rewards).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Robust strategies: (ℓ (B,), h̃ (B,), λ) -> (ℒ scalar, weights (B,))
# --------------------------------------------------------------------------------------------------


def robust_logmeanexp(s: torch.Tensor, lam: float) -> torch.Tensor:
    """λ·log mean exp(s/λ), computed as m + λ·log1p(mean(expm1((s − m)/λ))) with m = max s.

    Accurate for every λ > 0: a plain log-sum-exp loses ~λ·2⁻²⁴ in fp32 (docs/design.md section 4).
    Its gradient is softmax(s/λ).
    """
    m = s.detach().max()
    return m + lam * torch.log1p(torch.expm1((s - m) / lam).mean())


def erm(ell: torch.Tensor, h: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ℒ = (1/B) Σ ℓ_b; weights 1/B."""
    return ell.mean(), torch.full_like(ell, 1.0 / ell.numel())


def reweight(ell: torch.Tensor, h: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ℒ = (1/B) Σ h̃_b ℓ_b; weights h̃_b / Σ h̃."""
    return (h * ell).mean(), h / h.sum()


def dro(ell: torch.Tensor, h: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ℒ = λ log (1/B) Σ exp(ℓ_b/λ) (KL-DRO); weights softmax(ℓ/λ)."""
    return robust_logmeanexp(ell, lam), torch.softmax(ell.detach() / lam, dim=0)


def dora(ell: torch.Tensor, h: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ℒ = λ log (1/B) Σ exp(h̃_b ℓ_b/λ) (DoRA, Eq. 9 / Algorithm 1); weights softmax(h̃ℓ/λ)."""
    s = h * ell
    return robust_logmeanexp(s, lam), torch.softmax(s.detach() / lam, dim=0)


def drdpo(ell: torch.Tensor, h: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ℒ = −β′ log (1/B) Σ exp(−ℓ_b/β′) (Dr.DPO, Wu et al., 2024; β′ = lam); weights softmax(−ℓ/β′)."""
    return -robust_logmeanexp(-ell, lam), torch.softmax(-ell.detach() / lam, dim=0)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

ParamValue = float | str | bool


@dataclass(frozen=True)
class LossSpec:
    """A preference loss: implementation, parameters (in kernel order) and defaults.

    A parameter is a number, one of ``choices`` (a string; the kernels get its index) or, when its
    default is a bool, a flag (``True``/``False``; the kernels get 1/0).
    """

    name: str
    code: int  # the integer the fused kernels dispatch on
    fn: Callable[..., torch.Tensor]
    defaults: Mapping[str, ParamValue]
    needs_reference: bool
    listwise: bool
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    def is_flag(self, name: str) -> bool:
        """Whether parameter ``name`` is a flag (its default is a bool)."""
        return isinstance(self.defaults.get(name), bool)


@dataclass(frozen=True)
class StrategySpec:
    """A robust strategy over the batch."""

    name: str
    code: int
    fn: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    needs_h_tilde: bool
    uses_lam: bool


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("dpo", 0, dpo, {"beta": 0.1}, needs_reference=True, listwise=False),
        LossSpec("rdpo", 1, rdpo, {"beta": 0.1, "alpha": 0.01}, needs_reference=True, listwise=False),
        # length_normalize: TRL's IPO (log-ratios divided by the response's token count); off: the paper's sums.
        LossSpec("ipo", 2, ipo, {"beta": 0.1, "length_normalize": False}, needs_reference=True, listwise=False),
        LossSpec("robust_dpo", 3, robust_dpo, {"beta": 0.1, "eps": 0.1}, needs_reference=True, listwise=False),
        # eps = σ(−10): the EXO reference's target logits (0, −10).
        LossSpec("exo", 4, exo, {"beta": 0.5, "eps": 1.0 / (1.0 + math.exp(10.0))},
                 needs_reference=True, listwise=False),
        LossSpec("simpo", 5, simpo, {"beta": 2.0, "gamma": 0.8}, needs_reference=False, listwise=False),
        LossSpec("dpo_pl", 6, dpo_pl, {"beta": 0.1}, needs_reference=True, listwise=True),
        LossSpec("rrhf", 7, rrhf, {"alpha_sft": 1.0}, needs_reference=False, listwise=True),
        LossSpec("lire", 8, lire, {"temperature": 2.0, "reward_norm": "softmax"}, needs_reference=False,
                 listwise=True, choices={"reward_norm": ("softmax", "zscore")}),
    )
}

STRATEGIES: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec("erm", 0, erm, needs_h_tilde=False, uses_lam=False),
        StrategySpec("reweight", 1, reweight, needs_h_tilde=True, uses_lam=False),
        StrategySpec("dro", 2, dro, needs_h_tilde=False, uses_lam=True),
        StrategySpec("dora", 3, dora, needs_h_tilde=True, uses_lam=True),
        StrategySpec("drdpo", 4, drdpo, needs_h_tilde=False, uses_lam=True),
    )
}


def get_loss(name: str) -> LossSpec:
    """The spec of loss ``name``; unknown names fail with the list of valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}") from None


def get_strategy(name: str) -> StrategySpec:
    """The spec of strategy ``name``; unknown names fail with the list of valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}") from None


def _check_value(loss: str, key: str, value: Any) -> None:
    def fail(why: str) -> None:
        raise ValueError(f"loss_params[{key!r}] for loss {loss!r} {why}, got {value!r}")

    if key in ("beta", "temperature"):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            fail("must be a finite number > 0")
    elif key == "eps":
        upper = 0.5 if loss == "robust_dpo" else 1.0
        lower_ok = value >= 0 if loss == "robust_dpo" else value > 0
        if not (isinstance(value, int | float) and lower_ok and value < upper):
            fail(f"must be in {'[0' if loss == 'robust_dpo' else '(0'}, {upper})")
    elif not (isinstance(value, int | float) and math.isfinite(value)):
        fail("must be a finite number")


def resolve_params(loss: str, params: Mapping[str, Any] | None = None) -> dict[str, ParamValue]:
    """The loss's defaults overridden by ``params``; unknown names or bad values fail clearly."""
    spec = get_loss(loss)
    params = dict(params or {})
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"unknown loss_params {unknown} for loss {loss!r}; valid: {', '.join(spec.param_names) or 'none'}"
        )
    resolved = {**spec.defaults, **params}
    for key, value in resolved.items():
        if key in spec.choices:
            if value not in spec.choices[key]:
                raise ValueError(
                    f"loss_params[{key!r}] for loss {loss!r} must be one of {spec.choices[key]}, got {value!r}"
                )
        elif spec.is_flag(key):
            if not isinstance(value, bool):
                raise ValueError(f"loss_params[{key!r}] for loss {loss!r} must be true or false, got {value!r}")
        else:
            if isinstance(value, bool):
                raise ValueError(f"loss_params[{key!r}] for loss {loss!r} must be a number, got {value!r}")
            _check_value(loss, key, value)
            resolved[key] = float(value)
    return resolved


def encode_params(loss: str, params: Mapping[str, ParamValue]) -> list[float]:
    """Parameters as floats in ``param_names`` order, for the fused kernels (choices become indices, flags 1/0)."""
    spec = get_loss(loss)
    return [
        float(spec.choices[k].index(params[k])) if k in spec.choices else float(params[k])
        for k in spec.param_names
    ]


def per_sample_loss(loss: str, batch: PromptBatch, params: Mapping[str, Any] | None = None) -> torch.Tensor:
    """ℓ_b (B,) of ``loss`` with resolved parameters."""
    spec = get_loss(loss)
    return spec.fn(batch, **resolve_params(loss, params))


def robust_objective(
    strategy: str, ell: torch.Tensor, h_tilde: torch.Tensor | None, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℒ, weights) of ``strategy`` over the batch; h̃ = None means 1 where the strategy allows it."""
    spec = get_strategy(strategy)
    if h_tilde is None:
        if spec.needs_h_tilde:
            raise ValueError(f"strategy {strategy!r} needs h_tilde (run calibration first)")
        h_tilde = torch.ones_like(ell)
    return spec.fn(ell, h_tilde.to(ell.dtype), float(lam))


# --------------------------------------------------------------------------------------------------
# The scale of h̃
# --------------------------------------------------------------------------------------------------

#: How h̃ is scaled before the strategy (docs/design.md section 4.3): ``none`` as given (the paper's),
#: ``dataset`` divided by the training set's mean h̃, ``batch`` divided by the global batch's mean h̃.
H_SCALES = ("none", "dataset", "batch")
#: The objective's own default: a bare call has no training set to take a mean over.
DEFAULT_H_SCALE = "none"
#: The training defaults (``robust.*``, the TRL adapter, ``dora-engine iterate``): chosen on tuning seeds with
#: benchmarks/bench_quality.py's λ sweep, the one setting with no cell below ERM and the largest gain over it
#: among dora's (benchmarks/RESULTS.md, "Choosing h̃'s scale and λ").
TRAINING_H_SCALE = "dataset"
TRAINING_LAM = 4.0


def h_divisor(h_scale: str, h_mean: float | None, h_batch: torch.Tensor) -> torch.Tensor:
    """The constant c by which h̃ is divided (a 0-dim tensor in ``h_batch``'s dtype, no gradient, no host
    synchronisation): 1 for ``none``, ``h_mean`` for ``dataset``, mean(h_batch) for ``batch``, where
    ``h_batch`` is h̃ of every prompt the strategy reduces over, and 1 when that mean is 0 (all h̃ zero)."""
    one = torch.ones((), dtype=h_batch.dtype, device=h_batch.device)
    if h_scale == "dataset":
        return one * h_mean
    if h_scale == "batch":
        mean = h_batch.detach().mean()
        return torch.where(mean != 0, mean, one)
    return one


# --------------------------------------------------------------------------------------------------
# The objective as one value
# --------------------------------------------------------------------------------------------------


class ObjectiveError(UserValueError):
    """An objective that cannot run; ``field`` is the ``RobustObjective`` field at fault (``loss``,
    ``loss_params``, ``strategy``, ``lam``, ``h_scale`` or ``h_mean``), so that a caller can name its own key
    for it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RobustObjective:
    """The training objective: a loss of ``LOSSES`` under a strategy of ``STRATEGIES`` (docs/design.md
    section 4). A plain description; ``resolve()`` validates it."""

    loss: str = "dpo_pl"
    """Preference loss name (``LOSSES``)."""
    loss_params: Mapping[str, Any] = field(default_factory=dict)
    """Overrides of the loss's default parameters."""
    strategy: str = "dora"
    """``erm``, ``reweight``, ``dro``, ``dora`` or ``drdpo``."""
    lam: float = 1.0
    """λ > 0, the temperature of ``dro``, ``dora`` and ``drdpo`` (the kernels check it for every strategy)."""
    h_scale: str = DEFAULT_H_SCALE
    """How h̃ is scaled before the strategy (``H_SCALES``; docs/design.md section 4.3): ``none``, ``dataset``
    (h̃ / ``h_mean``) or ``batch`` (h̃ / the global batch's mean h̃)."""
    h_mean: float | None = None
    """The training set's mean h̃ (finite, > 0): required with ``h_scale="dataset"``, None otherwise."""

    def resolve(self) -> ResolvedObjective:
        """The validated objective: loss and strategy known, parameters complete and typed, λ finite and > 0,
        ``h_scale`` known and ``h_mean`` given exactly when it is ``dataset``. Raises ``ObjectiveError``
        naming the field at fault."""
        try:
            loss = get_loss(self.loss)
        except ValueError as err:
            raise ObjectiveError("loss", str(err)) from None
        try:
            params = resolve_params(self.loss, self.loss_params)
        except ValueError as err:
            raise ObjectiveError("loss_params", str(err)) from None
        try:
            strategy = get_strategy(self.strategy)
        except ValueError as err:
            raise ObjectiveError("strategy", str(err)) from None
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam <= 0:
            raise ObjectiveError("lam", f"lam must be a finite number > 0, got {lam!r}")
        if self.h_scale not in H_SCALES:
            raise ObjectiveError("h_scale", f"h_scale must be one of {', '.join(H_SCALES)}, got {self.h_scale!r}")
        h_mean = self.h_mean
        if self.h_scale == "dataset":
            if isinstance(h_mean, bool) or not isinstance(h_mean, int | float) or not math.isfinite(h_mean) \
                    or h_mean <= 0:
                raise ObjectiveError(
                    "h_mean", f"h_scale 'dataset' needs h_mean, the training set's mean h̃ (a finite number > 0), "
                              f"got {h_mean!r}"
                )
            h_mean = float(h_mean)
        elif h_mean is not None:
            raise ObjectiveError("h_mean", f"h_mean is only given with h_scale 'dataset' (h_scale is "
                                           f"{self.h_scale!r}), got {h_mean!r}")
        return ResolvedObjective(loss, MappingProxyType(params), strategy, float(lam), self.h_scale, h_mean)


@dataclass(frozen=True)
class ResolvedObjective:
    """A validated ``RobustObjective``: the specs, the loss's complete parameters, λ and the scale of h̃."""

    loss: LossSpec
    params: Mapping[str, ParamValue]
    strategy: StrategySpec
    lam: float
    h_scale: str = DEFAULT_H_SCALE
    h_mean: float | None = None

    def resolve(self) -> ResolvedObjective:
        """Itself: already validated."""
        return self

    @property
    def encoded_params(self) -> list[float]:
        """The parameters as the fused kernels take them (``encode_params``)."""
        return encode_params(self.loss.name, self.params)

    def per_sample_loss(self, batch: PromptBatch) -> torch.Tensor:
        """ℓ_b (B,) of the loss."""
        return self.loss.fn(batch, **self.params)

    @property
    def scales_h(self) -> bool:
        """Whether the strategy reads h̃ and ``h_scale`` changes it (so the op divides h̃ before reducing)."""
        return self.strategy.needs_h_tilde and self.h_scale != "none"

    def h_divisor(self, h_batch: torch.Tensor) -> torch.Tensor:
        """The c of ``h_divisor`` for this objective, ``h_batch`` the h̃ of every prompt reduced over."""
        return h_divisor(self.h_scale, self.h_mean, h_batch)

    def reduce(self, ell: torch.Tensor, h_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℒ, weights) of the strategy over ``ell`` with calibration weights ``h_tilde`` (B,), already
        scaled (``dora_engine.ops`` divides h̃ by ``h_divisor`` before any backend reduces)."""
        return self.strategy.fn(ell, h_tilde, self.lam)


def objective_of(
    objective: RobustObjective | ResolvedObjective | None,
    *,
    loss: str | None = None,
    loss_params: Mapping[str, Any] | None = None,
    strategy: str | None = None,
    lam: float | None = None,
    h_scale: str | None = None,
    h_mean: float | None = None,
) -> ResolvedObjective:
    """The resolved objective of a call that takes ``objective=`` or, as a convenience, the flat
    ``loss`` / ``loss_params`` / ``strategy`` / ``lam`` / ``h_scale`` / ``h_mean`` (which build one; unset
    ones keep ``RobustObjective``'s defaults). Giving both is an error."""
    flat = {
        name: value
        for name, value in (("loss", loss), ("loss_params", loss_params), ("strategy", strategy), ("lam", lam),
                            ("h_scale", h_scale), ("h_mean", h_mean))
        if value is not None
    }
    if objective is None:
        return RobustObjective(**flat).resolve()
    if flat:
        raise ValueError(f"give either objective or {', '.join(flat)}, not both")
    if not isinstance(objective, RobustObjective | ResolvedObjective):
        raise TypeError(f"objective must be a RobustObjective, got {type(objective).__name__}")
    return objective.resolve()
