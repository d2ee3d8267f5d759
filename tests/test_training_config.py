"""Training config, data preparation, sampler, schedule and export helpers (no processes started)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from training_toy import build_tokenizer, make_records, make_toy, write_jsonl

from dora_engine.data.schema import RecordError
from dora_engine.losses import LOSSES
from dora_engine.rows import IGNORE_INDEX, RowTokenizer
from dora_engine.training.config import ConfigError, load_config
from dora_engine.training.data import Sampler, collate, load_records, record_rows, row_tokenizer, tokenise
from dora_engine.training.dsconfig import DEFAULT_DEEPSPEED, build_deepspeed_config
from dora_engine.training.optim import lr_lambda

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy(tmp_path_factory.mktemp("cfg"))


def _raw(config: Path) -> dict:
    return yaml.safe_load(config.read_text())


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------- config


def test_defaults_overrides_and_registry_defaults(toy):
    cfg = load_config(toy, ["train.lr=1e-5", "loss.name=simpo", "loss.params={}", "robust.lam=0.5"])
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.robust.lam == 0.5 and cfg.robust.strategy == "dora"
    assert cfg.loss_params == dict(LOSSES["simpo"].defaults)
    assert cfg.train.grad_accum_steps == 1 and cfg.checkpoint.keep == 2  # untouched defaults
    assert not cfg.needs_reference and cfg.needs_h_tilde
    assert load_config(toy, ["stage=sft"]).needs_reference is False


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"optimiser": {}}, "unknown config key 'optimiser'"),
        ({"train": {"lrate": 1}}, "unknown config key 'train.lrate'"),
        ({"train": {"micro_batch_prompts": "two"}}, "'train.micro_batch_prompts' must be an integer"),
        ({"train": {"precision": "fp8"}}, "'train.precision' must be one of"),
        ({"loss": {"name": "dpoo"}}, "'loss.name': unknown loss 'dpoo'"),
        ({"loss": {"name": "dpo", "params": {"gamma": 1.0}}}, "'loss.params': unknown loss_params ['gamma']"),
        ({"loss": {"name": "dpo", "params": {"beta": -1}}}, "'loss.params'"),
        ({"robust": {"strategy": "dora", "lam": 0}}, "'robust.lam': lam must be a finite number > 0"),
        ({"robust": {"strategy": "minimax"}}, "'robust.strategy': unknown strategy"),
        ({"robust": {"h_scale": "prompt"}}, "'robust.h_scale' must be one of none, dataset, batch, got 'prompt'"),
        ({"data": {"train": ["missing.jsonl"]}}, "'data.train[0]': file not found"),
        ({"data": {"format": "ultrafeedback"}}, "'data.format' must be one of schema, trl, hh, tldr, authors"),
        ({"data": {"format": "trl", "columns": {"prompt": "q"}}}, "'data.columns' applies to data.format schema"),
        ({"lora": {"enabled": True, "dropout": 1.5}}, "'lora.dropout'"),
        ({"model": {"path": "/nonexistent/model"}}, "'model.path': folder not found"),
        ({"model": {"reference": "./runs/missing-sft"}}, "'model.reference': folder not found"),
    ],
)
def test_bad_config_names_the_key(toy, tmp_path, edit, message):
    data = _raw(toy)
    for key, value in edit.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) and value else value
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert message in str(err.value)


def test_h_scale_dataset_takes_c_from_all_of_data_train(toy, capsys):
    from dora_engine.training.engine import Trainer
    from dora_engine.training.loading import RunData
    from dora_engine.training.process_group import Ranks
    from dora_engine.training.startup import run_objective

    cfg = load_config(toy, ["robust.h_scale=dataset"])
    records = load_records(cfg.data.train)
    tok, _ = _tokeniser(toy)
    train = tokenise(records, tok, stage="align", target_source="chosen", num_responses=None, needs_h_tilde=True,
                     data_hash="x")
    data = RunData(build_tokenizer(toy.parent / "tok"), train, None)
    c = sum(r.h_tilde for r in records) / len(records)
    objective = run_objective(cfg, data, Ranks(rank=0, world=2))
    assert (objective.h_scale, objective.h_mean) == ("dataset", pytest.approx(c))
    assert f"c = {c:.6g} ({len(records)} records)" in capsys.readouterr().out
    # Another rank of the run takes the same c from the whole of data.train, not from its shard, and says nothing.
    assert run_objective(cfg, data, Ranks(rank=1, world=2)).h_mean == objective.h_mean
    assert capsys.readouterr().out == ""
    trainer = Trainer(cfg, data=data, ranks=Ranks(), sampler=None, checkpoints=None, engine=None, lr_scheduler=None,
                      h_mean=objective.h_mean)
    assert trainer.settings["robust"] == {"strategy": "dora", "lam": 1.0, "h_scale": "dataset",
                                          "h_mean": objective.h_mean}
    assert "h_mean" not in cfg.to_dict()["robust"]
    assert load_config(toy, []).robust.h_scale == "dataset"  # the training default
    # A strategy without h̃ accepts the key and ignores it; the other scales need no c.
    for overrides in (["robust.h_scale=dataset", "robust.strategy=erm"], ["robust.h_scale=batch"],
                      ["robust.h_scale=none"]):
        other = run_objective(load_config(toy, overrides), data, Ranks())
        assert other.h_mean is None and other.h_scale == ("batch" if overrides == ["robust.h_scale=batch"] else "none")


def test_bad_override_names_the_key(toy):
    with pytest.raises(ConfigError, match="unknown config key 'train.lr_max' in override"):
        load_config(toy, ["train.lr_max=1"])
    with pytest.raises(ConfigError, match="must have the form key=value"):
        load_config(toy, ["train.lr"])


def test_deepspeed_json_keys_owned_by_the_yaml_are_refused(toy, tmp_path):
    cfg = load_config(toy, [f"deepspeed={json.dumps({'gradient_accumulation_steps': 4})}"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps.*train.grad_accum_steps"):
        build_deepspeed_config(cfg, world_size=2)
    cfg = load_config(toy, ["train.grad_accum_steps=3", "train.micro_batch_prompts=2", "train.max_grad_norm=0.5"])
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 2 * 4 * 3 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3


def test_one_rank_on_the_default_settings_takes_the_small_gradient_bucket(toy, monkeypatch):
    monkeypatch.chdir(ROOT)
    default = load_config(toy)
    assert build_deepspeed_config(default, world_size=1)["zero_optimization"]["reduce_bucket_size"] == 5e6
    assert build_deepspeed_config(default, world_size=2)["zero_optimization"]["reduce_bucket_size"] == 5e7
    assert DEFAULT_DEEPSPEED["zero_optimization"]["reduce_bucket_size"] == 5e7  # the default is left as it is
    named = load_config(toy, [f"deepspeed={ROOT / 'launch' / 'zero3.json'}"])  # a JSON the user names is kept
    assert build_deepspeed_config(named, world_size=1)["zero_optimization"]["reduce_bucket_size"] == 5e7


def test_launch_configs_are_valid_zero3(toy, monkeypatch):
    monkeypatch.chdir(ROOT)
    shipped = json.loads((ROOT / "launch" / "zero3.json").read_text())
    assert shipped["zero_optimization"] == DEFAULT_DEEPSPEED["zero_optimization"]
    offload = json.loads((ROOT / "launch" / "zero3_offload.json").read_text())
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    for name in ("zero3.json", "zero3_offload.json"):
        cfg = load_config(toy, [f"deepspeed={ROOT / 'launch' / name}"])
        assert build_deepspeed_config(cfg, world_size=2)["zero_optimization"]["stage"] == 3


def test_example_configs_load(toy, monkeypatch):
    monkeypatch.chdir(ROOT)
    # iterate_*.yaml are `dora-engine iterate` configs (tests/test_iterate.py)
    examples = sorted(p for p in (ROOT / "launch" / "configs").glob("*.yaml") if not p.name.startswith("iterate_"))
    assert examples
    data_file = _raw(toy)["data"]["train"][0]
    for path in examples:
        cfg = load_config(path, [f"model.path={toy.parent / 'model'}", f"data.train=[{data_file}]", "data.eval=[]"])
        assert cfg.stage in ("sft", "align"), path


# --------------------------------------------------------------------------------------------- data


def _tokeniser(toy: Path, **data_overrides) -> RowTokenizer:
    cfg = load_config(toy, [f"data.{k}={v}" for k, v in data_overrides.items()])
    return row_tokenizer(build_tokenizer(toy.parent / "tok"), cfg.model, cfg.data), cfg


def test_rows_label_only_the_response_tokens(toy):
    tok, cfg = _tokeniser(toy)
    records = load_records(cfg.data.train)
    data = tokenise(records, tok, stage="align", target_source="chosen", num_responses=None, needs_h_tilde=True,
                    data_hash="x")
    assert data.num_responses == 3 and len(data) == len(records)
    batch = collate(data, [2, 0], pad_id=0)
    assert batch["input_ids"].shape[0] == 2 * 3
    raw = build_tokenizer(toy.parent / "tok")
    for n, (b, k) in enumerate([(2, 0), (2, 1), (2, 2), (0, 0), (0, 1), (0, 2)]):
        rec = records[b]
        prompt = raw(rec.prompt_text())["input_ids"]
        response = raw(rec.responses[k].text, add_special_tokens=False)["input_ids"] + [raw.eos_token_id]
        ids, labels = batch["input_ids"][n], batch["labels"][n]
        length = len(prompt) + len(response)
        assert ids[:length].tolist() == prompt + response
        # Hugging Face labels: labels[t] is token t, and only response tokens are scored
        assert labels[: len(prompt)].eq(IGNORE_INDEX).all()
        assert labels[len(prompt) : length].tolist() == response
        assert labels[length:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][n].sum() == length
    expected_scores = [[r.score for r in records[i].responses] for i in (2, 0)]
    assert torch.equal(batch["scores"], torch.tensor(expected_scores))
    assert batch["h_tilde"].tolist() == pytest.approx([records[2].h_tilde, records[0].h_tilde])


def test_truncation_keeps_prompt_end_and_response_start(toy):
    tok, cfg = _tokeniser(toy, max_prompt_tokens=2, max_response_tokens=2)
    rec = load_records(cfg.data.train)[0]
    (row,) = record_rows(tok, 0, rec, [0])
    raw = build_tokenizer(toy.parent / "tok")
    assert row.input_ids == raw(rec.prompt_text())["input_ids"][-2:] + raw(rec.responses[0].text)["input_ids"][:2]


def test_sft_uses_target_source_responses_only(toy):
    tok, cfg = _tokeniser(toy)
    records = load_records(cfg.data.train)
    data = tokenise(records, tok, stage="sft", target_source="synthetic1", num_responses=None, needs_h_tilde=False,
                    data_hash="x")
    assert len(data) == len(records) and data.num_responses == 1
    every = tokenise(records, tok, stage="sft", target_source="*", num_responses=None, needs_h_tilde=False,
                     data_hash="x")
    assert len(every) == sum(rec.num_responses for rec in records)
    with pytest.raises(RecordError, match="no response has source 'gold'.*sources in the data"):
        tokenise(records, tok, stage="sft", target_source="gold", num_responses=None, needs_h_tilde=False,
                 data_hash="x")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda r: r[3]["responses"].pop(), "record 3 (id='toy-3'): has 2 responses but a batch needs a fixed K = 3"),
        (lambda r: r[4]["responses"][1].pop("score"), "record 4 (id='toy-4'): field 'responses[1].score' is missing"),
        (lambda r: r[5].pop("h_tilde"), "record 5 (id='toy-5'): field 'h_tilde' is missing"),
        (lambda r: r[6].update(h_tilde=-1), "record 6 (id='toy-6'): field 'h_tilde' must be a finite number > 0"),
        (lambda r: r[7].update(id="toy-1"), "record 7 (id='toy-1'): duplicate id"),
    ],
)
def test_bad_data_names_the_record(toy, tmp_path, corrupt, message):
    records = make_records(8)
    corrupt(records)
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    tok, cfg = _tokeniser(toy)
    with pytest.raises(RecordError) as err:
        tokenise(load_records([str(path)]), tok, stage="align", target_source="chosen", num_responses=None,
                 needs_h_tilde=True, data_hash="x")
    assert message in str(err.value)


def test_missing_h_tilde_is_fine_when_the_strategy_does_not_use_it(toy, tmp_path):
    records = make_records(4)
    records[1].pop("h_tilde")
    tok, _ = _tokeniser(toy)
    data = tokenise(load_records([str(write_jsonl(tmp_path / "d.jsonl", records))]), tok, stage="align",
                    target_source="chosen", num_responses=None, needs_h_tilde=False, data_hash="x")
    assert "h_tilde" not in collate(data, [0, 1], pad_id=0)


def test_bad_data_fails_before_any_process_or_step(toy, tmp_path):
    records = make_records(8)
    records[2]["responses"][0]["score"] = "high"
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "dora_engine.training", "--config", str(toy), f"data.train=[{path}]",
                           f"output_dir={out}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "record 2 (id='toy-2'): field 'responses[0].score' must be a finite number" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------- sampler, schedule


def test_sampler_is_deterministic_and_independent_of_world_size():
    one = Sampler(num_examples=37, micro=4, world=1, accum=2, seed=5)
    two = Sampler(num_examples=37, micro=2, world=2, accum=2, seed=5)
    assert one.steps_per_epoch == two.steps_per_epoch == 4
    for step in range(9):  # crosses two epoch boundaries
        for j in range(2):
            merged = two.step_indices(step, 0)[j] + two.step_indices(step, 1)[j]
            assert merged == one.step_indices(step, 0)[j]
    epoch0 = [i for s in range(4) for micro in one.step_indices(s, 0) for i in micro]
    assert len(set(epoch0)) == 32  # each example at most once per epoch; the remainder of 5 dropped
    assert one.order(0).tolist() != one.order(1).tolist()
    assert Sampler(37, 4, 1, 2, seed=5).step_indices(3, 0) == one.step_indices(3, 0)


def test_lr_schedule():
    cosine = lr_lambda("cosine", warmup=4, total=20)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0 and cosine(12) == pytest.approx(0.5) and cosine(20) == pytest.approx(0.0)
    linear = lr_lambda("linear", warmup=0, total=10)
    assert linear(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


# ---------------------------------------------------------------------------------------------- export


def test_merge_lora_matches_peft_merge(toy):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dora_engine.training.export import merge_lora

    model = AutoModelForCausalLM.from_pretrained(toy.parent / "model")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = merge_lora(state, alpha=8, r=4)
    expected = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], msg=key)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda r: r[1]["responses"].pop(),
         "record 1 (id='eval-1'): has 2 responses but the records of data.train have K = 3"),
        (lambda r: r[2].pop("h_tilde"), "record 2 (id='eval-2'): field 'h_tilde' is missing"),
    ],
)
def test_eval_data_errors_name_the_eval_file_at_load(toy, tmp_path, capsys, corrupt, message):
    """data.eval is checked against data.train's K (and for h̃) when it is loaded, before any process
    group or reference pass, and the error names the eval file and its record."""
    from dora_engine.cli import main

    records = make_records(4, seed=1)
    for i, rec in enumerate(records):
        rec["id"] = f"eval-{i}"
    corrupt(records)
    bad = write_jsonl(tmp_path / "eval.jsonl", records)
    out, cache = tmp_path / "run", tmp_path / "ref_cache"
    assert main(["train", "--config", str(toy), f"data.eval=[{bad}]", f"output_dir={out}",
                 f"data.ref_cache_dir={cache}"]) == 2
    err = capsys.readouterr().err
    assert f"dora-engine train: error: {bad}: {message}" in err, err
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize("name", ["quickstart_sft.yaml", "quickstart_align.yaml"])
def test_quickstart_configs_load(tmp_path, name):
    """The configs launch/quickstart.sh runs are valid as written (it overrides only the paths)."""
    from dora_engine.data.schema import write_records
    from dora_engine.data.synth import synth_records
    from dora_engine.training.config import load_config

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    write_records(tmp_path / "train.jsonl", synth_records(4))
    config = Path(__file__).resolve().parents[1] / "launch" / "configs" / name
    cfg = load_config(config, [f"model.path={tmp_path / 'model'}", f"data.train=[{tmp_path / 'train.jsonl'}]",
                               f"output_dir={tmp_path / 'run'}"])
    assert cfg.stage in ("sft", "align")
    if cfg.stage == "sft":
        assert cfg.data.target_source == "*"
    else:
        assert (cfg.loss.name, cfg.robust.strategy) == ("rrhf", "dora") and cfg.needs_h_tilde
