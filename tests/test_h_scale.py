"""The scale of h̃ (``RobustObjective.h_scale``, docs/design.md section 4.3): validation, every backend against
the reference, what ``dataset`` means for λ, and ``batch`` across data-parallel ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from multiproc import run_gloo
from test_fused_op import assert_close, loss_and_grad, make_batch, oracle

from dora_engine import ops
from dora_engine.losses import H_SCALES, ObjectiveError, RobustObjective

H_MEAN = 1.7


def scale_kwargs(h_scale: str) -> dict:
    return dict(h_scale=h_scale, h_mean=H_MEAN if h_scale == "dataset" else None)


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"h_scale": "prompt"}, "h_scale", "h_scale must be one of none, dataset, batch, got 'prompt'"),
        ({"h_scale": "dataset"}, "h_mean", "h_scale 'dataset' needs h_mean"),
        ({"h_scale": "dataset", "h_mean": 0.0}, "h_mean", "got 0.0"),
        ({"h_scale": "dataset", "h_mean": -1}, "h_mean", "got -1"),
        ({"h_scale": "dataset", "h_mean": math.inf}, "h_mean", "got inf"),
        ({"h_scale": "dataset", "h_mean": math.nan}, "h_mean", "got nan"),
        ({"h_scale": "dataset", "h_mean": True}, "h_mean", "got True"),
        ({"h_scale": "dataset", "h_mean": "2"}, "h_mean", "got '2'"),
        ({"h_mean": 2.0}, "h_mean", "h_mean is only given with h_scale 'dataset' (h_scale is 'none')"),
        ({"h_scale": "batch", "h_mean": 2.0}, "h_mean", "(h_scale is 'batch')"),
    ],
)
def test_objective_names_a_bad_h_scale_or_h_mean(fields: dict, field: str, message: str) -> None:
    with pytest.raises(ObjectiveError) as err:
        RobustObjective(**fields).resolve()
    assert err.value.field == field and message in str(err.value)


def test_objective_keeps_the_scale() -> None:
    resolved = RobustObjective(h_scale="dataset", h_mean=2).resolve()
    assert (resolved.h_scale, resolved.h_mean) == ("dataset", 2.0) and isinstance(resolved.h_mean, float)
    assert RobustObjective().resolve().h_scale == "none"
    assert ops.RobustObjective(h_scale="batch").resolve().scales_h
    assert not RobustObjective(strategy="erm", h_scale="batch").resolve().scales_h
    with pytest.raises(ValueError, match="give either objective or h_scale, not both"):
        ops.dora_loss(**make_batch(2, 2), objective=RobustObjective(), h_scale="batch")


# --------------------------------------------------------------------------------------------------
# Every backend against the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h_scale", H_SCALES)
@pytest.mark.parametrize("strategy", ["dora", "reweight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(h_scale: str, strategy: str, dtype: torch.dtype) -> None:
    batch = make_batch(4, 3, dtype=dtype, seed=5)
    kwargs = dict(loss="dpo_pl", strategy=strategy, lam=0.6, **scale_kwargs(h_scale))
    out, grad = loss_and_grad("fused", batch, **kwargs)
    expected, grad_ref = oracle(batch, **kwargs)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for field in ("loss", "per_sample_loss", "weights"):
        assert_close(getattr(out, field), getattr(expected, field), rtol, field)
    assert_close(grad, grad_ref, rtol, "d logits")


def _linear_problem(seed: int = 3, B: int = 5, K: int = 2, T: int = 6, H: int = 8, V: int = 23) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B * K, T), generator=g)
    labels[:, :2] = -100
    return dict(
        hidden=torch.randn(B * K, T, H, generator=g), weight=torch.randn(V, H, generator=g) / H**0.5,
        bias=torch.randn(V, generator=g), labels=labels, num_responses=K, scores=torch.randn(B, K, generator=g),
        h_tilde=torch.rand(B, generator=g) + 0.5, ref_logps=2 * torch.randn(B * K, generator=g),
    )


def _linear_loss(backend: str, data: dict, prompts: slice | None = None, **kwargs):
    """Loss, weights and gradients of ``dora_loss_linear`` on ``prompts`` (default all) of ``data``."""
    K = data["num_responses"]
    prompts = prompts or slice(0, data["scores"].shape[0])
    rows = slice(prompts.start * K, prompts.stop * K)
    leaves = [t.clone().requires_grad_(True) for t in (data["hidden"][rows], data["weight"], data["bias"])]
    out = ops.dora_loss_linear(
        leaves[0], leaves[1], data["labels"][rows], bias=leaves[2], num_responses=K,
        scores=data["scores"][prompts], h_tilde=data["h_tilde"][prompts], ref_logps=data["ref_logps"][rows],
        loss="dpo_pl", strategy="dora", lam=0.4, backend=backend, **kwargs,
    )
    out.loss.backward()
    return out.loss.detach(), out.weights, [t.grad for t in leaves]


@pytest.mark.parametrize("h_scale", H_SCALES)
@pytest.mark.parametrize("mode", ["single_pass", "recompute"])
def test_fused_linear_matches_reference(h_scale: str, mode: str) -> None:
    """chunk_bytes=1: one prompt per chunk, so single_pass reduces over growing prefixes of the batch; h̃ is
    scaled once for the whole batch before that, or the prefixes' rescaling would be wrong for ``batch``."""
    data = _linear_problem()
    kwargs = dict(mode=mode, chunk_bytes=1, **scale_kwargs(h_scale))
    loss, weights, grads = _linear_loss("fused", data, **kwargs)
    loss_ref, weights_ref, grads_ref = _linear_loss("reference", data, **kwargs)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(weights, weights_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_batch_of_zero_h_tilde_is_kept(backend: str) -> None:
    """All h̃ zero (only reachable with validate=False): ``batch`` divides by 1, so it equals ``none``."""
    batch = make_batch(3, 2, seed=2)
    batch["h_tilde"] = torch.zeros(3)
    scaled, grad = loss_and_grad(backend, batch, strategy="dora", h_scale="batch", validate=False)
    plain, grad_plain = loss_and_grad(backend, batch, strategy="dora", validate=False)
    assert torch.isfinite(scaled.loss) and torch.equal(scaled.loss, plain.loss) and torch.equal(grad, grad_plain)
    reference, grad_ref = oracle(batch, strategy="dora", h_scale="batch", validate=False)
    assert_close(scaled.loss, reference.loss, 1e-5, "loss")
    assert_close(grad, grad_ref, 1e-5, "d logits")


# --------------------------------------------------------------------------------------------------
# What the scale means
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize(("strategy", "lam"), [("dora", 0.3), ("dora", 2.0), ("reweight", 1.0)])
def test_dataset_is_none_at_lam_times_c_up_to_the_loss_scale(backend: str, strategy: str, lam: float) -> None:
    """λ·log mean exp((h̃/c)ℓ/λ) = (1/c)·[cλ·log mean exp(h̃ℓ/(cλ))]; reweight: mean((h̃/c)ℓ) = mean(h̃ℓ)/c."""
    batch = make_batch(5, 3, seed=11)
    c = 3.4
    scaled, grad = loss_and_grad(backend, batch, strategy=strategy, lam=lam, h_scale="dataset", h_mean=c)
    plain, grad_plain = loss_and_grad(backend, batch, strategy=strategy, lam=lam * c)
    assert_close(scaled.loss, plain.loss / c, 1e-5, "loss")
    assert_close(grad, grad_plain / c, 1e-5, "d logits")
    assert_close(scaled.weights, plain.weights, 1e-5, "weights")
    # Not the same objective at the same λ: the test can tell the two apart.
    unscaled, _ = loss_and_grad(backend, batch, strategy=strategy, lam=lam)
    assert abs(unscaled.loss.item() - scaled.loss.item()) > 1e-3


@pytest.mark.parametrize("strategy", ["erm", "dro", "drdpo"])
@pytest.mark.parametrize("h_scale", ["dataset", "batch"])
def test_strategies_without_h_tilde_are_unchanged(strategy: str, h_scale: str) -> None:
    batch = make_batch(4, 2, seed=4)
    scaled, grad = loss_and_grad("fused", batch, strategy=strategy, **scale_kwargs(h_scale))
    plain, grad_plain = loss_and_grad("fused", batch, strategy=strategy)
    assert torch.equal(scaled.loss, plain.loss) and torch.equal(grad, grad_plain)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_batch_divides_by_the_batch_mean_and_data_with_mean_one_is_unchanged(backend: str) -> None:
    batch = make_batch(4, 2, seed=9)
    h = batch["h_tilde"]
    by_batch, _ = loss_and_grad(backend, batch, strategy="dora", h_scale="batch")
    by_mean, _ = loss_and_grad(backend, batch, strategy="dora", h_scale="dataset", h_mean=h.mean().item())
    assert_close(by_batch.loss, by_mean.loss, 1e-6, "loss")
    normalised = {**batch, "h_tilde": h / h.mean()}  # mean 1: dividing by the mean again changes nothing
    plain, _ = loss_and_grad(backend, normalised, strategy="dora")
    for kwargs in (dict(h_scale="batch"), dict(h_scale="dataset", h_mean=normalised["h_tilde"].mean().item())):
        again, _ = loss_and_grad(backend, normalised, strategy="dora", **kwargs)
        assert_close(again.loss, plain.loss, 1e-6, kwargs["h_scale"])


# --------------------------------------------------------------------------------------------------
# batch under data parallelism: two gloo ranks equal one process on the concatenated batch
# --------------------------------------------------------------------------------------------------

SPLIT = (3, 1)  # prompts per rank, uneven, and the ranks' h̃ means differ
DIST = dict(loss="dpo_pl", strategy="dora", lam=0.4, h_scale="batch")


def _dist_batch() -> dict:
    batch = make_batch(sum(SPLIT), 3, seed=21)
    batch["h_tilde"] = torch.tensor([0.2, 0.4, 0.3, 3.0])
    return batch


def _rank_main(rank: int) -> dict:
    batch = _dist_batch()
    first = sum(SPLIT[:rank])
    prompts = slice(first, first + SPLIT[rank])
    rows = slice(3 * prompts.start, 3 * prompts.stop)
    local = {k: v[prompts] if k in ("scores", "h_tilde") else v for k, v in batch.items()}
    local.update(logits=batch["logits"][rows], labels=batch["labels"][rows], ref_logps=batch["ref_logps"][rows])
    results = {}
    for backend in ("fused", "reference"):
        out, grad = loss_and_grad(backend, local, **DIST, process_group=dist.group.WORLD)
        results[backend] = (out.loss.item(), grad, out.weights)
    linear = _linear_problem(B=4)
    results["linear"] = _linear_loss("fused", linear, prompts, h_scale="batch", mode="single_pass", chunk_bytes=1,
                                     process_group=dist.group.WORLD)
    return results


@pytest.mark.multiproc
def test_batch_over_two_gloo_ranks_equals_one_process() -> None:
    results = run_gloo(_rank_main, len(SPLIT))
    world = len(SPLIT)
    # Each rank dividing by its own mean would be another objective: the test tells them apart.
    batch = _dist_batch()
    h = batch["h_tilde"]
    per_rank = {**batch, "h_tilde": torch.cat([h[:3] / h[:3].mean(), h[3:] / h[3:].mean()])}
    wrong, _ = loss_and_grad("reference", per_rank, **{**DIST, "h_scale": "none"})
    assert abs(wrong.loss.item() - results[0]["reference"][0]) > 1e-3
    for backend in ("fused", "reference"):
        single, grad = loss_and_grad(backend, _dist_batch(), **DIST)
        losses = [r[backend][0] for r in results]
        assert losses[0] == losses[1] == pytest.approx(single.loss.item(), rel=1e-6), backend
        local_grads = torch.cat([r[backend][1] for r in results]) / world
        assert_close(local_grads, grad, 1e-5, f"{backend} d logits")
        assert_close(torch.cat([r[backend][2] for r in results]), single.weights, 1e-6, f"{backend} weights")
    loss, weights, grads = _linear_loss("reference", _linear_problem(B=4), h_scale="batch")
    (loss0, w0, grads0), (loss1, w1, grads1) = (r["linear"] for r in results)
    assert loss0.item() == loss1.item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(torch.cat([w0, w1]), weights)
    torch.testing.assert_close(torch.cat([grads0[0], grads1[0]]) / world, grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((grads0[1] + grads1[1]) / world, grads[1], rtol=1e-4, atol=1e-6)
