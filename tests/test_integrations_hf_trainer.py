"""transformers.Trainer and plain loops with the DoRA loss (dora_engine.integrations.hf_trainer), and the
README's plain-PyTorch example, run as written on a tiny random Llama."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from training_toy import build_model, build_tokenizer, make_records

from dora_engine.data.schema import Record
from dora_engine.integrations.hf_trainer import (
    ListwiseCollator,
    ListwiseTrainer,
    RobustObjective,
    listwise_loss,
    reference_logps,
)
from dora_engine.ops import dora_loss, shift_labels
from dora_engine.ops.lm_head import DoRAPolicy
from dora_engine.rows import Row, RowTokenizer
from dora_engine.training.data import Example, TrainingData, collate, tokenise

README = Path(__file__).resolve().parents[1] / "README.md"
K = 3


pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """The training toy's tokenizer and tiny Llama (saved, as a user's model is), its records in the dataset
    schema, and float64 policy/reference models."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf")
    tok = build_tokenizer(root / "model")
    build_model(root / "model", len(tok))
    reference = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float64)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(1)) * 0.05)
    return {"root": root, "tok": tok, "records": make_records(8, K, seed=1), "reference": reference,
            "policy": policy}


def test_collator_rows_labels_and_extras(toy) -> None:
    tok, records = toy["tok"], toy["records"][:2]
    batch = ListwiseCollator(tok)(records)
    assert batch["input_ids"].shape[0] == 2 * K
    scores = [r["score"] for rec in records for r in rec["responses"]]
    assert batch["scores"].flatten().tolist() == pytest.approx(scores)
    assert batch["h_tilde"].tolist() == pytest.approx([rec["h_tilde"] for rec in records])
    assert "ref_logps" not in batch
    for n in range(2 * K):
        rec, response = records[n // K], records[n // K]["responses"][n % K]
        prompt = tok(rec["prompt"])["input_ids"]
        want = tok(response["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        length = int(batch["attention_mask"][n].sum())
        assert batch["input_ids"][n, :length].tolist() == prompt + want  # row n = b·K + k
        assert batch["labels"][n, len(prompt) : length].tolist() == want
        assert (batch["labels"][n, : len(prompt)] == -100).all() and (batch["labels"][n, length:] == -100).all()
        assert (batch["input_ids"][n, length:] == tok.pad_token_id).all()
    # pre-tokenised examples with cached reference log-probs, truncation
    tokenised = [{"prompt_ids": [5, 6, 7], "response_ids": [[8, 3], [9, 10, 3]], "scores": [0.0, 1.0],
                  "ref_logps": [-1.0, -2.0]},
                 {"prompt_ids": [11], "response_ids": [[12, 13, 14, 3], [15, 3]], "scores": [2.0, 1.0],
                  "ref_logps": [-3.0, -4.0]}]
    batch = ListwiseCollator(pad_token_id=0, max_prompt_tokens=2, max_response_tokens=3)(tokenised)
    assert batch["input_ids"].tolist() == [[6, 7, 8, 3, 0], [6, 7, 9, 10, 3], [11, 12, 13, 14, 0], [11, 15, 3, 0, 0]]
    assert batch["labels"][2].tolist() == [-100, 12, 13, 14, -100]
    assert batch["ref_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0] and "h_tilde" not in batch


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([{"prompt_ids": [1], "response_ids": [[2], [3]], "scores": [1, 0]},
          {"prompt_ids": [1], "response_ids": [[2], [3], [4]], "scores": [1, 0, 0]}],
         "example 1: has 3 responses but the records of this batch have K = 2"),
        ([{"prompt_ids": [1], "response_ids": [[2], [3]], "scores": [1]}], "'scores' must give one number"),
        ([{"prompt_ids": [1], "response_ids": [[2], [3]], "scores": [1, 0], "h_tilde": 1.0},
          {"prompt_ids": [1], "response_ids": [[2], [3]], "scores": [1, 0]}], "example 1 has no 'h_tilde'"),
        ([{"prompt_ids": [1], "response_ids": [[2], []], "scores": [1, 0]}],
         "example 0: field 'response_ids[1]' has no token to score"),
        ([{"prompt": "w1", "responses": [{"text": "w2"}, {"text": "w3"}]}], "give ListwiseCollator a tokenizer"),
    ],
)
def test_collator_errors_name_the_example(examples, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ListwiseCollator()(examples)


def test_missing_score_is_named(toy) -> None:
    record = copy.deepcopy(toy["records"][0])
    del record["responses"][1]["score"]
    with pytest.raises(ValueError, match=re.escape("example 0: field 'responses[1].score' is missing")):
        ListwiseCollator(toy["tok"])([record])


def test_listwise_loss_equals_the_engines(toy) -> None:
    """The same rows through the engine's collator and DoRAPolicy give the same loss and gradients."""
    batch = ListwiseCollator(toy["tok"])(toy["records"][:4])
    ref = reference_logps(toy["reference"], batch)
    objective = RobustObjective("dpo_pl", {"beta": 0.5}, "dora", 0.7)
    policy = toy["policy"]
    policy.zero_grad()
    out = listwise_loss(policy, batch, objective, ref_logps=ref)
    out.loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]

    examples = []
    for b, rec in enumerate(toy["records"][:4]):
        rows = []
        for k in range(K):
            n = b * K + k
            length = int(batch["attention_mask"][n].sum())
            prompt_len = int((batch["labels"][n, :length] == -100).sum())
            rows.append(Row(batch["input_ids"][n, :length].tolist(), prompt_len))
        examples.append(Example(b, rows, [r["score"] for r in rec["responses"]], rec["h_tilde"]))
    engine_batch = collate(TrainingData(examples, K, "", ""), list(range(4)), pad_id=toy["tok"].pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(engine_batch[key], batch[key]), key
    policy.zero_grad()
    engine = DoRAPolicy(policy, objective, loss_path="logits")(
        engine_batch["input_ids"], engine_batch["attention_mask"], engine_batch["labels"],
        scores=engine_batch["scores"], h_tilde=engine_batch["h_tilde"], ref_logps=ref,
    )
    engine.loss.backward()
    assert out.loss.item() == engine.loss.item()
    for got, want in zip(grads, [p.grad for p in policy.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def _trainer(toy, tmp_path, records, **kwargs) -> ListwiseTrainer:
    from transformers import TrainingArguments

    options = {"per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "report_to": "none",
               "save_strategy": "no", "use_cpu": True, "learning_rate": 1e-2, "seed": 0,
               **kwargs.pop("args", {})}
    return ListwiseTrainer(model=copy.deepcopy(toy["policy"]), args=TrainingArguments(str(tmp_path), **options),
                           train_dataset=records, processing_class=toy["tok"], **kwargs)


def test_trainer_trains_logs_and_uses_cached_reference_logps(toy, tmp_path) -> None:
    objective = RobustObjective("dpo", {"beta": 0.5}, "dora", 1.0)
    live = _trainer(toy, tmp_path / "live", toy["records"], objective=objective,
                    ref_model=copy.deepcopy(toy["reference"]), eval_dataset=toy["records"][:4])
    live.train()
    logs = [r for r in live.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2]
    for record in logs:
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "h_tilde/mean"):
            assert math.isfinite(record[key]), key
        assert 1.0 <= record["robust/ess"] <= 4
    metrics = live.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 1.0 <= metrics["eval_robust/ess"] <= 4

    # the same run from reference log-probs cached in the records
    collator = ListwiseCollator(toy["tok"])
    cached = []
    for rec in toy["records"]:
        ref = reference_logps(toy["reference"], collator([rec]))
        cached.append({**rec, "ref_logps": ref.tolist()})
    offline = _trainer(toy, tmp_path / "cached", cached, objective=objective)
    offline.train()
    assert [r["loss"] for r in offline.state.log_history if "loss" in r] == [r["loss"] for r in logs]


def test_gradient_accumulation_averages_micro_steps(toy, tmp_path) -> None:
    """erm is a mean over prompts: 2 micro-steps of 2 prompts make the same SGD step as 1 of 4."""
    objective = RobustObjective("simpo", {}, "erm", 1.0)
    params = []
    for micro, accum in ((4, 1), (2, 2)):
        trainer = _trainer(toy, tmp_path / f"ga{accum}", toy["records"][:4], objective=objective,
                           args={"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
                                 "max_steps": 1, "optim": "sgd", "lr_scheduler_type": "constant",
                                 "max_grad_norm": 0.0})
        trainer.train()
        params.append([p.detach().clone() for p in trainer.model.parameters()])
    moved = max(float((a - b).abs().max()) for a, b in zip(params[0], toy["policy"].parameters(), strict=True))
    assert moved > 1e-4
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_trainer_takes_the_c_of_h_scale_dataset_from_its_training_data(toy, tmp_path) -> None:
    records = toy["records"]
    c = sum(r["h_tilde"] for r in records) / len(records)
    trainer = _trainer(toy, tmp_path / "c", records, objective=RobustObjective("simpo", strategy="dora",
                                                                               h_scale="dataset"))
    assert (trainer.objective.h_scale, trainer.objective.h_mean) == ("dataset", pytest.approx(c))
    given = _trainer(toy, tmp_path / "c", records, objective=RobustObjective("simpo", h_scale="dataset", h_mean=2.0))
    assert given.objective.h_mean == 2.0
    batch = ListwiseCollator(toy["tok"])(records[:4])
    model = toy["policy"]
    # the loss the trainer computes is that of the op with its c
    with torch.no_grad():
        got = listwise_loss(model, batch, trainer.objective).loss
        want = listwise_loss(model, batch, RobustObjective("simpo", h_scale="dataset", h_mean=c)).loss
        plain = listwise_loss(model, batch, RobustObjective("simpo")).loss
    assert got == want and abs(got - plain) > 1e-6
    no_h = [{k: v for k, v in r.items() if k != "h_tilde"} for r in records]
    with pytest.raises(ValueError, match="has no 'h_tilde' value"):
        _trainer(toy, tmp_path / "c", no_h, objective=RobustObjective("simpo", h_scale="dataset"))
    erm = _trainer(toy, tmp_path / "c", no_h, objective=RobustObjective("simpo", strategy="erm", h_scale="dataset"))
    assert erm.objective.h_scale == "none"  # erm ignores h̃: nothing to compute


def readme_loop_example() -> str:
    """The plain-PyTorch example of README.md: the python block after its "From your own loop" heading."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### From your own loop") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_loop_example_runs(toy, capsys) -> None:
    code = readme_loop_example()
    assert 20 <= len(code.splitlines()) <= 40
    lines = re.findall(r'^name = "[^"]*".*$', code, flags=re.M)
    assert len(lines) == 1, "the example names its model in one `name = ...` line"
    namespace: dict = {}
    exec(compile(code.replace(lines[0], f"name = {str(toy['root'] / 'model')!r}"), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["step 0", "step 1", "step 2"]
    out = namespace["out"]
    assert math.isfinite(out.loss.item()) and out.weights.sum().item() == pytest.approx(1.0)
    assert namespace["batch"]["input_ids"].shape[0] == 6


def test_text_records_make_the_engines_rows(toy) -> None:
    """Records of the dataset schema tokenised by the engine (``tokenise`` + ``collate``) and by the
    ListwiseCollator give the same batch bit for bit: one RowTokenizer and one padding for both."""
    records = toy["records"][:4]
    tokenizer = RowTokenizer(toy["tok"], max_prompt_tokens=2, max_response_tokens=3)
    data = tokenise([Record.from_dict(r) for r in records], tokenizer, stage="align", target_source="*",
                    num_responses=None, needs_h_tilde=False, data_hash="")
    engine = collate(data, list(range(4)), pad_id=toy["tok"].pad_token_id)
    listwise = ListwiseCollator(toy["tok"], max_prompt_tokens=2, max_response_tokens=3)(records)
    assert engine.keys() == listwise.keys()
    for key, value in engine.items():
        assert value.dtype == listwise[key].dtype and torch.equal(value, listwise[key]), key


ROUTER_COEF = 0.5


def _tiny_mixtral(vocab_size: int) -> torch.nn.Module:
    """A float64 mixture of 4 experts (top 2) that trains with its router loss (output_router_logits)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                           router_aux_loss_coef=ROUTER_COEF, experts_implementation="eager")
    return MixtralForCausalLM(config).double()


def test_a_mixture_of_experts_trains_with_its_router_loss_as_the_engine(toy, tmp_path) -> None:
    """The trainer's loss is the objective + coef · the model's own aux_loss, logged as ``aux_loss``, with
    the gradients of the engine's DoRAPolicy; ``listwise_loss`` adds the same term."""
    from transformers import TrainingArguments

    objective = RobustObjective("simpo", {}, "dora", 1.0)
    batch = ListwiseCollator(toy["tok"])(toy["records"][:4])
    model = _tiny_mixtral(len(toy["tok"]))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True)
    trainer = ListwiseTrainer(model=model, args=args, train_dataset=toy["records"][:4],
                              processing_class=toy["tok"], objective=objective)
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        alone = dora_loss(own.logits, shift_labels(batch["labels"]), num_responses=K, scores=batch["scores"],
                          h_tilde=batch["h_tilde"], objective=objective).loss
    assert own.aux_loss.item() > 0
    torch.testing.assert_close(loss.detach(), alone + ROUTER_COEF * own.aux_loss, rtol=0, atol=1e-12)
    assert trainer._stats["train"]["aux_loss"] == [pytest.approx(own.aux_loss.item(), abs=1e-12)]
    torch.testing.assert_close(listwise_loss(model, batch, objective).loss.detach(), loss.detach(), rtol=0, atol=0)

    model.zero_grad()
    DoRAPolicy(model, objective, loss_path="logits")(
        batch["input_ids"], batch["attention_mask"], batch["labels"], scores=batch["scores"],
        h_tilde=batch["h_tilde"],
    ).loss.backward()
    engine = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == engine.keys() and any("gate" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, engine[name], rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")

    trainer._stats["train"] = {}
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 1 and math.isfinite(logged[0]["aux_loss"]) and logged[0]["aux_loss"] > 0
