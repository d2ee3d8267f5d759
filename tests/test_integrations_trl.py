"""TRL's DPOTrainer with the DoRA loss (dora_engine.integrations.trl) on a tiny random Llama, in float64.

Its loss on a fixed batch equals the engine's (``DoRAPolicy`` on the same rows, built by the engine's
collator), and with ``loss="dpo", strategy="erm"`` (and the other losses TRL shares) TRL's own loss, in
value and gradient; it trains for two steps and logs TRL's metrics and the strategy's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402  (after the skip: datasets comes with trl)
from training_toy import WORDS, build_tokenizer  # noqa: E402
from trl_step_memory import ENV  # noqa: E402

from dora_engine.errors import UserValueError  # noqa: E402
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
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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


#: TRL's metrics of the logits' tokens, which the fused-linear path (no logits) does not log.
TOKEN_STATS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")


@pytest.mark.parametrize("loss_path", ["auto", "logits"])
def test_trains_two_steps_with_trls_logging(toy, loss_path: str) -> None:
    trainer = make_trainer(toy, max_steps=2, logging_steps=1, learning_rate=1e-2, dora_loss="dpo",
                           dora_strategy="dora", dora_lam=0.5, beta=0.5, dora_loss_path=loss_path)
    assert trainer.dora_policy.loss_path == ("fused_linear" if loss_path == "auto" else "logits")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2]
    for record in logs:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected", "num_tokens", "h_tilde/mean"):
            assert math.isfinite(record[key]), key
        for key in TOKEN_STATS:
            assert math.isfinite(record[key]) if loss_path == "logits" else key not in record, key
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
    used = trainer.dora_objective  # the training default scale: h̃ over the training dataset's mean
    assert used.h_scale == ("dataset" if used.strategy.needs_h_tilde else "none")
    objective = RobustObjective(loss, dict(used.params), strategy, 0.7, used.h_scale, used.h_mean)
    engine, engine_grads = engine_loss_and_grads(trainer, trainer.model, objective)
    assert ours == pytest.approx(engine, rel=1e-12, abs=1e-12)
    assert max_diff(grads, engine_grads) < 1e-11


@pytest.mark.parametrize("lora", [False, True])
def test_the_fused_linear_path_gives_the_logits_paths_loss_and_gradients(toy, lora: bool) -> None:
    """``dora_loss_path``: the fused-linear path (``auto`` on a Llama, inside the model's forward, through a
    PEFT LoRA wrapper too) and the logits path give the same loss and gradients on a fixed batch."""
    results = {}
    for loss_path in ("logits", "auto"):
        model = copy.deepcopy(toy["model"])
        if lora:
            peft = pytest.importorskip("peft")
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        trainer = make_trainer(toy, model=model, dora_loss="dpo", dora_strategy="dora", dora_lam=0.5, beta=0.5,
                               dora_loss_path=loss_path)
        results[trainer.dora_policy.loss_path] = loss_and_grads(trainer, fixed_batch(trainer))
    (logits_loss, logits_grads), (fused_loss, fused_grads) = results["logits"], results["fused_linear"]
    assert fused_loss == pytest.approx(logits_loss, rel=1e-12)
    assert max_diff(fused_grads, logits_grads) < 1e-11
    assert fused_grads and all(("lora_" in name) == lora for name in fused_grads)


def test_auto_takes_the_logits_path_where_the_first_step_measures_a_logit_transform(toy) -> None:
    """The engine's rule: logits that are not the lm_head's output (here scaled by a forward hook, a transform
    no config name tells) send ``auto`` to the logits path with one warning and refuse ``fused_linear``."""

    def halve_logits(module, args, output):
        if hasattr(output, "logits"):
            output["logits"] = output.logits * 0.5
        return output

    want = None
    for loss_path in ("logits", "auto", "fused_linear"):
        model = copy.deepcopy(toy["model"])
        model.register_forward_hook(halve_logits)
        trainer = make_trainer(toy, model=model, dora_loss="dpo", dora_strategy="erm", dora_loss_path=loss_path)
        assert trainer.dora_policy.loss_path == ("logits" if loss_path == "logits" else "fused_linear")
        if loss_path == "fused_linear":
            with pytest.raises(UserValueError, match="fused_linear' cannot run here: .*measured relative difference"):
                loss_and_grads(trainer, fixed_batch(trainer))
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = loss_and_grads(trainer, fixed_batch(trainer))
        said = [w for w in caught if "loss_path 'auto' takes 'logits'" in str(w.message)]
        assert len(said) == (loss_path == "auto") and trainer.dora_policy.loss_path == "logits"
        if want is None:
            want = got
        assert got[0] == pytest.approx(want[0], rel=1e-12) and max_diff(got[1], want[1]) < 1e-11
    peft = pytest.importorskip("peft")
    prompt_tuned = peft.get_peft_model(copy.deepcopy(toy["model"]),
                                       peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(UserValueError, match="a prompt-learning PEFT model prepends virtual tokens"):
        make_trainer(toy, model=prompt_tuned, dora_loss_path="fused_linear")
    assert make_trainer(toy, model=prompt_tuned).dora_policy.loss_path == "logits"


# Slow: two training subprocesses; and in one full-suite run on a loaded machine its fused-linear step measured
# 549 MiB (the logits path's size) where it measures 53 MiB alone: the cause is not found yet.
@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="measures with Linux's clear_refs")
def test_a_training_step_holds_less_memory_than_trls_own() -> None:
    """One step on a tiny Llama with V = 32000 (tests/trl_step_memory.py, in subprocesses): the fused-linear
    path's peak is below TRL's own DPOTrainer's and well below the logits path's, and all three compute the
    same loss."""
    script = str(Path(__file__).resolve().parent / "trl_step_memory.py")
    env = {**os.environ, **ENV}
    runs = [subprocess.Popen([sys.executable, script, *variants], stdout=subprocess.PIPE, text=True, env=env)
            for variants in (["trl"], ["logits", "fused_linear"])]
    peaks, losses, logits_bytes = {}, {}, set()
    for run in runs:
        stdout, _ = run.communicate(timeout=300)
        assert run.returncode == 0
        for line in stdout.splitlines():
            if line.startswith('{"variant"'):
                result = json.loads(line)
                peaks[result["variant"]], losses[result["variant"]] = result["step_bytes"], result["loss"]
                logits_bytes.add(result["logits_bytes"])
    (logits,) = logits_bytes
    # Measured: TRL 981 MiB, logits 143 MiB, fused_linear 53 MiB; the logits are 119 MiB (docs/design.md section 9)
    assert peaks["fused_linear"] < peaks["trl"], peaks
    assert peaks["fused_linear"] < 0.6 * min(peaks["logits"], logits), (peaks, logits)
    # log 2 (the policy is its reference), up to the float32 rounding of S − S_ref (S ≈ −320) times β = 0.1
    assert max(losses.values()) - min(losses.values()) < 1e-5, losses


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
    with pytest.raises(ValueError, match="training dataset has no 'h_tilde' column"):
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
    unscaled = make_trainer(toy, dora_loss="dpo", dora_strategy="dora", dora_lam=0.7, dora_h_scale="none")
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
        DoRADPOConfig(**cpu, dora_h_scale="none", dora_h_mean=2.0)


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
