"""``eval generate`` with a tiny random Llama and the synth word-level tokenizer (built offline)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import replace

import pytest

from dora_engine.data.schema import Record, Response, write_records
from dora_engine.eval import commands
from dora_engine.eval.generate import generate_records, read_generations
from dora_engine.generation import EVALUATION_SAMPLING, Sampling, render_prompt

PROMPTS = ["How do I bake bread?", "Give me tips to make tea.", "What is the best way to plant a tree?",
           "Can you explain how to clean a window?", "How do I cook rice?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dora_engine.data.synth import build_synth_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_synth_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture()
def records():
    return [Record(f"r{i}", p, [Response("a", "golden", 1.0), Response("b", "verbose", 0.0)])
            for i, p in enumerate(PROMPTS)]


def _run(argv):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_jsonl_and_alpaca_eval_outputs(model_dir, records, tmp_path):
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    out, alpaca = tmp_path / "gen.jsonl", tmp_path / "model_outputs.json"
    assert _run(["eval", "generate", "--model", str(model_dir), "--data", str(data), "--output", str(out),
                 "--alpaca-eval", str(alpaca), "--generator", "tiny", "--max-new-tokens", "6",
                 "--batch-size", "2", "--limit", "4", "--device", "cpu"]) == 0
    generations = read_generations(out)
    assert [g.id for g in generations] == ["r0", "r1", "r2", "r3"]
    assert [g.instruction for g in generations] == PROMPTS[:4]
    assert all(g.generator == "tiny" and 0 < len(g.output.split()) <= 6 for g in generations)
    rows = json.loads(alpaca.read_text())
    assert rows == [{"instruction": g.instruction, "output": g.output, "generator": "tiny"} for g in generations]
    assert [g.output for g in read_generations(alpaca)] == [g.output for g in generations]


def test_left_padded_batches_match_one_prompt_at_a_time(model_dir, records):
    greedy = replace(EVALUATION_SAMPLING, temperature=0.0, max_new_tokens=8)
    batched = generate_records(records, str(model_dir), sampling=greedy, batch_size=5, device="cpu")
    single = generate_records(records, str(model_dir), sampling=greedy, batch_size=1, device="cpu")
    assert [g.output for g in batched] == [g.output for g in single]
    assert batched[0].generator == model_dir.name


def test_sampling_is_seeded_and_independent_of_the_batch_size(model_dir, records):
    def sample(seed, batch_size=8):
        return [g.output for g in generate_records(records, str(model_dir), device="cpu", seed=seed,
                                                   sampling=replace(EVALUATION_SAMPLING, max_new_tokens=8),
                                                   batch_size=batch_size)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1, batch_size=2) == sample(1)


def test_chat_template_is_used_when_present():
    from dora_engine.data.synth import build_synth_tokenizer

    tokenizer = build_synth_tokenizer()
    assert render_prompt(tokenizer, "How do I make tea?") == "How do I make tea?"
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert render_prompt(tokenizer, "hi") == "<user>hi<assistant>"
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_prompt(tokenizer, chat) == "<user>a<assistant>b<user>c<assistant>"


def test_bad_options_are_reported(records):
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="unknown backend"):
        generate_records(records, "unused", backend="tgi")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_requested_but_missing(records):
    with pytest.raises(ImportError, match="vllm.*dora-engine\\[generate\\]"):
        generate_records(records, "unused", backend="vllm")


def test_generation_leaves_the_tokenizer_padding_as_it_was(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dora_engine.generation import sample_texts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sample_texts(model, tokenizer, PROMPTS[:2], replace(EVALUATION_SAMPLING, max_new_tokens=2), [0, 1], progress=False)
    assert tokenizer.padding_side == "right"
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    mask = reloaded(["a", "how do i make tea"], padding=True)["attention_mask"]
    assert mask[0][0] == 1 and mask[0][-1] == 0  # still padded on the right


def test_default_names_tell_two_exported_runs_apart(model_dir, records, tmp_path, capsys):
    """Every training run exports to RUN/final: the default generator (eval generate) and source (data
    augment) is the run's name, so two runs' outputs stay apart; --help says so."""
    import os

    from dora_engine.cli import main
    from dora_engine.data.schema import read_records

    data = tmp_path / "data.jsonl"
    write_records(data, records[:2])
    for run in ("sft", "align"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        os.symlink(model_dir, tmp_path / "runs" / run / "final")
    names = {}
    for run in ("sft", "align"):
        model = str(tmp_path / "runs" / run / "final")
        out = tmp_path / f"gen_{run}.jsonl"
        assert main(["eval", "generate", "--model", model, "--data", str(data), "--output", str(out),
                     "--max-new-tokens", "2", "--device", "cpu"]) == 0
        augmented = tmp_path / f"aug_{run}.jsonl"
        assert main(["data", "augment", str(data), "--out", str(augmented), "--model", model + "/", "--n", "1",
                     "--max-new-tokens", "2", "--device", "cpu"]) == 0
        generators = {g.generator for g in read_generations(out)}
        sources = {rec.responses[-1].source for rec in read_records(augmented)}
        assert generators == sources
        names[run] = generators.pop()
    assert names == {"sft": "sft", "align": "align"}
    for argv, option in ((["eval", "generate"], "--generator"), (["data", "augment"], "--source")):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "for a training run's export RUN/final, the run folder's name RUN" in text, (option, text)
