"""Win-rate arithmetic, bootstrap intervals and the join of generations with golden responses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dora_engine.data.schema import Record, RecordError, Response
from dora_engine.eval.comparison import Comparison
from dora_engine.eval.generate import Generation
from dora_engine.eval.judges import RewardJudge
from dora_engine.eval.winrate import pair_with_golden, summarise


def test_rates_count_ties_and_leave_out_errors():
    verdicts = ["win"] * 5 + ["lose"] * 3 + ["tie"] * 2 + ["error"] * 4
    s = summarise(verdicts, n_boot=200, seed=0)
    assert (s.judged, s.wins, s.losses, s.ties, s.errors) == (10, 5, 3, 2, 4)
    assert s.win_rate == pytest.approx(0.5)
    assert s.lose_rate == pytest.approx(0.3)
    assert s.tie_rate == pytest.approx(0.2)
    assert s.win_rate_ties_half == pytest.approx(0.6)


def test_all_wins_give_a_degenerate_interval():
    s = summarise(["win"] * 30, n_boot=500)
    assert s.ci["win_rate"] == (1.0, 1.0)
    assert s.ci["lose_rate"] == (0.0, 0.0)


def test_bootstrap_interval_matches_the_normal_approximation():
    n, p = 2000, 0.3
    verdicts = ["win"] * int(n * p) + ["lose"] * (n - int(n * p))
    s = summarise(verdicts, n_boot=4000, seed=1)
    lo, hi = s.ci["win_rate"]
    half_width = 1.959964 * math.sqrt(p * (1 - p) / n)
    assert lo < p < hi
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(p, abs=half_width / 5)


def test_bootstrap_equals_an_explicit_resampling_loop():
    verdicts = ["win", "lose", "tie", "win", "win", "lose", "tie", "win", "error", "lose", "win"]
    s = summarise(verdicts, n_boot=300, seed=7)
    judged = [v for v in verdicts if v != "error"]
    rng = np.random.default_rng(7)
    draws = rng.integers(0, len(judged), size=(300, len(judged)))
    half = [sum({"win": 1.0, "tie": 0.5}.get(judged[i], 0.0) for i in row) / len(judged) for row in draws]
    assert s.ci["win_rate_ties_half"] == pytest.approx(tuple(np.quantile(half, [0.025, 0.975])))


def test_bootstrap_is_seeded():
    verdicts = ["win"] * 13 + ["lose"] * 11 + ["tie"] * 6
    assert summarise(verdicts, seed=3).ci == summarise(verdicts, seed=3).ci
    assert summarise(verdicts, seed=3).ci != summarise(verdicts, seed=4).ci


def test_only_errors_give_nan_rates_and_bad_verdicts_fail():
    s = summarise(["error", "error"])
    assert s.judged == 0 and s.errors == 2 and math.isnan(s.win_rate)
    with pytest.raises(ValueError, match="unknown verdict"):
        summarise(["win", "draw"])


def _record(rid: str, prompt: str) -> Record:
    return Record(rid, prompt, [Response(f"shifted {rid}", "verbose", 0.0), Response(f"gold {rid}", "golden", 1.0)])


def test_pairing_by_id_then_by_prompt_text():
    records = [_record("a", "first prompt"), _record("b", "second prompt")]
    generations = [Generation("b", "second prompt", "out b", "m"), Generation("7", "first prompt", "out a", "m")]
    pairs = pair_with_golden(generations, records, "golden")
    assert [(c.id, c.policy, c.golden) for c in pairs] == [("b", "out b", "gold b"), ("7", "out a", "gold a")]


def test_pairing_errors_name_the_record():
    with pytest.raises(RecordError, match="id='a'.*no response from target source 'chosen'"):
        pair_with_golden([Generation("a", "first prompt", "x", "m")], [_record("a", "first prompt")], "chosen")
    with pytest.raises(RecordError, match="generation id='zz'"):
        pair_with_golden([Generation("zz", "unknown", "x", "m")], [_record("a", "first prompt")], "golden")


class _LengthScorer:
    name = "length"

    def score(self, prompts, responses):
        return [float(len(r)) for r in responses]


def test_reward_judge_verdicts_and_tie_tolerance():
    comparisons = [Comparison("1", "p", "long answer", "short"), Comparison("2", "p", "ab", "abcd"),
                   Comparison("3", "p", "abc", "abd"), Comparison("4", "p", "abcd", "abc")]
    assert RewardJudge(_LengthScorer()).judge(comparisons) == ["win", "lose", "tie", "win"]
    assert RewardJudge(_LengthScorer(), tie_tolerance=1.0).judge(comparisons) == ["win", "lose", "tie", "tie"]


def test_cli_with_the_oracle_judge(tmp_path):
    import argparse
    import json

    from dora_engine.data.schema import write_records
    from dora_engine.data.synth import synth_records
    from dora_engine.eval import commands
    from dora_engine.eval.generate import write_generations

    records = synth_records(12, k=3, seed=4)
    golden = {r.id: next(x.text for x in r.responses if x.source == "golden") for r in records}
    outputs = [golden[r.id] if i < 4 else "" for i, r in enumerate(records)]  # 4 ties, then empty answers
    write_records(tmp_path / "data.jsonl", records)
    write_generations(tmp_path / "gen.jsonl", [Generation(r.id, r.prompt_text(), o, "m")
                                               for r, o in zip(records, outputs, strict=True)])
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["eval", "winrate", "--generations", str(tmp_path / "gen.jsonl"), "--data",
                              str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "report.json")])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["ties"], report["losses"], report["wins"]) == (4, 8, 0)
    assert report["win_rate_ties_half"] == pytest.approx(2 / 12)
    assert report["verdicts"][records[0].id] == "tie" and report["judge"] == "oracle"


def _tiny_reward_model(path, num_labels):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from dora_engine.data.synth import build_synth_tokenizer

    tokenizer = build_synth_tokenizer(path)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
    )).save_pretrained(path)
    return path


def test_reward_model_judge_compares_single_logits(tmp_path):
    from dora_engine.eval.judges import RewardModelScorer, make_judge

    path = str(_tiny_reward_model(tmp_path / "rm", 1))
    scorer = RewardModelScorer(path, batch_size=2, device="cpu")
    texts = ["make tea", "boil fresh water", "warm the pot then add the tea leaves"]
    prompts = ["how do i make tea?"] * 3
    rewards = scorer.score(prompts, texts)
    assert len(rewards) == 3 and len(set(rewards)) == 3
    one_padded_batch = RewardModelScorer(path, batch_size=3, device="cpu").score(prompts, texts)
    assert rewards == pytest.approx(one_padded_batch, abs=1e-5)
    comparisons = [Comparison(str(i), "how do i make tea?", texts[i], texts[(i + 1) % 3]) for i in range(3)]
    expected = ["win" if rewards[i] > rewards[(i + 1) % 3] else "lose" for i in range(3)]
    assert make_judge(f"reward-model:{path}", device="cpu").judge(comparisons) == expected


def test_reward_model_with_two_outputs_is_rejected(tmp_path):
    from dora_engine.eval.judges import RewardModelScorer

    path = str(_tiny_reward_model(tmp_path / "rm2", 2))
    with pytest.raises(ValueError, match="has 2 outputs; a reward model needs exactly 1"):
        RewardModelScorer(path, device="cpu")
