"""Every causal LM computed right on every loss path (docs/design.md section 5.7).

Tiny random Hugging Face models of the architectures users bring, in float64: ``DoRAPolicy``'s loss, log-probs
and every parameter's gradient equal the model's own logits path (its forward, a hand-written log-softmax and
the reference op, plus ``router_aux_loss_coef · aux_loss`` for a mixture of experts) on ``auto`` and both
forced paths. Models that transform their logits take ``logits`` on ``auto`` and refuse a forced
``fused_linear``: by a known config name at once, or (FalconH1, RecurrentGemma: names no list holds) on the
first forward, with the measured difference.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from dora_engine.losses import RobustObjective
from dora_engine.ops import dora_loss, lm_head
from dora_engine.ops.lm_head import DoRAPolicy, fused_linear_mismatch, fused_linear_unsupported
from dora_engine.training.metrics import StepAccumulator
from dora_engine.training.model import LossPath, PolicyLoss

tf = pytest.importorskip("transformers")

OBJECTIVE = RobustObjective(loss="dpo_pl", strategy="dora", lam=0.5)
B, K, T, VOCAB = 2, 2, 8, 96
ROUTER_COEF = 0.5
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}


def _configs() -> dict[str, tuple[type, object]]:
    """name: (causal LM class, config); every one tiny."""
    return {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL)),
        "qwen2_tied": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**SMALL, tie_word_embeddings=True)),
        "gemma2_softcap": (tf.Gemma2ForCausalLM, tf.Gemma2Config(
            **SMALL, head_dim=8, final_logit_softcapping=2.0, attn_implementation="eager")),
        "gpt2_conv1d": (tf.GPT2LMHeadModel, tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0)),
        "phi_bias": (tf.PhiForCausalLM, tf.PhiConfig(**SMALL)),
        "cohere_scale": (tf.CohereForCausalLM, tf.CohereConfig(**SMALL, logit_scale=0.5)),
        "mixtral_router": (tf.MixtralForCausalLM, tf.MixtralConfig(
            **SMALL, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
            router_aux_loss_coef=ROUTER_COEF, experts_implementation="eager")),
        "falcon_h1_unlisted": (tf.FalconH1ForCausalLM, tf.FalconH1Config(
            **{**SMALL, "num_hidden_layers": 1}, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
            mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8, lm_head_multiplier=0.25)),
        "recurrent_gemma_unlisted": (tf.RecurrentGemmaForCausalLM, tf.RecurrentGemmaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, lru_width=32, attention_window_size=16, block_types=["recurrent", "attention"],
            logits_soft_cap=1.0)),
    }


CONFIGS = _configs()
#: How a transforming model's forced fused_linear is refused: by its config name, or measured.
REFUSALS = {
    "gemma2_softcap": r"transforms its logits \(final_logit_softcapping = 2.0\)",
    "cohere_scale": r"transforms its logits \(logit_scale = 0.5\)",
    "falcon_h1_unlisted": r"its logits are not its lm_head's output .* measured relative difference [0-9.e+-]+, "
                          r"rounding in float64 allows",
    "recurrent_gemma_unlisted": r"its logits are not its lm_head's output .* measured relative difference",
}


def tiny_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    cls, config = CONFIGS[name]
    model = cls(copy.deepcopy(config)).double().train()  # no dropout: the configs set none
    with torch.no_grad():  # logits of a few units, so that soft-capping and scaling are far from the identity
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """B prompts of K rows; the last row of each prompt right-padded by two tokens."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (B * K, T), generator=g)
    mask = torch.ones_like(input_ids)
    mask[K - 1 :: K, -2:] = 0
    labels = torch.where(mask.bool(), input_ids, -100)
    labels[:, :3] = -100
    loss_kwargs = {"scores": torch.randn(B, K, generator=g, dtype=torch.float64),
                   "h_tilde": torch.rand(B, generator=g, dtype=torch.float64) + 0.5,
                   "ref_logps": torch.randn(B * K, generator=g, dtype=torch.float64) - 20}
    return input_ids, mask, labels, loss_kwargs


def own_logits_path(model: nn.Module, input_ids, mask, labels, kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, S) from the model's own forward: a hand-written log-softmax, the reference op, the router loss."""
    out = model(input_ids=input_ids, attention_mask=mask)
    logits = out.logits[:, :-1]
    target = labels[:, 1:]
    scored = target != -100
    token_logps = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    S = (token_logps * scored).sum(-1)
    loss = dora_loss(logits, target.contiguous(), num_responses=K, objective=OBJECTIVE, backend="reference", **kw).loss
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + ROUTER_COEF * out.aux_loss
    return loss, S


@pytest.mark.parametrize("loss_path", ["auto", "logits", "fused_linear"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_policy_equals_the_models_own_logits_path(name: str, loss_path: str) -> None:
    model = tiny_model(name)
    oracle = copy.deepcopy(model)
    input_ids, mask, labels, kw = batch()
    transforms = name in REFUSALS
    if loss_path == "fused_linear" and transforms:
        with pytest.raises(ValueError, match="loss_path 'fused_linear' cannot run here: .*" + REFUSALS[name]):
            DoRAPolicy(model, OBJECTIVE, loss_path=loss_path)(input_ids, mask, labels, **kw)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = DoRAPolicy(model, OBJECTIVE, loss_path=loss_path)
        out = policy(input_ids, mask, labels, **kw)
    assert all(module.training for module in model.modules()), "the first forward's check left train mode"
    assert policy.loss_path == ("logits" if transforms or loss_path == "logits" else "fused_linear")
    said = [str(w.message) for w in caught if "loss_path 'auto' takes 'logits'" in str(w.message)]
    assert len(said) == (1 if loss_path == "auto" and name in ("falcon_h1_unlisted", "recurrent_gemma_unlisted")
                         else 0), said
    want_loss, want_S = own_logits_path(oracle, input_ids, mask, labels, kw)
    out.loss.backward()
    want_loss.backward()
    torch.testing.assert_close(out.loss, want_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.seq_logps, want_S, rtol=0, atol=1e-10)
    for (param_name, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), param_name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=lambda m, n=param_name: f"{n}: {m}")
    with torch.no_grad():  # the policy keeps its path: later calls (here without scores) do not check again
        S, _ = policy(input_ids, mask, labels)
    torch.testing.assert_close(S, want_S.detach(), rtol=0, atol=1e-10)


def test_the_router_loss_is_trained_and_logged_on_both_paths() -> None:
    """SFT on a tiny Mixtral: the step trains on NLL + coef · aux_loss (the model's own aux_loss) and the
    metrics report ``aux_loss``; a model without a router loss reports none."""
    input_ids, mask, labels, _ = batch()
    steps = {}
    for loss_path in ("logits", "fused_linear"):
        model = tiny_model("mixtral_router")
        policy = PolicyLoss(model, OBJECTIVE, stage="sft", path=LossPath(loss_path))
        steps[loss_path] = policy(input_ids, mask, labels)
        assert policy.loss_path == loss_path
    own_aux = tiny_model("mixtral_router")(input_ids=input_ids, attention_mask=mask).aux_loss
    for step in steps.values():
        torch.testing.assert_close(step.aux_loss, own_aux.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(step.loss - ROUTER_COEF * step.aux_loss, step.value, rtol=0, atol=1e-10)
    torch.testing.assert_close(steps["logits"].loss, steps["fused_linear"].loss, rtol=0, atol=1e-10)
    acc = StepAccumulator(torch.device("cpu"))
    acc.add(steps["logits"], mask.sum(), None)
    acc.add(steps["fused_linear"], mask.sum(), None)
    metrics, _ = acc.reduce(False)
    assert metrics["aux_loss"] == pytest.approx(own_aux.item(), abs=1e-12)
    plain = PolicyLoss(tiny_model("llama"), OBJECTIVE, stage="sft")(input_ids, mask, labels)
    assert plain.aux_loss is None
    acc = StepAccumulator(torch.device("cpu"))
    acc.add(plain, mask.sum(), None)
    assert "aux_loss" not in acc.reduce(False)[0]


class _Wrapper(nn.Module):
    """A multimodal wrapper's outline: a config whose text config holds the soft-cap, a linear lm_head."""

    def __init__(self, config: object) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(4, 8, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_a_multimodal_wrappers_text_config_is_read() -> None:
    reason = fused_linear_unsupported(_Wrapper(tf.Gemma3nConfig()))
    assert reason is not None and "final_logit_softcapping = 30.0" in reason


def test_the_largest_difference_over_the_group_decides(monkeypatch) -> None:
    """Under data parallelism (ZeRO-3) ranks see different tokens and must all take one path: the difference
    measured here is reduced with MAX over the process group, and the reduced value decides."""
    model = tiny_model("llama")
    input_ids, mask, labels, kw = batch()
    group, reduced = object(), []

    def all_reduce(tensor, op=None, group=None):  # another rank measured a logit transform
        reduced.append((op, group))
        tensor.copy_(torch.maximum(tensor, torch.full_like(tensor, 0.5)))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(lm_head, "data_parallel_group", lambda: group)  # the group the trainer's ranks share
    assert fused_linear_mismatch(model, input_ids, mask) is None  # alone, this rank sees a plain head
    policy = DoRAPolicy(model, OBJECTIVE)
    with pytest.warns(RuntimeWarning, match="takes 'logits': .*measured relative difference 0.5"):
        policy(input_ids, mask, labels, **kw)
    assert reduced == [(torch.distributed.ReduceOp.MAX, group)] and policy.loss_path == "logits"
    reduced.clear()
    policy(input_ids, mask, labels, **kw)
    assert not reduced, "the check runs once"
    with pytest.raises(ValueError, match="measured relative difference 0.5"):
        DoRAPolicy(tiny_model("llama"), OBJECTIVE, loss_path="fused_linear")(input_ids, mask, labels, **kw)


@pytest.mark.parametrize("name", ["llama", "falcon_h1_unlisted"])
def test_a_lora_wrapped_model_is_checked_through_its_wrapper(name: str) -> None:
    """PEFT LoRA: the check reaches the causal LM inside the wrapper; loss and adapter gradients equal the
    wrapped model's own logits path."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM", init_lora_weights=False)
    model = peft.get_peft_model(tiny_model(name), lora)
    oracle = copy.deepcopy(model)
    input_ids, mask, labels, kw = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = DoRAPolicy(model, OBJECTIVE)
        out = policy(input_ids, mask, labels, **kw)
    assert policy.loss_path == ("logits" if name in REFUSALS else "fused_linear")
    want_loss, _ = own_logits_path(oracle, input_ids, mask, labels, kw)
    out.loss.backward()
    want_loss.backward()
    torch.testing.assert_close(out.loss, want_loss, rtol=0, atol=1e-10)
    trained = [(n, p, q) for (n, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True)
               if p.requires_grad]
    assert trained and all("lora_" in n for n, _, _ in trained)
    for param_name, p, q in trained:
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=lambda m, n=param_name: f"{n}: {m}")
