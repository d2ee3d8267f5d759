"""The synthetic mixture dataset: determinism, the oracle's ranking, options, and its tokenizer."""

from __future__ import annotations

import re
import statistics
from collections import Counter

import pytest

from dora_engine.data.schema import read_records, write_records
from dora_engine.data.synth import (
    GOLDEN_SOURCE,
    SHIFTED_SOURCES,
    TASKS,
    build_synth_tokenizer,
    find_task,
    oracle_reward,
    prompt_pairs,
    synth_records,
    synth_vocabulary,
)


def test_deterministic_per_seed_and_seed_matters():
    a = [r.to_dict() for r in synth_records(60, seed=3)]
    b = [r.to_dict() for r in synth_records(60, seed=3)]
    c = [r.to_dict() for r in synth_records(60, seed=4)]
    assert a == b
    assert a != c


def test_oracle_ranks_golden_above_every_shifted_source():
    by_source: dict[str, list[float]] = {}
    for rec in synth_records(300, k=4, seed=0):
        for r in rec.responses:
            by_source.setdefault(r.source, []).append(r.score)
    golden = statistics.mean(by_source[GOLDEN_SOURCE])
    for source in SHIFTED_SOURCES:
        assert golden > statistics.mean(by_source[source]) + 0.5, source


def test_scores_are_the_oracle_and_golden_is_best_within_prompts():
    records = synth_records(100, seed=1)
    wins = 0
    for rec in records:
        for r in rec.responses:
            assert r.score == oracle_reward(rec.prompt, r.text)
        best = max(rec.responses, key=lambda r: r.score)
        wins += best.source == GOLDEN_SOURCE
    assert wins >= 95


def test_oracle_components_by_hand():
    prompt = "How do I make tea?"
    # 5 content words ('and' is a stop word), all relevant and distinct (target 6), no repeated bigram, short
    assert oracle_reward(prompt, "boil fresh water and pour tea") == pytest.approx(1 + 5 / 6)
    # 'pour the' repeated: 5 bigrams of which 4 distinct; 2 distinct relevant words
    assert oracle_reward(prompt, "pour the pour the tea pour") == pytest.approx(1 + 2 / 6 - (1 - 4 / 5))
    assert oracle_reward(prompt, "") == 0.0
    long_text = " ".join(["water"] + ["zebra"] * 79)  # 80 words: length_excess 1
    assert oracle_reward(prompt, long_text) < 0
    # an unknown prompt falls back to its own content words
    assert oracle_reward("Tell me about zebras", "zebras") == pytest.approx(1 + 1 / 6)


def test_oracle_accepts_chat_prompts_and_decoded_text():
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "How do I cook rice?"}]
    assert find_task(chat) == "cook rice"
    assert oracle_reward(chat, "rinse the rice , cover and simmer .") == oracle_reward(
        "How do I cook rice?", "Rinse the rice, cover and simmer."
    )


def test_options_k_mix_golden_count_and_noise():
    records = synth_records(50, k=3, golden_per_prompt=2, mix={"verbose": 1.0}, seed=2)
    for rec in records:
        assert Counter(r.source for r in rec.responses) == {GOLDEN_SOURCE: 2, "verbose": 1}
    noisy = synth_records(400, label_noise=0.5, seed=2)
    frac = sum(r.meta["corrupted"] for r in noisy) / len(noisy)
    assert 0.4 < frac < 0.6
    biased = synth_records(20, length_bias=1.0, seed=2)
    plain = synth_records(20, seed=2)
    for rb, rp in zip(biased, plain, strict=True):
        for a, b in zip(rb.responses, rp.responses, strict=True):
            assert a.score == pytest.approx(b.score + len(re.findall(r"[a-z]+", a.text.lower())) / 40)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 1}, "k must be"),
        ({"golden_per_prompt": 5}, "golden_per_prompt"),
        ({"mix": {"rude": 1.0}}, "unknown shifted source"),
        ({"mix": {"verbose": 0.0}}, "positive sum"),
        ({"num_prompts": 0}, "num_prompts"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synth_records(**kwargs)


def test_prompts_cover_every_task_before_repeating():
    records = synth_records(len(TASKS) * 4, seed=5)
    assert len({rec.prompt for rec in records}) == len(records)


def test_train_and_eval_splits_share_tasks_but_no_prompt_text():
    train, held_out = prompt_pairs("train"), prompt_pairs("eval")
    assert len(held_out) >= 200 and len(train) + len(held_out) == len(prompt_pairs("all"))
    assert {task for task, _ in train} == {task for task, _ in held_out} == set(TASKS)
    train_texts = {rec.prompt for rec in synth_records(2 * len(train), seed=1, split="train")}
    eval_texts = {rec.prompt for rec in synth_records(len(held_out), seed=2, split="eval")}
    assert len(eval_texts) == len(held_out) and not train_texts & eval_texts
    with pytest.raises(ValueError, match="split"):
        synth_records(4, split="test")


def test_golden_fraction_leaves_the_other_prompts_without_golden():
    records = synth_records(40, k=3, golden_fraction=0.25, seed=3)
    with_golden = [sum(r.source == GOLDEN_SOURCE for r in rec.responses) for rec in records]
    assert with_golden == [1] * 10 + [0] * 30
    with pytest.raises(ValueError, match="golden_fraction"):
        synth_records(4, golden_fraction=1.5)


def test_tokenizer_covers_the_vocabulary_and_roundtrips(tmp_path):
    from transformers import AutoTokenizer

    build_synth_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == len(synth_vocabulary()) + 4
    for rec in synth_records(40, seed=0):
        for text in [rec.prompt] + [r.text for r in rec.responses]:
            ids = tok(text)["input_ids"]
            assert tok.unk_token_id not in ids
            assert oracle_reward(rec.prompt, tok.decode(ids)) == pytest.approx(oracle_reward(rec.prompt, text))


def test_records_roundtrip_through_jsonl(tmp_path):
    records = synth_records(10, seed=0)
    write_records(tmp_path / "s.jsonl", records)
    assert [r.to_dict() for r in read_records(tmp_path / "s.jsonl")] == [r.to_dict() for r in records]


def test_cli_synth_writes_dataset_and_tokenizer(tmp_path, capsys):
    from dora_engine.cli import main as cli_main

    assert cli_main(["data", "synth", "--out", str(tmp_path / "s.jsonl.gz"), "--num-prompts", "12", "--k", "3",
                         "--mix", "verbose=1,repetitive=2", "--seed", "9",
                         "--tokenizer-dir", str(tmp_path / "tok")]) == 0
    assert "records: 12" in capsys.readouterr().out
    expected = synth_records(12, k=3, mix={"verbose": 1, "repetitive": 2}, seed=9)
    assert [r.to_dict() for r in read_records(tmp_path / "s.jsonl.gz")] == [r.to_dict() for r in expected]
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    with pytest.raises(SystemExit):
        cli_main(["data", "synth", "--out", str(tmp_path / "x.jsonl"), "--mix", "verbose"])
