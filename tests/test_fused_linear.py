"""Fused-linear DoRA loss (docs/design.md section 5) against the reference logits path: values, gradients, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from dora_engine import ops
from dora_engine.losses import LOSSES, STRATEGIES
from dora_engine.ops import fused_linear
from dora_engine.ops.chunking import default_chunk_bytes, group_spans

dora_loss_linear = partial(ops.dora_loss_linear, backend="fused")
sequence_logprobs_linear = partial(ops.sequence_logprobs_linear, backend="fused")
reference_loss_linear = partial(ops.dora_loss_linear, backend="reference")
reference_logprobs_linear = partial(ops.sequence_logprobs_linear, backend="reference")

MODES = ("single_pass", "recompute")


def make_problem(B: int, K: int, T: int, H: int, V: int, dtype: torch.dtype, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    N = B * K
    hidden = torch.randn(N, T, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(V, generator=g).to(dtype).requires_grad_(True) if bias else None
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, : T // 3] = -100  # prompt tokens
    labels[1, -1] = -100  # padding
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    loss_kwargs = {
        "num_responses": K,
        "scores": torch.randn(B, K, generator=g).to(acc),
        "h_tilde": (torch.rand(B, generator=g) + 0.5).to(acc),
        "ref_logps": (3 * torch.randn(N, generator=g)).to(acc),
    }
    return hidden, weight, b, labels, loss_kwargs


def run(fn, hidden, weight, bias, labels, grad_scale: float = 1.7, **kwargs):
    out = fn(hidden, weight, labels, bias=bias, **kwargs)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(out.loss * grad_scale, params)
    return out, grads


def fused_logits_path(hidden, weight, labels, *, bias, **kwargs):
    """hidden @ Wᵀ + b materialised, then the fused op writing its gradient over the logits."""
    return ops.dora_loss(F.linear(hidden, weight, bias), labels, inplace_backward=True, backend="fused", **kwargs)


def assert_same(out, grads, expected_out, expected_grads, rtol: float, atol: float):
    for field in out._fields:
        torch.testing.assert_close(getattr(out, field), getattr(expected_out, field), rtol=rtol, atol=atol)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item())


@pytest.mark.parametrize("mode", MODES)
def test_every_loss_and_strategy_matches_the_logits_path(mode):
    # float64 and 5 prompts of 11-12 scored rows in chunks of 36 rows (3 prompts, then 2): exact up to rounding.
    hidden, weight, bias, labels, kw = make_problem(B=5, K=3, T=6, H=8, V=13, dtype=torch.float64)
    chunk_bytes = 2 * 3 * 6 * 13 * 8 if mode == "single_pass" else 7 * 13 * 8
    for loss in LOSSES:
        for strategy in STRATEGIES:
            args = {**kw, "loss": loss, "strategy": strategy, "lam": 0.7}
            want = run(reference_loss_linear, hidden, weight, bias, labels, **args)
            logits_path = run(fused_logits_path, hidden, weight, bias, labels, **args)
            got = run(dora_loss_linear, hidden, weight, bias, labels, mode=mode, chunk_bytes=chunk_bytes, **args)
            assert_same(*got, *want, rtol=1e-9, atol=1e-10)
            assert_same(*got, *logits_path, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "K", "chunk_prompts"), [(4, 2, 2), (3, 5, 2), (2, 8, 1), (3, 4, 10)])
def test_dtypes_chunkings_and_group_sizes(mode, dtype, B, K, chunk_prompts):
    T, H, V = 7, 16, 50
    hidden, weight, bias, labels, kw = make_problem(B, K, T, H, V, dtype, seed=B * K)
    # the logits of chunk_prompts prompts' K·T rows; with a third of each row unscored, more prompts fit
    chunk_bytes = chunk_prompts * K * T * V * hidden.element_size()
    if mode == "recompute":
        chunk_bytes //= 3 * K  # chunks end inside sequences
    args = {**kw, "loss": "dpo_pl", "strategy": "dora", "lam": 0.3}
    want = run(reference_loss_linear, hidden, weight, bias, labels, **args)
    got = run(dora_loss_linear, hidden, weight, bias, labels, mode=mode, chunk_bytes=chunk_bytes, **args)
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    assert_same(*got, *want, *tol)


class RowCounter:
    """Records the rows of every logits GEMM of the fused-linear path."""

    def __init__(self, monkeypatch):
        self.rows = []
        linear_into = fused_linear._linear_into

        def counted(buffer, x, weight, bias):
            self.rows.append(x.shape[0])
            return linear_into(buffer, x, weight, bias)

        monkeypatch.setattr(fused_linear, "_linear_into", counted)


@pytest.mark.parametrize("op", ["nll_linear", "sequence_logprobs_linear"])
@pytest.mark.parametrize("mode", MODES)
def test_prompt_tokens_and_padding_cost_no_logits(monkeypatch, op, mode):
    """Every logits GEMM runs on scored rows only (labels ≠ ignore_index): a third of each row is prompt, one
    row ends in padding, one has nothing scored; forward (and recompute's backward) cover each row once."""
    hidden, weight, bias, labels, _ = make_problem(B=3, K=2, T=9, H=8, V=20, dtype=torch.float32)
    labels[4] = -100
    want = run(nll_of_the_logits, hidden, weight, bias, labels)
    counter = RowCounter(monkeypatch)
    if op == "nll_linear":
        got = run(ops.nll_linear, hidden, weight, bias, labels, mode=mode, backend="fused", chunk_bytes=4 * 20 * 4)
        assert_same(*got, *want, rtol=1e-5, atol=1e-5)
    else:
        S, _ = sequence_logprobs_linear(hidden, weight, labels, bias=bias, chunk_bytes=4 * 20 * 4)
        S.sum().backward()
    passes = 2 if mode == "recompute" or op == "sequence_logprobs_linear" else 1
    assert sum(counter.rows) == passes * int((labels != -100).sum())
    assert max(counter.rows) == 4


@pytest.mark.parametrize(("chunk_rows", "gemm_rows"), [(12, [11, 12, 12]), (24, [23, 12]), (5, [11, 12, 12])])
def test_single_pass_chunks_whole_prompts(monkeypatch, chunk_rows, gemm_rows):
    """Prompts of 11, 12 and 12 scored rows (a third of each row is prompt, one row ends in padding) packed
    whole, in order, while they fit ``chunk_rows`` logits rows, never cut: the values are the reference's."""
    hidden, weight, bias, labels, kw = make_problem(B=3, K=2, T=9, H=8, V=20, dtype=torch.float32)
    args = {**kw, "loss": "dpo_pl", "strategy": "dora", "lam": 0.5}
    want = run(reference_loss_linear, hidden, weight, bias, labels, **args)
    counter = RowCounter(monkeypatch)
    got = run(dora_loss_linear, hidden, weight, bias, labels, chunk_bytes=chunk_rows * 20 * 4, **args)
    assert counter.rows == gemm_rows
    assert_same(*got, *want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_nothing_scored_at_all(mode):
    hidden, weight, bias, labels, kw = make_problem(B=2, K=2, T=5, H=8, V=20, dtype=torch.float32)
    labels[:] = -100
    # Unvalidated (the front door refuses such rows): no logits, S = 0, no NaN, the reference's numbers.
    args = {**kw, "loss": "dpo", "strategy": "dora", "lam": 0.5, "validate": False}
    want = run(reference_loss_linear, hidden, weight, bias, labels, **args)
    got = run(dora_loss_linear, hidden, weight, bias, labels, mode=mode, **args)
    assert_same(*got, *want, rtol=1e-6, atol=1e-6)
    assert not got[1][0].any() and not got[1][1].any()


def test_default_chunk_holds_at_least_512_rows(monkeypatch):
    """With chunk_bytes None on CPU: 64 MiB, but never fewer than 512 rows of logits (here 64 MiB holds 419)."""
    assert default_chunk_bytes("cpu", 1000, 4) == 64 << 20
    assert default_chunk_bytes("cpu", 40_000, 4) == 512 * 40_000 * 4
    assert default_chunk_bytes("cuda", 40_000, 2) == 256 << 20
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 400, 8, generator=g, requires_grad=True)
    weight = torch.randn(40_000, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 40_000, (2, 400), generator=g)
    counter = RowCounter(monkeypatch)
    ops.nll_linear(hidden, weight, labels, backend="fused").loss.backward()
    assert counter.rows == [512, 288]


def test_group_spans_pack_whole_groups():
    assert group_spans([3, 3, 3], 6) == [(0, 2), (2, 3)]
    assert group_spans([7, 1, 0, 2], 3) == [(0, 1), (1, 4)]  # a group larger than a chunk is a chunk of its own
    assert group_spans([0, 0], 1) == [(0, 2)]
    assert group_spans([], 4) == []


def test_bf16_weight_gradient_accumulates_in_fp32():
    # Many chunks each adding a small contribution: bf16 accumulation would drift, fp32 does not.
    hidden, weight, bias, labels, kw = make_problem(B=16, K=2, T=4, H=8, V=32, dtype=torch.bfloat16)
    exact = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    args = {**kw, "loss": "simpo", "strategy": "erm"}
    _, want = run(reference_loss_linear, *exact, labels, **{k: v.double() if torch.is_tensor(v) else v
                                                                  for k, v in args.items()})
    _, got = run(dora_loss_linear, hidden, weight, bias, labels, chunk_bytes=1, **args)
    rel = (got[1].double() - want[1]).norm() / want[1].norm()
    assert rel < 1e-2


@pytest.mark.parametrize("mode", MODES)
def test_without_bias_and_without_grad(mode):
    hidden, weight, _, labels, kw = make_problem(B=3, K=2, T=5, H=8, V=20, dtype=torch.float32, bias=False)
    want = run(reference_loss_linear, hidden, weight, None, labels, **kw)
    got = run(dora_loss_linear, hidden, weight, None, labels, mode=mode, chunk_bytes=1, **kw)
    assert_same(*got, *want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = dora_loss_linear(hidden, weight, labels, mode=mode, **kw)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, want[0].loss)
    frozen = weight.detach()  # e.g. LoRA training: the lm_head is frozen, only d hidden is formed
    (grad_hidden,) = torch.autograd.grad(dora_loss_linear(hidden, frozen, labels, mode=mode, **kw).loss, hidden)
    torch.testing.assert_close(grad_hidden * 1.7, want[1][0], rtol=1e-5, atol=1e-6)


def test_single_pass_refuses_a_second_backward():
    hidden, weight, bias, labels, kw = make_problem(B=2, K=2, T=4, H=8, V=10, dtype=torch.float32)
    out = dora_loss_linear(hidden, weight, labels, bias=bias, **kw)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.loss.backward()


def test_global_reduction_of_a_skewed_batch_stays_finite():
    # λ small and ℓ spread widely: later chunks dominate, earlier chunks' weights underflow to 0.
    hidden, weight, bias, labels, kw = make_problem(B=6, K=2, T=5, H=8, V=20, dtype=torch.float32)
    with torch.no_grad():
        hidden[::4] *= 30
    args = {**kw, "loss": "ipo", "strategy": "dora", "lam": 1e-3}
    want = run(reference_loss_linear, hidden, weight, bias, labels, **args)
    got = run(dora_loss_linear, hidden, weight, bias, labels, chunk_bytes=1, **args)
    assert all(torch.isfinite(g).all() for g in got[1])
    assert_same(*got, *want, rtol=1e-4, atol=1e-5)


def test_sequence_logprobs_linear_matches_reference():
    hidden, weight, bias, labels, _ = make_problem(B=3, K=2, T=6, H=8, V=17, dtype=torch.float32)
    labels[4] = -100  # a row with no valid token: S = L = 0
    weights = torch.arange(6, dtype=torch.float32)
    results = []
    for fn, extra in ((reference_logprobs_linear, {}), (sequence_logprobs_linear, {"chunk_bytes": 1})):
        S, L = fn(hidden, weight, labels, bias=bias, **extra)
        results.append((S, L, torch.autograd.grad((S * weights).sum(), (hidden, weight, bias))))
    (S, L, grads), (S_ref, L_ref, grads_ref) = results[1], results[0]
    torch.testing.assert_close(S, S_ref)
    torch.testing.assert_close(L, L_ref)
    assert S[4] == 0 and L[4] == 0
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def nll_of_the_logits(hidden, weight, labels, *, bias, **_):
    """The summed NLL of the materialised logits hidden @ Wᵀ + b through the reference row pass (autograd)."""
    return ops.NLLOutput.of(*ops.sequence_logprobs(F.linear(hidden, weight, bias), labels, backend="reference"))


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_nll_linear_matches_the_logits_path(backend, mode, dtype, bias):
    """The summed NLL of SFT in one pass (or recomputed): the values and gradients of the logits path, with
    prompt and padding labels, a row without a scored token, token chunks ending inside sequences or one chunk."""
    hidden, weight, b, labels, _ = make_problem(B=3, K=2, T=7, H=16, V=50, dtype=dtype, bias=bias, seed=11)
    labels[4] = -100  # nothing scored: S = L = 0 and no gradient
    tol = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    want = run(nll_of_the_logits, hidden, weight, b, labels)
    for chunk_bytes in (5 * 50 * hidden.element_size(), None):
        got = run(ops.nll_linear, hidden, weight, b, labels, mode=mode, chunk_bytes=chunk_bytes, backend=backend)
        assert_same(*got, *want, *tol)
        assert got[0].seq_logps[4] == 0 and got[0].seq_lens[4] == 0 and not got[1][0][4].any()
    torch.testing.assert_close(got[0].loss, -got[0].seq_logps.sum())


@pytest.mark.parametrize("mode", MODES)
def test_nll_linear_without_grad_with_a_frozen_head_and_backward_once(mode):
    hidden, weight, bias, labels, _ = make_problem(B=2, K=2, T=5, H=8, V=20, dtype=torch.float32)
    want_out, want_grads = run(nll_of_the_logits, hidden, weight, bias, labels)
    with torch.no_grad():
        out = ops.nll_linear(hidden, weight, labels, bias=bias, mode=mode, chunk_bytes=1, backend="fused")
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, want_out.loss)
    frozen = ops.nll_linear(hidden, weight.detach(), labels, bias=bias.detach(), mode=mode, backend="fused")
    (grad_hidden,) = torch.autograd.grad(frozen.loss * 1.7, hidden)  # only d hidden is formed (LoRA)
    torch.testing.assert_close(grad_hidden, want_grads[0], rtol=1e-5, atol=1e-6)
    out = ops.nll_linear(hidden, weight, labels, bias=bias, mode=mode, backend="fused")
    out.loss.backward(retain_graph=True)
    if mode == "single_pass":
        with pytest.raises(RuntimeError, match="retain_graph"):
            out.loss.backward()


def test_bad_input_is_named():
    hidden, weight, bias, labels, kw = make_problem(B=2, K=2, T=4, H=8, V=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="mode"):
        dora_loss_linear(hidden, weight, labels, mode="twice", **kw)
    with pytest.raises(ValueError, match="chunk_bytes"):
        dora_loss_linear(hidden, weight, labels, chunk_bytes=0, **kw)
    for fn in (reference_loss_linear, dora_loss_linear):
        with pytest.raises(ValueError, match=r"weight must have shape \(V, H\)"):
            fn(hidden, weight[:, :4], labels, **kw)
        bad = labels.clone()
        bad[3] = -100
        with pytest.raises(ValueError, match="response row 3 .prompt 1, response 1. has no valid label token"):
            fn(hidden, weight, bad, **kw)
        bad[3, 0] = 10
        with pytest.raises(ValueError, match=r"labels\[3, 0\] = 10 is outside \[0, 10\)"):
            fn(hidden, weight, bad, **kw)


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from dora_engine.ops import dora_loss_linear, nll_linear
    op, mode, B, K, T, H, V = sys.argv[1], sys.argv[2], 8, 2, 50, 16, 125_000
    torch.manual_seed(0)
    hidden = torch.randn(B * K, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (B * K, T))
    kw = dict(num_responses=K, scores=torch.randn(B, K), h_tilde=torch.rand(B) + 0.5, ref_logps=torch.randn(B * K))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if op == "nll_linear":
        out = nll_linear(hidden, weight, labels, mode=mode, chunk_bytes=10 << 20, backend="fused")
    else:
        out = dora_loss_linear(hidden, weight, labels, mode=mode, chunk_bytes=10 << 20, backend="fused", **kw)
    out.loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_bytes": (after - before) * 1024, "logits_bytes": B * K * T * V * 4}))
    """
)


@pytest.mark.parametrize("op", ["dora_loss_linear", "nll_linear"])
@pytest.mark.parametrize("mode", MODES)
def test_no_full_logits_allocation(op, mode):
    # N·T·V·4 = 400 MB of logits; a chunk is one prompt (50 MB) or 20 tokens (10 MB; nll_linear's single pass too).
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, op, mode], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["extra_bytes"] < 0.25 * result["logits_bytes"], result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_the_logits_path(mode, dtype):
    # On CUDA the bf16 weight gradient is accumulated by a mixed-dtype GEMM straight into fp32.
    hidden, weight, bias, labels, kw = make_problem(B=6, K=4, T=33, H=64, V=1000, dtype=dtype)
    cuda = [t.detach().cuda().requires_grad_(True) for t in (hidden, weight, bias)]
    kw = {k: v.cuda() for k, v in kw.items() if torch.is_tensor(v)} | {"num_responses": 4}
    want = run(reference_loss_linear, *cuda[:2], cuda[2], labels.cuda(), **kw)
    got = run(dora_loss_linear, *cuda[:2], cuda[2], labels.cuda(), mode=mode, chunk_bytes=1 << 20, **kw)
    tol = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    assert_same(*got, *want, *tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_nll_linear_matches_the_logits_path(mode, dtype):
    hidden, weight, bias, labels, _ = make_problem(B=6, K=4, T=33, H=64, V=1000, dtype=dtype)
    labels[5] = -100
    cuda = [t.detach().cuda().requires_grad_(True) for t in (hidden, weight, bias)]
    want = run(nll_of_the_logits, *cuda[:2], cuda[2], labels.cuda())
    got = run(ops.nll_linear, *cuda[:2], cuda[2], labels.cuda(), mode=mode, chunk_bytes=1 << 20, backend="fused")
    tol = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    assert_same(*got, *want, *tol)


@pytest.mark.parametrize(
    "mixed_gemm",
    [False, pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA device")])],
)
def test_weight_gradient_accumulates_in_fp32_with_and_without_a_mixed_dtype_gemm(monkeypatch, mixed_gemm):
    """Where ``addmm(out_dtype=)`` does not work (every CPU, older torch) the fallback: one bf16 product per
    chunk, summed into the fp32 accumulator; the running rescale is ``rescale_`` on the accumulator."""
    device = "cuda" if mixed_gemm else "cpu"
    if mixed_gemm and not fused_linear.mixed_addmm_works(torch.device(device), torch.bfloat16):
        pytest.skip("addmm(out_dtype=) does not work for bf16 on this torch's CUDA")
    monkeypatch.setitem(fused_linear._MIXED_ADDMM, (device, torch.bfloat16), mixed_gemm)
    g = torch.Generator().manual_seed(0)
    dz = [torch.randn(7, 5, generator=g).bfloat16().to(device) for _ in range(3)]
    x = [torch.randn(7, 3, generator=g).bfloat16().to(device) for _ in range(3)]
    acc = torch.zeros(5, 3, device=device)
    want = torch.zeros(5, 3, dtype=torch.float64, device=device)
    for d, h, beta in zip(dz, x, (1.0, 0.5, 2.0), strict=True):
        torch.ops.dora_engine.rescale_(acc, torch.tensor(beta, device=device))
        fused_linear._accumulate_weight_grad(acc, d, h)
        want = beta * want + d.double().t() @ h.double()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), want, rtol=2e-2, atol=2e-2)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                    reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
def test_rescale_leaves_the_accumulator_alone_for_a_factor_of_one(device):
    x = torch.randn(100, 7, device=device)
    x[3, 4] = float("nan")
    before = x.clone()
    torch.ops.dora_engine.rescale_(x, torch.ones((), device=device))
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())
    torch.ops.dora_engine.rescale_(x, torch.tensor(0.5, device=device))
    torch.testing.assert_close(x, before * 0.5, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("floor", [1.0, 1e-3, None])
def test_single_pass_renormalises_its_accumulators_when_the_unit_gets_small(monkeypatch, device, floor):
    """Every chunk (floor 1), sometimes (1e-3) or with the default floor, where λ is so small that the weights of
    earlier chunks underflow: the same gradients as the reference (without renormalising, dz / unit overflows)."""
    if floor is not None:
        monkeypatch.setattr(fused_linear, "_DEFAULT_UNIT_FLOOR", floor)
    kernels, factors = fused_linear._kernels, []

    class RecordingKernels:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def rescale_(self, x, factor):
            factors.append(factor.item())
            kernels.rescale_(x, factor)

    monkeypatch.setattr(fused_linear, "_kernels", RecordingKernels())
    hidden, weight, bias, labels, kw = make_problem(B=6, K=2, T=5, H=8, V=20, dtype=torch.float32, seed=3)
    with torch.no_grad():
        hidden[4:] *= 3  # later prompts with larger losses: the unit falls by orders of magnitude
    params = [t.detach().to(device).requires_grad_(True) for t in (hidden, weight, bias)]
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    args = {**kw, "loss": "ipo", "strategy": "dora", "lam": 0.05}
    want = run(reference_loss_linear, *params[:2], params[2], labels.to(device), **args)
    got = run(dora_loss_linear, *params[:2], params[2], labels.to(device), chunk_bytes=1, **args)
    assert_same(*got, *want, rtol=1e-4, atol=1e-5)
    assert any(f < 1 for f in factors)  # the accumulators were renormalised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["dora", "erm"])
def test_single_pass_synchronises_with_the_host_once(strategy):
    """The per-chunk rescale stays on the device: forward and backward make one host synchronisation in
    all, the scored-row counts that size the chunks (sync debug mode "warn" reports each one)."""
    hidden, weight, bias, labels, kw = make_problem(B=6, K=2, T=9, H=32, V=300, dtype=torch.bfloat16, seed=5)
    params = [t.detach().cuda().requires_grad_(True) for t in (hidden, weight, bias)]
    kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}
    labels = labels.cuda()
    args = {**kw, "loss": "dpo_pl", "strategy": strategy, "lam": 0.5, "chunk_bytes": 1, "validate": False}
    want = run(reference_loss_linear, *params[:2], params[2], labels, **args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run(dora_loss_linear, *params[:2], params[2], labels, **args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert_same(*got, *want, rtol=2e-2, atol=2e-2)
