"""DoRALossHead / DoRAPolicy (dora_engine/ops/lm_head.py) on a tiny Llama in one process: both loss paths."""

from __future__ import annotations

import copy

import pytest
import torch

from dora_engine.losses import RobustObjective
from dora_engine.ops import NLLOutput, dora_loss, sequence_logprobs
from dora_engine.ops.lm_head import DoRALossHead, DoRAPolicy, install_loss_head
from dora_engine.training.model import LossPath, PolicyLoss

transformers = pytest.importorskip("transformers")
OBJECTIVE = RobustObjective(loss="dpo_pl", strategy="dora", lam=0.5)

B, K, T, VOCAB = 2, 3, 9, 48


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config)


def batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (B * K, T), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100
    loss_kwargs = {
        "scores": torch.randn(B, K, generator=g), "h_tilde": torch.rand(B, generator=g) + 0.5,
        "ref_logps": torch.randn(B * K, generator=g) - 20,
    }
    return input_ids, torch.ones_like(input_ids), labels, loss_kwargs


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mode", ["single_pass", "recompute"])
def test_policy_equals_the_logits_path(tied, mode):
    model = tiny_llama(tied)
    oracle = copy.deepcopy(model)
    input_ids, mask, labels, kw = batch()
    policy = DoRAPolicy(model, OBJECTIVE, mode=mode, chunk_bytes=1, backend="fused")
    assert isinstance(model.lm_head, DoRALossHead)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    out = policy(input_ids, mask, labels, **kw)
    out.loss.backward()

    logits = oracle(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    want = dora_loss(logits, labels[:, 1:].contiguous(), num_responses=K, loss="dpo_pl", strategy="dora", lam=0.5,
                     backend="reference", **kw)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(model.lm_head.weight.grad, oracle.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        model.model.layers[0].mlp.up_proj.weight.grad, oracle.model.layers[0].mlp.up_proj.weight.grad,
        rtol=1e-4, atol=1e-6,
    )
    with torch.no_grad():
        S, L = policy(input_ids, mask, labels)
    S_ref, L_ref = sequence_logprobs(logits.detach(), labels[:, 1:].contiguous(), backend="reference")
    torch.testing.assert_close(S, S_ref)
    torch.testing.assert_close(L, L_ref)


#: The trainer's loss paths (train.loss_path, train.fused_linear_mode) and the path each takes on a Llama.
SFT_PATHS = [("logits", "single_pass"), ("fused_linear", "single_pass"), ("fused_linear", "recompute"),
             ("auto", "single_pass")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_bias", [False, True])
def test_sft_step_on_every_loss_path_equals_the_nll_of_the_models_logits(dtype, head_bias):
    """The trainer's SFT step (``PolicyLoss``, stage sft): the token-mean NLL of the model's own logits through
    the reference op, its value and every parameter's gradient, on each loss path; the fused-linear
    ``single_pass`` forms its gradients in forward. Prompt and padding labels, a row with no scored token."""
    model = tiny_llama(tied=False)
    if head_bias:
        model.lm_head = torch.nn.Linear(16, VOCAB, bias=True)
    model = model.to(dtype)
    input_ids, mask, labels, _ = batch()
    mask[1, -2:] = 0
    labels[1, -2:] = -100
    labels[2] = -100
    oracle = copy.deepcopy(model)
    logits = oracle(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    S, L = sequence_logprobs(logits, labels[:, 1:].contiguous(), backend="reference")
    want = -S.sum() / L.sum()
    want.backward()
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]
    for loss_path, mode in SFT_PATHS:
        twin = copy.deepcopy(model)
        policy = PolicyLoss(twin, OBJECTIVE, stage="sft", path=LossPath(loss_path, mode, 5 * VOCAB * 4, "fused"))
        assert policy.loss_path == ("logits" if loss_path == "logits" else "fused_linear")
        step = policy(input_ids, mask, labels)
        step.loss.backward()
        torch.testing.assert_close(step.loss, want.float(), **tol)
        torch.testing.assert_close(step.value, want.detach().float(), **tol)
        torch.testing.assert_close(step.seq_logps, S.detach(), **tol)
        assert torch.equal(step.seq_lens, L) and step.seq_lens[2] == 0
        for (name, p), q in zip(twin.named_parameters(), oracle.parameters(), strict=True):
            scale = q.grad.abs().max().item()
            torch.testing.assert_close(p.grad, q.grad, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                       msg=lambda m, name=name, where=(loss_path, mode): f"{where} {name}: {m}")


def test_policy_gives_the_summed_nll_on_request():
    model = tiny_llama(tied=True)
    input_ids, mask, labels, kw = batch()
    policy = DoRAPolicy(model, OBJECTIVE, backend="fused")
    out = policy(input_ids, mask, labels, nll=True)
    assert isinstance(out, NLLOutput)
    S, L = policy(input_ids, mask, labels)
    torch.testing.assert_close(out.loss, -S.sum())
    assert torch.equal(out.seq_lens, L)
    with pytest.raises(ValueError, match="nll and scores given together"):
        policy(input_ids, mask, labels, nll=True, **kw)
    with pytest.raises(ValueError, match="nll given without labels"):
        model.lm_head(torch.randn(1, 2, 16), nll=True)


def test_head_is_a_drop_in_output_layer():
    model = tiny_llama(tied=False)
    linear = model.lm_head
    head = install_loss_head(model)
    assert install_loss_head(model) is head and head.weight is linear.weight
    hidden = torch.randn(2, 4, 16)
    torch.testing.assert_close(head(hidden), linear(hidden))
    assert model(input_ids=torch.randint(0, VOCAB, (1, 5))).logits.shape == (1, 5, VOCAB)  # generation still works
    with pytest.raises(ValueError, match="without labels"):
        head(hidden, scores=torch.zeros(1, 2))


def test_policy_over_a_peft_model_trains_only_the_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(tied=False), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    input_ids, mask, labels, kw = batch()
    policy = DoRAPolicy(model, OBJECTIVE, backend="fused")
    out = policy(input_ids, mask, labels, **kw)
    out.loss.backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in name for name in trained)

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
    want = dora_loss(logits, labels[:, 1:].contiguous(), num_responses=K, loss="dpo_pl", strategy="dora", lam=0.5,
                     backend="reference", **kw)
    torch.testing.assert_close(out.loss, want.loss)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_logits_path_equals_fused_linear_path(backend):
    """The two loss paths of one policy class: same loss, same parameter gradients, same (S, L)."""
    model = tiny_llama(tied=True)
    twin = copy.deepcopy(model)
    input_ids, mask, labels, kw = batch()
    via_logits = DoRAPolicy(model, OBJECTIVE, loss_path="logits", backend=backend)
    via_hidden = DoRAPolicy(twin, OBJECTIVE, loss_path="fused_linear", backend=backend)
    assert not isinstance(model.lm_head, DoRALossHead)
    a, b = via_logits(input_ids, mask, labels, **kw), via_hidden(input_ids, mask, labels, **kw)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.seq_logps, b.seq_logps)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():
        S_a, L_a = via_logits(input_ids, mask, labels)
        S_b, L_b = via_hidden(input_ids, mask, labels)
    torch.testing.assert_close(S_a, S_b)
    assert torch.equal(L_a, L_b)


def test_auto_loss_path_takes_fused_linear_only_for_untransformed_logits():
    from dora_engine.ops.lm_head import resolve_loss_path

    model = tiny_llama(tied=False)
    assert resolve_loss_path(model, "auto") == "fused_linear"
    assert DoRAPolicy(copy.deepcopy(model), OBJECTIVE).loss_path == "fused_linear"
    model.config.final_logit_softcapping = 30.0  # logits = 30·tanh(z/30): not the lm_head's output
    assert resolve_loss_path(model, "auto") == "logits"
    assert resolve_loss_path(model, "logits") == "logits"
    with pytest.raises(ValueError, match="fused_linear' cannot run here: .*final_logit_softcapping = 30.0"):
        DoRAPolicy(model, OBJECTIVE, loss_path="fused_linear")
    with pytest.raises(ValueError, match="unknown loss_path 'hidden'"):
        resolve_loss_path(model, "hidden")
