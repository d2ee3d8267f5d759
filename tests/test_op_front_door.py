"""The public op's single front door (dora_engine/ops/__init__.py): backend choice, limits, options that
every backend honours, and the label convention (docs/design.md section 5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dora_engine import ops
from dora_engine.ops import fused
from dora_engine.ops.builder import OpLoadError

ROOT = Path(__file__).resolve().parents[1]


def batch(B: int = 2, K: int = 3, T: int = 5, V: int = 23, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B * K, T), generator=g)
    labels[:, 0] = -100
    return dict(
        logits=torch.randn(B * K, T, V, generator=g, dtype=torch.float64), labels=labels, num_responses=K,
        scores=torch.randn(B, K, generator=g, dtype=torch.float64),
        h_tilde=torch.rand(B, generator=g, dtype=torch.float64) + 0.5,
        ref_logps=-torch.rand(B * K, generator=g, dtype=torch.float64) * 5,
    )


@pytest.fixture
def fresh_fallback_warning(monkeypatch):
    monkeypatch.setattr(ops, "_fallback_warned", False)


def test_auto_falls_back_to_the_reference_only_when_the_extension_cannot_load(monkeypatch, fresh_fallback_warning):
    def no_extension():
        raise OpLoadError("just-in-time build failed: no compiler")

    monkeypatch.setattr(ops, "_load_fused", no_extension)
    with pytest.warns(RuntimeWarning, match="fused op unavailable .*no compiler.*using the PyTorch reference"):
        out = ops.dora_loss(**batch(), backend="auto")
    assert torch.isfinite(out.loss)
    with pytest.raises(OpLoadError, match="no compiler"):
        ops.dora_loss(**batch(), backend="fused")


def test_a_bug_in_the_fused_backend_is_not_hidden_by_auto(monkeypatch, fresh_fallback_warning):
    def broken():
        raise NameError("name 'kernels' is not defined")

    monkeypatch.setattr(ops, "_load_fused", broken)
    with pytest.raises(NameError, match="kernels"):
        ops.dora_loss(**batch(), backend="auto")


def test_the_fused_response_limit_is_checked_in_python_and_matches_the_header():
    header = (ROOT / "csrc" / "include" / "dora_math.h").read_text()
    assert int(re.search(r"kMaxResponses\s*=\s*(\d+)", header).group(1)) == fused.MAX_RESPONSES
    K = fused.MAX_RESPONSES + 1
    inputs = batch(B=1, K=K, T=2, V=5)
    with pytest.raises(ValueError, match=f"K = {K} exceeds the fused backend's limit of {K - 1}.*backend='reference'"):
        ops.dora_loss(**inputs, backend="fused")
    assert torch.isfinite(ops.dora_loss(**inputs, backend="reference").loss)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_options_are_validated_for_every_backend(backend: str):
    inputs = batch()
    labels = inputs.pop("labels")
    inputs.pop("logits")
    hidden, weight = torch.randn(6, 5, 4, dtype=torch.float64), torch.randn(23, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown mode 'fast'; valid: single_pass, recompute"):
        ops.dora_loss_linear(hidden, weight, labels, **inputs, mode="fast", backend=backend)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive integer"):
        ops.dora_loss_linear(hidden, weight, labels, **inputs, chunk_bytes=0, backend=backend)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive integer"):
        ops.sequence_logprobs_linear(hidden, weight, labels, chunk_bytes=-1, backend=backend)
    with pytest.raises(ValueError, match="unknown mode 'fast'; valid: single_pass, recompute"):
        ops.nll_linear(hidden, weight, labels, mode="fast", backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, H\) with H = 4"):
        ops.nll_linear(hidden, weight[:, :3], labels, backend=backend)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs (activation memory)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_the_reference_honours_mode_and_chunk_bytes():
    """Same values in both modes; recompute keeps no chunk of logits for backward, single_pass keeps them."""
    inputs = batch(B=2, K=2, T=6, V=1000)
    labels = inputs.pop("labels")
    inputs.pop("logits")
    hidden = torch.randn(4, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1000, 8, dtype=torch.float64, requires_grad=True)
    chunk = 2 * 1000 * 8  # two tokens' logits per recompute chunk; one prompt per single_pass chunk
    results, kept = {}, {}
    for mode in ("single_pass", "recompute"):
        def run(mode=mode):
            results[mode] = ops.dora_loss_linear(hidden, weight, labels, **inputs, mode=mode, chunk_bytes=chunk,
                                                 backend="reference")
        kept[mode] = saved_bytes(run)
        results[mode] = (results[mode].loss, *torch.autograd.grad(results[mode].loss, (hidden, weight)))
    for a, b in zip(results["single_pass"], results["recompute"], strict=True):
        torch.testing.assert_close(a, b)
    logits_bytes, weight_bytes = 4 * 6 * 1000 * 8, 1000 * 8 * 8  # the weight is saved too, not an activation
    assert kept["single_pass"] - weight_bytes >= logits_bytes
    assert kept["recompute"] - weight_bytes < logits_bytes / 50


def test_inplace_backward_is_a_permission_the_reference_does_not_use():
    inputs = batch()
    logits = inputs.pop("logits").requires_grad_(True)
    before = logits.detach().clone()
    ops.dora_loss(logits, **inputs, inplace_backward=True, backend="reference").loss.backward()
    assert torch.equal(logits.detach(), before) and logits.grad is not None


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_shift_labels_equals_slicing_the_logits(backend: str):
    """Hugging Face labels: shift_labels on whole logits equals the usual logits[:, :-1] / labels[:, 1:]."""
    inputs = batch()
    logits, hf_labels = inputs.pop("logits"), inputs.pop("labels")
    hf_labels[:, :2] = -100
    aligned = ops.shift_labels(hf_labels)
    assert torch.equal(aligned[:, :-1], hf_labels[:, 1:]) and (aligned[:, -1] == -100).all()
    whole = ops.dora_loss(logits, aligned, **inputs, backend=backend)
    sliced = ops.dora_loss(logits[:, :-1], hf_labels[:, 1:], **inputs, backend=backend)
    torch.testing.assert_close(whole.loss, sliced.loss)
    with pytest.raises(ValueError, match="labels must be a 2-D tensor"):
        ops.shift_labels(hf_labels[0])


def test_the_objective_and_the_flat_arguments_give_one_loss():
    objective = ops.RobustObjective(loss="dpo", loss_params={"beta": 0.3}, strategy="dro", lam=0.5)
    by_value = ops.dora_loss(**batch(), objective=objective, backend="reference")
    flat = ops.dora_loss(**batch(), loss="dpo", loss_params={"beta": 0.3}, strategy="dro", lam=0.5, backend="reference")
    resolved = ops.dora_loss(**batch(), objective=objective.resolve(), backend="reference")
    assert by_value.loss.item() == flat.loss.item() == resolved.loss.item()
    with pytest.raises(ValueError, match="either objective or strategy, not both"):
        ops.dora_loss(**batch(), objective=objective, strategy="erm", backend="reference")
