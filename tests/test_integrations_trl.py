"""TRL's DPOTrainer with the DoRA loss (dora_engine.integrations.trl) on a tiny random Llama, in float64.

Its loss on a fixed batch equals the engine's (``DoRAPolicy`` on the same rows, built by the engine's
collator), and with ``loss="dpo", strategy="erm"`` (and the other losses TRL shares) TRL's own loss, in
value and gradient; it trains for two steps and logs TRL's metrics and the strategy's.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402  (after the skip: datasets comes with trl)
from training_toy import WORDS, build_tokenizer  # noqa: E402

from dora_engine.integrations.trl import DoRADPOConfig, DoRADPOTrainer  # noqa: E402
from dora_engine.losses import RobustObjective  # noqa: E402
from dora_engine.ops.lm_head import DoRAPolicy  # noqa: E402
from dora_engine.rows import Row  # noqa: E402
from dora_engine.training.data import Example, TrainingData, collate  # noqa: E402

B = 4  # prompts in the fixed batch


pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A word-level tokenizer, a float64 tiny Llama (policy) and its reference, and a prompt/chosen/rejected
    dataset with an h_tilde column (completions of different lengths)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    reference = LlamaForCausalLM(config).double()
    model = copy.deepcopy(reference)  # the policy: the reference moved a little, so that ρ = S − S_ref ≠ 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rng = random.Random(0)
    rows = []
    for _ in range(8):
        prompt = rng.sample(WORDS, 3)
        rows.append({
            "prompt": " ".join(prompt),
            "chosen": " " + " ".join(prompt + rng.sample(WORDS, rng.randint(0, 2))) + " </s>",
            "rejected": " " + " ".join(rng.sample(WORDS, rng.randint(1, 5))) + " </s>",
            "h_tilde": round(rng.uniform(0.5, 1.5), 3),
        })
    return {"tok": tok, "model": model, "reference": reference, "dataset": Dataset.from_list(rows),
            "root": tmp_path_factory.mktemp("out")}


def make_trainer(toy: dict, cls=DoRADPOTrainer, config=DoRADPOConfig, model=None, **kwargs):
    model = copy.deepcopy(toy["model"]) if model is None else model
    # bf16=False: TRL's configs default to bf16 autocast, which would round the float64 model's matmuls
    args = config(output_dir=str(toy["root"]), per_device_train_batch_size=B, report_to="none", save_strategy="no",
                  use_cpu=True, bf16=False, **kwargs)
    return cls(model, copy.deepcopy(toy["reference"]), args=args, train_dataset=toy["dataset"],
               processing_class=toy["tok"])


def loss_and_grads(trainer, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def fixed_batch(trainer) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(B)])


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def engine_loss_and_grads(trainer, model, objective: RobustObjective) -> tuple[float, dict[str, torch.Tensor]]:
    """The engine on the same prompts: rows by the engine's collator (row n = b·2 + k, chosen first, scores
    1 / 0 as `data convert --format trl` writes). The reference log-probs are the ones the trainer uses
    (TRL's, accumulated in float32), checked against the engine's reference pass."""
    examples = []
    for i in range(B):
        ex = trainer.train_dataset[i]
        rows = [Row(ex["prompt_ids"] + ex[k], len(ex["prompt_ids"])) for k in ("chosen_ids", "rejected_ids")]
        examples.append(Example(i, rows, [1.0, 0.0], ex["h_tilde"]))
    batch = collate(TrainingData(examples, 2, "", ""), list(range(B)), pad_id=0)
    with torch.no_grad():
        engine_ref, _ = DoRAPolicy(trainer.ref_model, loss_path="logits")(
            batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        ref_logps = trainer._reference_logps(fixed_batch(trainer)).reshape(-1).double()
    torch.testing.assert_close(ref_logps, engine_ref, rtol=1e-6, atol=1e-5)
    policy = DoRAPolicy(model, objective, loss_path="logits")
    model.zero_grad()
    out = policy(batch["input_ids"], batch["attention_mask"], batch["labels"], scores=batch["scores"],
                 h_tilde=batch["h_tilde"].double(), ref_logps=ref_logps)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_trains_two_steps_with_trls_logging(toy) -> None:
    trainer = make_trainer(toy, max_steps=2, logging_steps=1, learning_rate=1e-2, dora_loss="dpo",
                           dora_strategy="dora", dora_lam=0.5, beta=0.5)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2]
    for record in logs:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected", "entropy", "mean_token_accuracy", "logits/chosen", "num_tokens", "h_tilde/mean"):
            assert math.isfinite(record[key]), key
        assert 1.0 <= record["robust/ess"] <= B and 1 / B <= record["robust/weight_max"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("loss", "params", "strategy"),
    [("dpo", {}, "dora"), ("rdpo", {"alpha": 0.05}, "reweight"), ("ipo", {"length_normalize": True}, "dro"),
     ("robust_dpo", {"eps": 0.2}, "drdpo"), ("exo", {}, "erm"), ("simpo", {"gamma": 0.3}, "dora")],
)
def test_loss_on_a_fixed_batch_equals_the_engines(toy, loss: str, params: dict, strategy: str) -> None:
    trainer = make_trainer(toy, dora_loss=loss, dora_loss_params=params, dora_strategy=strategy, dora_lam=0.7)
    ours, grads = loss_and_grads(trainer, fixed_batch(trainer))
    objective = RobustObjective(loss, dict(trainer.dora_objective.params), strategy, 0.7)
    engine, engine_grads = engine_loss_and_grads(trainer, trainer.model, objective)
    assert ours == pytest.approx(engine, rel=1e-12, abs=1e-12)
    assert max_diff(grads, engine_grads) < 1e-11


# TRL's DPO loss types and their counterparts (docs/design.md section 9).
TRL_TWINS = [
    ({"loss_type": "sigmoid", "beta": 0.3}, {"dora_loss": "dpo", "beta": 0.3}),
    ({"loss_type": "robust", "beta": 0.3, "label_smoothing": 0.2},
     {"dora_loss": "robust_dpo", "beta": 0.3, "dora_loss_params": {"eps": 0.2}}),
    ({"loss_type": "exo_pair", "beta": 0.3, "label_smoothing": 1e-3},
     {"dora_loss": "exo", "beta": 0.3, "dora_loss_params": {"eps": 1e-3}}),
    ({"loss_type": "ipo", "beta": 0.3},
     {"dora_loss": "ipo", "beta": 0.3, "dora_loss_params": {"length_normalize": True}}),
]


@pytest.mark.parametrize(("theirs", "ours"), TRL_TWINS, ids=[t[0]["loss_type"] for t in TRL_TWINS])
def test_erm_equals_trls_own_loss(toy, theirs: dict, ours: dict) -> None:
    trl_trainer = make_trainer(toy, cls=trl.DPOTrainer, config=trl.DPOConfig, **theirs)
    batch = fixed_batch(trl_trainer)
    want, want_grads = loss_and_grads(trl_trainer, batch)
    trainer = make_trainer(toy, dora_strategy="erm", **ours)
    got, grads = loss_and_grads(trainer, fixed_batch(trainer))
    # TRL accumulates its log-probs in float32 (its fused LM head), the op in float64
    assert got == pytest.approx(want, rel=1e-6)
    assert max_diff(grads, want_grads) < 1e-6 * max(float(g.abs().max()) for g in want_grads.values())


def test_ipo_without_length_normalize_is_not_trls(toy) -> None:
    trl_trainer = make_trainer(toy, cls=trl.DPOTrainer, config=trl.DPOConfig, loss_type="ipo", beta=0.3)
    want = trl_trainer.compute_loss(trl_trainer.model, fixed_batch(trl_trainer)).item()
    trainer = make_trainer(toy, dora_loss="ipo", beta=0.3, dora_strategy="erm")
    assert abs(trainer.compute_loss(trainer.model, fixed_batch(trainer)).item() - want) > 1.0


def test_configuration_errors_name_the_field(toy) -> None:
    cpu = {"output_dir": str(toy["root"]), "use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match="`loss_type` = \\['ipo'\\] is not used by the DoRA loss"):
        DoRADPOConfig(**cpu, loss_type="ipo")
    with pytest.raises(ValueError, match="`label_smoothing` = 0.1 .*dora_loss_params"):
        DoRADPOConfig(**cpu, label_smoothing=0.1)
    with pytest.raises(ValueError, match="β is set twice"):
        DoRADPOConfig(**cpu, beta=0.2, dora_loss_params={"beta": 0.3})
    with pytest.raises(ValueError, match="loss 'rrhf' has no β"):
        DoRADPOConfig(**cpu, beta=0.2, dora_loss="rrhf")
    with pytest.raises(ValueError, match="unknown strategy 'cvar'"):
        DoRADPOConfig(**cpu, dora_strategy="cvar")
    with pytest.raises(TypeError, match="needs args of type DoRADPOConfig"):
        DoRADPOTrainer(toy["model"], args=trl.DPOConfig(**cpu), train_dataset=toy["dataset"])
    no_h = {**toy, "dataset": toy["dataset"].remove_columns("h_tilde")}
    with pytest.raises(ValueError, match="needs h̃ but the training dataset has no 'h_tilde' column"):
        make_trainer(no_h, dora_strategy="dora")
    make_trainer(no_h, dora_strategy="dro")  # h̃ is only needed by reweight and dora


def test_h_scale_dataset_takes_c_from_the_training_dataset(toy) -> None:
    c = sum(toy["dataset"]["h_tilde"]) / len(toy["dataset"])
    trainer = make_trainer(toy, dora_loss="dpo", dora_strategy="dora", dora_lam=0.7, dora_h_scale="dataset")
    assert (trainer.dora_objective.h_scale, trainer.dora_objective.h_mean) == ("dataset", pytest.approx(c))
    ours, grads = loss_and_grads(trainer, fixed_batch(trainer))
    objective = RobustObjective("dpo", dict(trainer.dora_objective.params), "dora", 0.7, "dataset", c)
    engine, engine_grads = engine_loss_and_grads(trainer, trainer.model, objective)
    assert ours == pytest.approx(engine, rel=1e-12, abs=1e-12)
    assert max_diff(grads, engine_grads) < 1e-11
    unscaled = make_trainer(toy, dora_loss="dpo", dora_strategy="dora", dora_lam=0.7)
    assert abs(loss_and_grads(unscaled, fixed_batch(unscaled))[0] - ours) > 1e-6
    assert make_trainer(toy, dora_h_scale="dataset", dora_h_mean=2.5).dora_objective.h_mean == 2.5
    assert make_trainer(toy, dora_h_scale="batch").dora_objective.h_scale == "batch"
    no_h = {**toy, "dataset": toy["dataset"].remove_columns("h_tilde")}
    with pytest.raises(ValueError, match="training dataset has no 'h_tilde' column"):
        make_trainer(no_h, dora_strategy="dora", dora_h_scale="dataset")
    assert make_trainer(no_h, dora_strategy="dro", dora_h_scale="dataset").dora_objective.h_scale == "none"
    cpu = {"output_dir": str(toy["root"]), "use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match="`dora_h_scale`: h_scale must be one of none, dataset, batch"):
        DoRADPOConfig(**cpu, dora_h_scale="prompt")
    with pytest.raises(ValueError, match="`dora_h_mean`: h_mean is only given with h_scale 'dataset'"):
        DoRADPOConfig(**cpu, dora_h_mean=2.0)


def test_config_parses_from_the_command_line(toy) -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DoRADPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(toy["root"]), "--use_cpu", "--bf16", "false", "--dora_loss", "ipo",
         "--dora_loss_params", '{"length_normalize": true}', "--beta", "0.3", "--dora_strategy", "erm"]
    )
    assert args.objective().params == {"beta": 0.3, "length_normalize": True}


def test_the_engine_the_listwise_collator_and_the_trl_adapter_make_the_same_rows(toy) -> None:
    """One row layout (dora_engine.rows) for all three on TRL's tokenised records: the engine's collate, the
    ListwiseCollator on the same ids, and the rows the TRL adapter feeds the op from TRL's own batch are
    equal bit for bit (input_ids, attention_mask, labels)."""
    from dora_engine.integrations.hf_trainer import ListwiseCollator

    trainer = make_trainer(toy)
    records = [trainer.train_dataset[i] for i in range(B)]
    assert len({len(r["chosen_ids"]) for r in records} | {len(r["rejected_ids"]) for r in records}) > 1
    pad = toy["tok"].pad_token_id
    examples = [Example(i, [Row(r["prompt_ids"] + r[k], len(r["prompt_ids"])) for k in ("chosen_ids", "rejected_ids")],
                        [1.0, 0.0], None) for i, r in enumerate(records)]
    engine = collate(TrainingData(examples, 2, "", ""), list(range(B)), pad_id=pad)
    listwise = ListwiseCollator(pad_token_id=pad)([
        {"prompt_ids": r["prompt_ids"], "response_ids": [r["chosen_ids"], r["rejected_ids"]], "scores": [1.0, 0.0]}
        for r in records
    ])
    model_inputs, labels, _ = trainer.op_rows(trainer.data_collator(records))
    adapter = {"input_ids": model_inputs["input_ids"], "attention_mask": model_inputs["attention_mask"],
               "labels": labels}
    for key in ("input_ids", "attention_mask", "labels"):
        assert engine[key].dtype == listwise[key].dtype == adapter[key].dtype == torch.int64, key
        assert torch.equal(engine[key], listwise[key]) and torch.equal(engine[key], adapter[key]), key
    assert torch.equal(engine["scores"], listwise["scores"])
