"""The pure-PyTorch reference backend of the op (docs/design.md section 5) and its input checks (section 7)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.distributed as dist
from multiproc import run_gloo

from dora_engine import ops

reference_loss = partial(ops.dora_loss, backend="reference")
reference_logprobs = partial(ops.sequence_logprobs, backend="reference")


def make_inputs(B: int = 3, K: int = 4, T: int = 7, V: int = 13, *, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    N = B * K
    logits = torch.randn(N, T, V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[:, :2] = -100  # prompt tokens
    labels[1, 5:] = -100  # padding
    return dict(
        logits=logits,
        labels=labels,
        num_responses=K,
        scores=torch.randn(B, K, generator=g, dtype=torch.float64),
        h_tilde=torch.rand(B, generator=g, dtype=torch.float64) + 0.5,
        ref_logps=-torch.rand(N, generator=g, dtype=torch.float64) * 30,
    )


def test_sequence_logprobs_by_hand() -> None:
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[5.0, 1.0, 1.0], [2.0, 2.0, 9.0]]],
                          dtype=torch.float64)
    labels = torch.tensor([[2, -100], [-100, -100]])
    S, L = reference_logprobs(logits, labels)
    assert S[0].item() == pytest.approx(3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    assert S[1].item() == 0.0 and L.tolist() == [1.0, 0.0]
    assert S.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype: torch.dtype) -> None:
    inputs = make_inputs(dtype=dtype)
    S, L = reference_logprobs(inputs["logits"], inputs["labels"])
    S64, _ = reference_logprobs(inputs["logits"].double(), inputs["labels"])
    assert S.dtype == torch.float32 and L.dtype == torch.float32
    assert torch.allclose(S.double(), S64, rtol=1e-5)


def test_dora_loss_composes_sequence_logprobs_loss_and_strategy() -> None:
    inputs = make_inputs()
    logits = inputs.pop("logits").requires_grad_(True)
    out = reference_loss(logits, loss="dpo", strategy="dora", lam=0.5, **inputs)
    S, L = reference_logprobs(logits, inputs["labels"])
    rho = (S - inputs["ref_logps"]).view(3, 4)
    order = torch.argsort(-inputs["scores"], dim=1, stable=True)
    margin = rho.gather(1, order[:, :1]) - rho.gather(1, order[:, -1:])
    ell = -torch.nn.functional.logsigmoid(0.1 * margin.squeeze(1))
    s = inputs["h_tilde"] * ell
    want = 0.5 * (torch.logsumexp(s / 0.5, 0) - math.log(3))
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(out.per_sample_loss, ell)
    assert torch.allclose(out.weights, torch.softmax(s / 0.5, 0))
    assert torch.equal(out.seq_lens, L) and torch.allclose(out.seq_logps, S)
    assert not out.per_sample_loss.requires_grad and not out.weights.requires_grad
    g1, = torch.autograd.grad(out.loss, logits)
    g2, = torch.autograd.grad(want, logits)
    assert torch.allclose(g1, g2)


def test_public_api_reference_backend_and_linear_form() -> None:
    inputs = make_inputs()
    logits = inputs.pop("logits")
    labels = inputs.pop("labels")
    hidden = torch.randn(12, 7, 5, dtype=torch.float64)
    weight = torch.randn(13, 5, dtype=torch.float64)
    bias = torch.randn(13, dtype=torch.float64)
    via_linear = ops.dora_loss_linear(hidden, weight, labels, bias=bias, backend="reference", **inputs)
    via_logits = ops.dora_loss(hidden @ weight.T + bias, labels, backend="reference", **inputs)
    assert via_linear.loss.item() == pytest.approx(via_logits.loss.item(), rel=1e-12)
    S, L = ops.sequence_logprobs_linear(hidden, weight, labels, bias=bias, backend="reference")
    assert torch.allclose(S, via_logits.seq_logps)
    assert logits.shape == (12, 7, 13)


def test_nan_logits_propagate() -> None:
    inputs = make_inputs()
    inputs["logits"][3, 4, 0] = float("nan")
    inputs["labels"][3, 4] = 1
    out = reference_loss(**inputs)
    assert math.isnan(out.loss.item())


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid: auto, fused, reference"):
        ops.dora_loss(**make_inputs(), backend="gpu")


BAD_INPUTS = [
    (dict(logits=torch.zeros(12, 7)), "logits must be a 3-D tensor (N, T, V)"),
    (dict(logits=torch.zeros(12, 7, 13, dtype=torch.int32)), "logits must be float32, bfloat16, float16 or float64"),
    (dict(labels=torch.zeros(12, 6, dtype=torch.int64)), "labels must have shape (12, 7) (N, T)"),
    (dict(labels=torch.zeros(12, 7, dtype=torch.int32)), "labels must be int64"),
    (dict(num_responses=5), "N = 12 is not divisible by num_responses K = 5"),
    (dict(num_responses=1), "num_responses (K) must be an integer >= 2"),
    (dict(scores=torch.zeros(4, 3)), "scores must have shape (3, 4)"),
    (dict(h_tilde=torch.tensor([1.0, 0.0, 1.0])), "h_tilde must be finite and > 0; h_tilde[1] = 0.0"),
    (dict(h_tilde=torch.tensor([1.0, 1.0, float("inf")])), "h_tilde[2] = inf"),
    (dict(h_tilde=None), "strategy 'dora' needs h_tilde"),
    (dict(lam=0.0), "lam must be a finite number > 0"),
    (dict(lam=-2.0), "lam must be a finite number > 0"),
    (dict(loss="kto"), "unknown loss 'kto'"),
    (dict(strategy="cvar"), "unknown strategy 'cvar'"),
    (dict(ref_logps=None), "loss 'dpo_pl' needs a reference model: pass ref_logps"),
    (dict(ref_logps=torch.zeros(11, dtype=torch.float64)), "ref_logps must have shape (12,)"),
    (dict(loss_params={"gamma": 1.0}), "unknown loss_params ['gamma'] for loss 'dpo_pl'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS)
def test_bad_input_is_named(change: dict, message: str) -> None:
    inputs = {**make_inputs(), **change}
    with pytest.raises((ValueError, TypeError)) as err:
        ops.dora_loss(**inputs, backend="reference")
    assert message in str(err.value)


def test_label_out_of_range_and_empty_response() -> None:
    inputs = make_inputs()
    inputs["labels"][5, 6] = 13
    with pytest.raises(ValueError, match=r"labels\[5, 6\] = 13 is outside \[0, 13\)"):
        ops.dora_loss(**inputs, backend="reference")
    # validate=False skips the range check (it needs a device sync)
    inputs["labels"][5, 6] = 2
    inputs["labels"][7] = -100
    with pytest.raises(ValueError, match=r"response row 7 \(prompt 1, response 3\) has no valid label token"):
        ops.dora_loss(**inputs, backend="reference")
    # the low-level op returns S = 0, L = 0 for such a row
    S, L = ops.sequence_logprobs(inputs["logits"], inputs["labels"], backend="reference")
    assert S[7].item() == 0.0 and L[7].item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# Data parallel: two gloo ranks equal one process on the concatenated batch
# ----------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, strategy: str):
    inputs = make_inputs(B=4, K=2)
    rows = slice(rank * 4, rank * 4 + 4)
    prompts = slice(rank * 2, rank * 2 + 2)
    logits = inputs["logits"][rows].clone().requires_grad_(True)
    out = reference_loss(
        logits, inputs["labels"][rows], num_responses=2, scores=inputs["scores"][prompts],
        h_tilde=inputs["h_tilde"][prompts], ref_logps=inputs["ref_logps"][rows], loss="dpo",
        strategy=strategy, lam=0.3, process_group=dist.group.WORLD,
    )
    out.loss.backward()
    return out.loss.item(), logits.grad, out.weights


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", ["dora", "drdpo"])
def test_two_gloo_ranks_equal_one_process(strategy: str) -> None:
    (loss0, grad0, w0), (loss1, grad1, w1) = run_gloo(_rank_main, 2, strategy)
    inputs = make_inputs(B=4, K=2)
    logits = inputs.pop("logits").requires_grad_(True)
    single = reference_loss(logits, loss="dpo", strategy=strategy, lam=0.3, **inputs)
    single.loss.backward()
    assert loss0 == pytest.approx(single.loss.item(), rel=1e-12) and loss1 == pytest.approx(loss0, rel=1e-12)
    # each rank's gradient is the world size times the global loss's gradient for its own samples, so that
    # DeepSpeed's averaging over ranks of the (shared) parameters' gradients gives the exact global gradient
    assert torch.allclose(grad0 / 2, logits.grad[:4]) and torch.allclose(grad1 / 2, logits.grad[4:])
    assert torch.allclose(torch.cat([w0, w1]), single.weights)
