"""The fused C++/CUDA backend against the pure-PyTorch reference (docs/design.md sections 4, 5 and 7).

The reference backend (on the ``dora_engine.losses`` registry) is the oracle for
values and gradients. Device-parametrised tests run on CPU and, marked ``gpu``, on CUDA when present.
The extension is built once (just in time, cached under TORCH_EXTENSIONS_DIR) for the whole session.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from multiproc import run_gloo

from dora_engine import ops
from dora_engine.losses import LOSSES, STRATEGIES, encode_params, resolve_params
from dora_engine.ops.builder import load_ops
from dora_engine.ops.validation import accumulation_dtype

load_ops()  # the registered ops are called directly below

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
V_ODD = 1003  # not a multiple of any vector width (4 fp32, 8 bf16/fp16, 2 fp64 values per 16 bytes)


def make_batch(B: int, K: int, *, T: int = 6, V: int = 67, dtype=torch.float32, device="cpu", seed: int = 0,
               tied_scores: bool = False) -> dict:
    """Logits with prompt tokens and padding masked, scores, h̃ and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    N = B * K
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, :2] = -100  # prompt tokens
    labels[0, T - 2 :] = -100  # padding at the end of a response
    scores = torch.randint(0, 3, (B, K), generator=g).double() if tied_scores else torch.randn(B, K, generator=g)
    return dict(
        logits=(torch.randn(N, T, V, generator=g) * 2).to(dtype).to(device),
        labels=labels.to(device),
        num_responses=K,
        scores=scores.float().to(device),
        h_tilde=(torch.rand(B, generator=g) + 0.5).to(device),
        ref_logps=(-torch.rand(N, generator=g) * 20).to(device),
    )


def loss_and_grad(backend: str, batch: dict, **kwargs):
    logits = batch["logits"].clone().requires_grad_(True)
    rest = {k: v for k, v in batch.items() if k != "logits"}
    out = ops.dora_loss(logits, **rest, **kwargs, backend=backend)
    out.loss.backward()
    return out, logits.grad


def oracle(batch: dict, **kwargs):
    """The reference in float64 on the same input values: the exact answer the op is held to."""
    wide = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    return loss_and_grad("reference", wide, **kwargs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """|actual − expected| ≤ rtol·(|expected| + max|expected|): relative, with the tensor's scale as floor."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------
# Row passes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sequence_logprobs_values_and_gradients(device: str, dtype: torch.dtype) -> None:
    batch = make_batch(2, 3, T=9, V=V_ODD, dtype=dtype, device=device)
    labels = batch["labels"]
    labels[4] = -100  # a fully masked padding row: S = L = 0, zero gradient
    weights = torch.randn(labels.shape[0], device=device, dtype=torch.float64)
    results = []
    for backend, z in (("fused", batch["logits"]), ("reference", batch["logits"].double())):
        logits = z.clone().requires_grad_(True)
        S, L = ops.sequence_logprobs(logits, labels, backend=backend)
        (S.double() * weights).sum().backward()
        results.append((S, L, logits.grad))
    (S, L, grad), (S_ref, L_ref, grad_ref) = results
    assert S.dtype == L.dtype == accumulation_dtype(dtype)
    assert S[4].item() == 0.0 and L[4].item() == 0.0 and not grad[4].any()
    assert torch.equal(L.double(), L_ref)
    assert_close(S, S_ref, TOLERANCE[dtype], "S")
    assert grad.dtype == dtype
    assert_close(grad.double(), grad_ref.double(), TOLERANCE[dtype], "d logits")


def test_float64_gradcheck() -> None:
    batch = make_batch(1, 2, T=3, V=11, dtype=torch.float64)
    logits = batch["logits"].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: ops.sequence_logprobs(z, batch["labels"], backend="fused")[0], (logits,))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_target_term_formed_in_fp32(device: str) -> None:
    # A confident token: p_y ≈ 1 − 1e-4. In bf16, 1 − p_y would round to 0; the op must keep it.
    logits = torch.zeros(1, 1, 16)
    logits[0, 0, 3] = 12.0
    labels = torch.tensor([[3]], device=device)
    z = logits.to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    ops.sequence_logprobs(z, labels, backend="fused")[0].sum().backward()
    expected = 1 - torch.softmax(logits.double(), -1)[0, 0, 3]
    assert z.grad[0, 0, 3].item() == pytest.approx(expected.item(), rel=1e-2)


# --------------------------------------------------------------------------------------------------
# The whole loss: every loss × strategy
# --------------------------------------------------------------------------------------------------

COMBOS = [(loss, strategy) for loss in LOSSES for strategy in STRATEGIES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("loss", "strategy"), COMBOS)
def test_dora_loss_matches_reference(device: str, loss: str, strategy: str) -> None:
    index = COMBOS.index((loss, strategy))
    K = 2 + index % 7  # K = 2..8 across the grid
    batch = make_batch(3, K, device=device, seed=index, tied_scores=index % 2 == 0)
    kwargs = dict(loss=loss, strategy=strategy, lam=0.7)
    out, grad = loss_and_grad("fused", batch, **kwargs)
    expected, grad_ref = oracle(batch, **kwargs)
    for field in ("loss", "per_sample_loss", "seq_logps", "seq_lens", "weights"):
        assert_close(getattr(out, field), getattr(expected, field), 1e-5, field)
    assert_close(grad, grad_ref, 1e-5, "d logits")
    assert not any(t.requires_grad for t in out[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_bf16_logits(device: str, loss: str) -> None:
    batch = make_batch(2, 4, V=V_ODD, dtype=torch.bfloat16, device=device, seed=7)
    out, grad = loss_and_grad("fused", batch, loss=loss, strategy="dora", lam=2.0)
    expected, grad_ref = oracle(batch, loss=loss, strategy="dora", lam=2.0)
    assert_close(out.loss, expected.loss, 2e-2, "loss")
    assert_close(grad, grad_ref, 2e-2, "d logits")


def test_lire_zscore_and_loss_params() -> None:
    batch = make_batch(3, 5, seed=3)
    batch["scores"][1] = 0.5  # all-equal scores: zero rewards
    for loss, params in (("lire", {"reward_norm": "zscore", "temperature": 25.0}), ("rdpo", {"alpha": 0.3}),
                         ("ipo", {"length_normalize": True})):
        out, grad = loss_and_grad("fused", batch, loss=loss, loss_params=params, strategy="dro", lam=0.2)
        expected, grad_ref = oracle(batch, loss=loss, loss_params=params, strategy="dro", lam=0.2)
        assert_close(out.loss, expected.loss, 1e-5, loss)
        assert_close(grad, grad_ref, 1e-5, loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_ipo_conventions_pinned(device: str, backend: str, length_normalize: bool) -> None:
    """IPO with the paper's summed log-ratios (default) and with TRL's per-token ones, against values and
    gradients written out here: ℓ = (x_c − x_r − 1/(2β))², x = ρ or ρ/L, d logits = gS·(onehot − softmax)."""
    B, K, beta = 3, 3, 0.4
    batch = make_batch(B, K, T=7, V=31, dtype=torch.float64, device=device, seed=17)
    batch["labels"][4, 2:5] = -100  # responses of different lengths
    params = {"beta": beta} | ({"length_normalize": True} if length_normalize else {})
    out, grad = loss_and_grad(backend, batch, loss="ipo", loss_params=params, strategy="erm")

    z, y = batch["logits"].cpu(), batch["labels"].cpu()
    valid = y != -100
    logp = torch.log_softmax(z, -1)
    S = (logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * valid).sum(-1).tolist()
    L = valid.sum(-1).tolist()
    ref, scores = batch["ref_logps"].cpu().tolist(), batch["scores"].cpu().tolist()
    gS = [0.0] * (B * K)
    ell = []
    for b in range(B):
        order = sorted(range(K), key=lambda k: (-scores[b][k], k))
        c, r = b * K + order[0], b * K + order[-1]
        scale = {n: 1 / max(L[n], 1) if length_normalize else 1.0 for n in (c, r)}
        d = (S[c] - ref[c]) * scale[c] - (S[r] - ref[r]) * scale[r] - 1 / (2 * beta)
        ell.append(d * d)
        gS[c] += 2 * d * scale[c] / B  # erm: ∂L/∂ℓ_b = 1/B
        gS[r] -= 2 * d * scale[r] / B
    onehot = torch.nn.functional.one_hot(y.clamp(min=0), z.shape[-1]).double()
    want_grad = torch.tensor(gS, dtype=torch.float64)[:, None, None] * (onehot - logp.exp()) * valid[..., None]

    assert out.per_sample_loss.tolist() == pytest.approx(ell, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(ell) / B, rel=1e-12)
    torch.testing.assert_close(grad.cpu(), want_grad, rtol=1e-10, atol=1e-12)


def test_ipo_length_normalize_differs_from_the_sums() -> None:
    batch = make_batch(2, 2, seed=4)
    batch["labels"][1, 3:] = -100
    paper = ops.dora_loss(**batch, loss="ipo", strategy="erm", backend="fused").loss
    trl = ops.dora_loss(**batch, loss="ipo", loss_params={"length_normalize": True}, strategy="erm",
                        backend="fused").loss
    assert abs(paper.item() - trl.item()) > 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_overwrites_logits_with_their_gradient(device: str) -> None:
    """The gradient lands in the logits buffer, also for a strided view; overlapping rows get a new buffer."""
    batch = make_batch(2, 3, V=V_ODD, seed=5, device=device)
    rest = {k: v for k, v in batch.items() if k != "logits"}
    expected, grad_ref = oracle({**batch, "logits": batch["logits"] * 2.0})
    base = batch["logits"].clone().requires_grad_(True)
    logits = base * 2.0  # a non-leaf buffer whose producer does not keep it for backward
    out = ops.dora_loss(logits, **rest, inplace_backward=True, backend="fused")
    out.loss.backward()
    assert_close(out.loss, expected.loss, 1e-5, "loss")
    assert_close(logits.detach(), grad_ref, 1e-5, "overwritten logits")
    assert_close(base.grad, 2.0 * grad_ref, 1e-5, "d base")

    strided = batch["logits"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert not strided.is_contiguous()
    ops.dora_loss(strided, **rest, inplace_backward=True, backend="fused").loss.backward()
    assert_close(strided.grad, oracle(batch)[1], 1e-5, "d strided logits")
    assert_close(strided.detach(), oracle(batch)[1], 1e-5, "overwritten strided logits")

    # Rows that share memory (an expanded tensor) cannot hold their gradients: a new buffer, logits kept.
    shared = batch["logits"][:1].expand(6, -1, -1).requires_grad_(True)
    expanded = {**batch, "logits": batch["logits"][:1].expand(6, -1, -1).contiguous()}
    before = shared.detach().clone()
    ops.dora_loss(shared, **rest, inplace_backward=True, backend="fused").loss.backward()
    assert_close(shared.grad, oracle(expanded)[1], 1e-5, "d expanded logits")
    assert torch.equal(shared.detach(), before)
    with pytest.raises(RuntimeError, match="rows that do not overlap"):
        S, _, lse = torch.ops.dora_engine.seq_logprobs_fwd(shared.detach(), batch["labels"], -100)
        torch.ops.dora_engine.seq_logprobs_bwd_(shared.detach(), batch["labels"], lse, torch.ones_like(S), -100)


# --------------------------------------------------------------------------------------------------
# One semantics on CPU and CUDA (docs/design.md section 7.1): NaN, unchecked labels, the label term
# --------------------------------------------------------------------------------------------------

V_LONG = 2100  # several CPU chunks of 512 values and CUDA packs of 16 bytes, not a multiple of either
# Vocabulary positions of every class: the first value of a row (and of CUDA's unaligned head), inside
# the head or a pack, the last value of a CPU chunk and the first of the next, the middle, the last pack
# and the scalar tail.
NAN_POSITIONS = [0, 3, 8, 511, 512, 1024, 1050, V_LONG - 9, V_LONG - 3, V_LONG - 1]


def unaligned_logits(N: int, T: int, V: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """(N, T, V) logits starting one element past a 16-byte boundary, so that every row has a head and a tail
    of values outside the 16-byte packs of the CUDA kernels."""
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randn(N * T * V + 1, generator=g) * 2).to(dtype).to(device)
    return flat[1:].view(N, T, V)


def logprobs_and_grad(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, **kwargs):
    z = logits.detach().clone().requires_grad_(True)
    S, L = ops.sequence_logprobs(z, labels, **kwargs)
    (grad,) = torch.autograd.grad((S.double() * weights).sum(), z)
    return S.detach(), L, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("position", NAN_POSITIONS)
def test_a_nan_anywhere_in_a_row_makes_its_log_prob_and_gradient_nan(device: str, dtype: torch.dtype,
                                                                      position: int) -> None:
    logits = unaligned_logits(2, 3, V_LONG, dtype, device)
    labels = torch.randint(0, V_LONG, (2, 3), generator=torch.Generator().manual_seed(1)).to(device)
    weights = torch.randn(2, dtype=torch.float64, device=device)
    clean_S, _, clean_grad = logprobs_and_grad(logits, labels, weights, backend="fused")
    logits[1, 2, position] = float("nan")
    S, L, grad = logprobs_and_grad(logits, labels, weights, backend="fused")
    assert torch.isnan(S[1]) and torch.equal(S[0], clean_S[0]) and L.tolist() == [3, 3]
    assert torch.isnan(grad[1, 2]).all(), "the whole gradient row of the NaN token is NaN"
    assert torch.equal(grad[1, :2], clean_grad[1, :2]) and torch.equal(grad[0], clean_grad[0])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_is_kept_whatever_surrounds_it(device: str) -> None:
    """A NaN that is the only value, that follows a chunk of −∞ (a masked vocabulary) or fills a whole chunk;
    −∞ values themselves are ordinary (a masked vocabulary gives the reference's finite values)."""
    only = torch.full((1, 2, 1), float("nan"), device=device)
    assert torch.isnan(ops.sequence_logprobs(only, torch.zeros(1, 2, dtype=torch.long, device=device),
                                             backend="fused")[0]).all()
    labels = torch.full((1, 3), 900, device=device)
    masked = unaligned_logits(1, 3, V_LONG, torch.float32, device)
    masked[:, :, :700] = float("-inf")
    S_masked = ops.sequence_logprobs(masked, labels, backend="fused")[0]
    assert_close(S_masked, ops.sequence_logprobs(masked.double(), labels, backend="reference")[0], 1e-5, "masked")
    masked[0, 0, 650] = float("nan")  # a NaN inside the −∞ run
    masked[0, 1, :512] = float("nan")  # a whole chunk of NaN
    masked[0, 2, 1500] = float("nan")  # after the −∞ run
    logits = masked.view(3, 1, V_LONG)  # one token per row, so each NaN has its own S
    S = ops.sequence_logprobs(logits, labels.view(3, 1), backend="fused")[0]
    assert torch.isnan(S).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_an_unchecked_out_of_range_label_gives_a_nan_row(device: str, backend: str) -> None:
    """validate=False: a label outside [0, V) other than ignore_index makes its row's S NaN and its gradient row
    NaN on every backend and device (no error: the CUDA kernels cannot raise), and reads nothing outside the
    row."""
    batch = make_batch(2, 2, V=V_ODD, device=device)
    labels = batch["labels"].clone()
    labels[3, 4] = -7
    labels[1, 3] = V_ODD
    weights = torch.randn(4, dtype=torch.float64, device=device)
    S, L, grad = logprobs_and_grad(batch["logits"], labels, weights, validate=False, backend=backend)
    clean = labels.clone()
    clean[3, 4] = clean[1, 3] = -100
    S_ref, L_ref, grad_ref = logprobs_and_grad(batch["logits"].double(), clean, weights, backend="reference")
    assert torch.isnan(S[[1, 3]]).all() and torch.equal(L, L_ref + torch.tensor([0, 1, 0, 1], device=device))
    assert_close(S[[0, 2]], S_ref[[0, 2]], 1e-5, "S of the other rows")
    assert torch.isnan(grad[3, 4]).all() and torch.isnan(grad[1, 3]).all()
    keep = torch.ones(4, 6, dtype=torch.bool, device=device)
    keep[3, 4] = keep[1, 3] = False
    assert_close(grad[keep], grad_ref[keep], 1e-5, "d logits of the other tokens")
    out = ops.dora_loss(batch["logits"], labels, **{k: v for k, v in batch.items() if k not in ("logits", "labels")},
                        validate=False, backend=backend)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_label_term_is_minus_g_expm1(device: str, dtype: torch.dtype) -> None:
    """d logits[y] = −g·expm1((z_y − m) − log s), to the last digits, also as p_y → 1 (1 − p_y ≈ 1e-5, where
    1 − exp loses half the digits)."""
    logits = torch.full((2, 1, 16), -14.0, dtype=dtype, device=device)
    logits[:, 0, 3] = 0.0
    logits[1, 0, :] = torch.linspace(-3, 3, 16, dtype=dtype)
    labels = torch.tensor([[3], [3]], device=device)
    g = torch.tensor([0.7, -1.3], dtype=dtype, device=device)
    _, _, lse = torch.ops.dora_engine.seq_logprobs_fwd(logits, labels, -100)
    grad = torch.ops.dora_engine.seq_logprobs_bwd(logits, labels, lse, g, -100)
    m, log_s = lse[:, 0].double().unbind(-1)
    want = -g.double() * torch.expm1((logits[:, 0, 3].double() - m) - log_s)
    rtol = 2e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(grad[:, 0, 3].double(), want, rtol=rtol, atol=0)
    assert 5e-6 < grad[0, 0, 3].item() / 0.7 < 2e-5


# --------------------------------------------------------------------------------------------------
# Strided logits: read and overwritten in place, gradients with the logits' alignment
# --------------------------------------------------------------------------------------------------


def strided_views(dtype: torch.dtype, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(view, its base) of logits (4, 5, V_ODD) laid out as trainers hand them over."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(4, 6, V_ODD, generator=g) * 2).to(dtype).to(device)
    flat = (torch.randn(4 * 5 * V_ODD + 3, generator=g) * 2).to(dtype).to(device)
    tokens_first = (torch.randn(5, 4, V_ODD, generator=g) * 2).to(dtype).to(device)
    every_other = (torch.randn(4, 10, V_ODD, generator=g) * 2).to(dtype).to(device)
    return {
        "shifted": (base[:, :-1], base),  # logits[:, :-1], the usual causal-LM shift
        "offset": (flat[3:].view(4, 5, V_ODD), flat),
        "tokens first": (tokens_first.transpose(0, 1), tokens_first),
        "every other token": (every_other[:, ::2], every_other),
    }


def strided_labels(device: str) -> torch.Tensor:
    labels = torch.randint(0, V_ODD, (4, 5), generator=torch.Generator().manual_seed(4)).to(device)
    labels[:, 0] = -100
    labels[2] = -100
    return labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["shifted", "offset", "tokens first", "every other token"])
@pytest.mark.parametrize("inplace", [False, True])
def test_strided_logits_values_and_gradients(device: str, dtype: torch.dtype, layout: str, inplace: bool) -> None:
    view, base = strided_views(dtype, device)[layout]
    labels = strided_labels(device)
    weights = torch.randn(4, dtype=torch.float64, device=device)
    S_ref, L_ref, grad_ref = logprobs_and_grad(view.double(), labels, weights, backend="reference")
    outside = torch.ones_like(base, dtype=torch.bool)
    if layout == "shifted":
        outside[:, :-1] = False
    elif layout == "every other token":
        outside[:, ::2] = False
    elif layout == "offset":
        outside[3:] = False
    else:
        outside[:] = False
    untouched = base[outside].clone()
    leaf = view.detach().requires_grad_(True)  # the view itself is the leaf: its gradient is the op's
    S, L = ops.sequence_logprobs(leaf, labels, inplace_backward=inplace, backend="fused")
    (grad,) = torch.autograd.grad((S.double() * weights).sum(), leaf)
    assert torch.equal(L.double(), L_ref)
    assert_close(S, S_ref, TOLERANCE[dtype], "S")
    assert_close(grad, grad_ref, TOLERANCE[dtype], "d logits")
    if inplace:
        assert grad.data_ptr() == view.data_ptr() and grad.stride() == view.stride()
        assert_close(view, grad_ref, TOLERANCE[dtype], "the view now holding its gradient")
    assert torch.equal(base[outside], untouched), "memory outside the view is never written"


def allocations(fn, device: str) -> list[int]:
    """Sizes in bytes of the buffers allocated while ``fn`` runs (per allocation, not nested)."""
    from torch.profiler import ProfilerActivity, profile

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return [torch.cuda.max_memory_allocated() - before]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::empty") and e.cpu_memory_usage > 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_a_shifted_view_is_not_copied(device: str, inplace: bool) -> None:
    """logits[:, :-1] with labels[:, 1:] (how trainers call a loss): no N·T·V buffer in forward, the gradient
    alone in backward, none with inplace_backward."""
    N, T, V = 4, 64, 4096
    base = torch.randn(N, T + 1, V, device=device)
    labels = torch.randint(0, V, (N, T + 1), device=device)
    view = base[:, :-1].requires_grad_(True)
    buffer = N * T * V * 4
    saved = {}

    def forward():
        saved["S"] = ops.sequence_logprobs(view, labels[:, 1:], inplace_backward=inplace, backend="fused")[0]

    def backward():
        saved["grad"] = torch.autograd.grad(saved["S"].sum(), view)[0]

    assert max(allocations(forward, device), default=0) < buffer / 8
    big = [size for size in allocations(backward, device) if size >= buffer / 8]
    if inplace:
        assert big == [] and saved["grad"].data_ptr() == base.data_ptr()
    else:
        assert len(big) == 1 and big[0] < 1.01 * buffer
    assert torch.isfinite(saved["grad"]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_gradient_buffer_has_the_logits_alignment(device: str, dtype: torch.dtype) -> None:
    """A fresh gradient starts at the logits' address modulo 16 bytes, so that the CUDA backward pairs 16-byte
    loads with 16-byte stores; the values are those of aligned logits."""
    logits = unaligned_logits(2, 3, V_ODD, dtype, device)
    labels = torch.randint(0, V_ODD, (2, 3), generator=torch.Generator().manual_seed(2)).to(device)
    _, _, lse = torch.ops.dora_engine.seq_logprobs_fwd(logits, labels, -100)
    gS = torch.tensor([0.5, -2.0], device=device)
    grad = torch.ops.dora_engine.seq_logprobs_bwd(logits, labels, lse, gS, -100)
    assert grad.is_contiguous() and grad.data_ptr() % 16 == logits.data_ptr() % 16 != 0
    aligned = torch.ops.dora_engine.seq_logprobs_bwd(logits.clone(), labels, lse, gS, -100)
    assert torch.equal(grad, aligned)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("N", "T", "V"), [(1, 2, 300_000), (2, 3, V_ODD), (64, 64, 4099)])
def test_cuda_row_passes_equal_the_cpu_ones(dtype: torch.dtype, N: int, T: int, V: int) -> None:
    """Few long rows (split over several blocks), short rows, many rows: an unaligned strided view with NaN,
    −∞ and +∞ in several places, an ignored and an unchecked out-of-range label; forward, backward into a new
    buffer and in place. CUDA and CPU agree, NaN for NaN."""
    g = torch.Generator().manual_seed(N * T)
    flat = (torch.randn(N * (T + 1) * V + 1, generator=g) * 3).to(dtype)
    view = flat[1:].view(N, T + 1, V)[:, :-1]
    view[0, 0, : V // 3] = float("-inf")
    view[-1, -1, V // 2] = float("nan")
    view[0, -1, V - 1] = float("inf")
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 0] = V // 3 + 1
    labels[-1, 0] = -100
    if N * T > 2:
        labels[-1, 1] = V
    gS = torch.randn(N, generator=g).to(accumulation_dtype(dtype))
    results = {}
    for device in ("cpu", "cuda"):
        z, y = flat.to(device, copy=True)[1:].view(N, T + 1, V)[:, :-1], labels.to(device)
        S, L, lse = torch.ops.dora_engine.seq_logprobs_fwd(z, y, -100)
        grad = torch.ops.dora_engine.seq_logprobs_bwd(z, y, lse, gS.to(device), -100)
        torch.ops.dora_engine.seq_logprobs_bwd_(z, y, lse, gS.to(device), -100)
        results[device] = [t.cpu() for t in (S, L, lse, grad, z)]
    rtol = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, 1e-2)
    for what, cpu, cuda in zip(("S", "L", "lse", "d logits", "d logits in place"), results["cpu"], results["cuda"],
                               strict=True):
        assert torch.equal(cpu.isnan(), cuda.isnan()), what
        torch.testing.assert_close(cuda.nan_to_num(0.0, 0.0, 0.0).double(), cpu.nan_to_num(0.0, 0.0, 0.0).double(),
                                   rtol=rtol, atol=rtol * max(cpu.nan_to_num(0.0, 0.0, 0.0).abs().max().item(), 1e-6))


# --------------------------------------------------------------------------------------------------
# Registered ops: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


def _op_samples(device: str) -> list[tuple[str, tuple]]:
    batch = make_batch(2, 3, V=37, seed=11, device=device)
    z, y = batch["logits"], batch["labels"]
    S, L, lse = torch.ops.dora_engine.seq_logprobs_fwd(z, y, -100)
    gS = torch.randn(S.shape, device=device)
    ell, h = torch.rand(4, device=device), torch.rand(4, device=device) + 0.5
    dpo = LOSSES["dpo"]
    params = encode_params("dpo", resolve_params("dpo"))
    return [
        ("seq_logprobs_fwd", (z, y, -100)),
        ("seq_logprobs_fwd", (z.bfloat16(), y, -100)),
        ("seq_logprobs_bwd", (z, y, lse, gS, -100)),
        ("seq_logprobs_bwd_", (z.clone(), y, lse, gS, -100)),
        ("prompt_loss", (S, L, batch["ref_logps"], batch["scores"], dpo.code, params)),
        ("robust_reduce", (ell, h, STRATEGIES["dora"].code, 0.5)),
        ("robust_reduce", (ell, None, STRATEGIES["erm"].code, 1.0)),
        ("batch_stage", (S, L, batch["ref_logps"], batch["scores"], batch["h_tilde"], dpo.code, params,
                         STRATEGIES["dora"].code, 0.5)),
        ("seq_logprobs_fwd", (z[:, :-1], y[:, 1:], -100)),
        ("seq_logprobs_bwd", (z[:, :-1], y[:, 1:], lse[:, 1:], gS, -100)),
        ("seq_logprobs_bwd_", (z.clone()[:, :-1], y[:, 1:], lse[:, 1:], gS, -100)),
        ("rescale_", (torch.randn(3, 4, device=device), torch.tensor(0.25, device=device))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(12))
def test_opcheck(device: str, sample: int) -> None:
    name, args = _op_samples(device)[sample]
    torch.library.opcheck(getattr(torch.ops.dora_engine, name).default, args)


def test_torch_compile_has_no_graph_break() -> None:
    batch = make_batch(2, 3, seed=13)
    rest = {k: v for k, v in batch.items() if k != "logits"}

    def objective(logits: torch.Tensor) -> torch.Tensor:
        return ops.dora_loss(logits, **rest, loss="dpo", strategy="dora", lam=0.5, validate=False, backend="fused").loss

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    z1 = batch["logits"].clone().requires_grad_(True)
    z2 = batch["logits"].clone().requires_grad_(True)
    objective(z1).backward()
    compiled(z2).backward()
    torch.testing.assert_close(z2.grad, z1.grad)


# --------------------------------------------------------------------------------------------------
# Bad input (docs/design.md section 7), same messages on both backends
# --------------------------------------------------------------------------------------------------


def _bad_cases() -> list[tuple[str, dict, type, str]]:
    out_of_range = make_batch(2, 2)["labels"].clone()
    out_of_range[1, 3] = 67
    empty = make_batch(2, 2)["labels"].clone()
    empty[2] = -100
    return [
        ("2-D logits", {"logits": torch.zeros(4, 6)}, ValueError, r"logits must be a 3-D tensor"),
        ("int logits", {"logits": torch.zeros(4, 6, 67, dtype=torch.int32)}, TypeError, "logits must be float32"),
        ("label shape", {"labels": torch.zeros(4, 5, dtype=torch.int64)}, ValueError, r"labels must have shape"),
        ("label dtype", {"labels": torch.zeros(4, 6, dtype=torch.int32)}, TypeError, "labels must be int64"),
        ("label range", {"labels": out_of_range}, ValueError, r"labels\[1, 3\] = 67 is outside \[0, 67\)"),
        ("N % K", {"num_responses": 3}, ValueError, "N = 4 is not divisible by num_responses K = 3"),
        ("empty response", {"labels": empty}, ValueError, "response row 2 .prompt 1, response 0. has no valid"),
        ("h <= 0", {"h_tilde": torch.tensor([1.0, 0.0])}, ValueError, r"h_tilde\[1\] = 0.0"),
        ("h nan", {"h_tilde": torch.tensor([float("nan"), 1.0])}, ValueError, "h_tilde must be finite"),
        ("lam", {"lam": 0.0}, ValueError, "lam must be a finite number > 0"),
        ("loss", {"loss": "kto"}, ValueError, "unknown loss 'kto'"),
        ("strategy", {"strategy": "cvar"}, ValueError, "unknown strategy 'cvar'"),
        ("no reference", {"ref_logps": None}, ValueError, "loss 'dpo' needs a reference model"),
        ("scores shape", {"scores": torch.zeros(2, 3)}, ValueError, r"scores must have shape \(2, 2\)"),
    ]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("case", range(14))
def test_bad_input_is_named(backend: str, case: int) -> None:
    _, change, error, message = _bad_cases()[case]
    call = {**make_batch(2, 2), "loss": "dpo", **change}
    with pytest.raises(error, match=message):
        ops.dora_loss(**call, backend=backend)


def test_stage_kernel_rejects_bad_codes() -> None:
    S = torch.zeros(4)
    with pytest.raises(RuntimeError, match="unknown loss code 42"):
        torch.ops.dora_engine.prompt_loss(S, S, S, torch.zeros(2, 2), 42, [0.1])
    with pytest.raises(RuntimeError, match="loss code 0 needs reference log-probs"):
        torch.ops.dora_engine.prompt_loss(S, S, None, torch.zeros(2, 2), 0, [0.1])
    with pytest.raises(RuntimeError, match="num_responses K = 65 exceeds"):
        torch.ops.dora_engine.prompt_loss(torch.zeros(65), torch.zeros(65), None, torch.zeros(1, 65), 5, [2.0, 0.8])


# --------------------------------------------------------------------------------------------------
# Data parallel: two gloo ranks equal one process on the concatenated batch
# --------------------------------------------------------------------------------------------------

SPLIT = (2, 1)  # prompts per rank: uneven on purpose
DIST_KWARGS = dict(loss="dpo_pl", strategy="dora", lam=0.4)


def _rank_main(rank: int):
    batch = make_batch(sum(SPLIT), 3, seed=21)
    first = sum(SPLIT[:rank])
    prompts = slice(first, first + SPLIT[rank])
    rows = slice(3 * prompts.start, 3 * prompts.stop)
    local = {k: v[prompts] if k in ("scores", "h_tilde") else v for k, v in batch.items()}
    local.update(logits=batch["logits"][rows], labels=batch["labels"][rows], ref_logps=batch["ref_logps"][rows])
    out, grad = loss_and_grad("fused", local, **DIST_KWARGS, process_group=dist.group.WORLD)
    return out.loss.item(), grad, out.weights


@pytest.mark.multiproc
def test_two_gloo_ranks_equal_one_process() -> None:
    results = run_gloo(_rank_main, len(SPLIT))
    single, grad = loss_and_grad("fused", make_batch(sum(SPLIT), 3, seed=21), **DIST_KWARGS)
    world = len(SPLIT)
    losses = [loss for loss, _, _ in results]
    assert losses[0] == losses[1] == pytest.approx(single.loss.item(), rel=1e-6)
    # DeepSpeed averages gradients over ranks: each rank holds world × the global gradient of its rows.
    local_grads = torch.cat([g for _, g, _ in results]) / world
    assert_close(local_grads, grad, 1e-5, "d logits")
    assert_close(torch.cat([w for _, _, w in results]), single.weights, 1e-6, "weights")
