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
    """The gradient lands in the logits buffer; non-contiguous logits get a new buffer instead."""
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
    assert torch.equal(strided.detach(), batch["logits"])


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
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", range(8))
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


def test_unchecked_out_of_range_label_still_fails_on_cpu() -> None:
    batch = make_batch(2, 2)
    batch["labels"][3, 4] = -7
    with pytest.raises(RuntimeError, match=r"labels\[3, 4\] = -7 is outside \[0, 67\)"):
        ops.sequence_logprobs(batch["logits"], batch["labels"], validate=False, backend="fused")


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
