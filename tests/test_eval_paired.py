"""dora_engine.eval.paired and `dora-engine eval compare`: paired differences with bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dora_engine.data.schema import Record, Response, write_records
from dora_engine.errors import UserValueError
from dora_engine.eval.generate import Generation, write_generations
from dora_engine.eval.paired import bootstrap_mean, check_same_prompts, paired_interval


def test_bootstrap_mean_matches_a_direct_resampling():
    values = [0.1, 0.4, 0.35, 0.8, 0.2, 0.55]
    interval = bootstrap_mean(values, n_boot=500, seed=3)
    rng = np.random.default_rng(3)
    means = np.asarray(values)[rng.integers(0, len(values), size=(500, len(values)))].mean(axis=1)
    assert interval.mean == pytest.approx(np.mean(values)) and interval.n == 6
    assert (interval.lo, interval.hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))


def test_pairing_removes_what_both_share():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1, 200)  # per-prompt difficulty, shared by both models
    baseline = difficulty
    candidate = difficulty + 0.1 + rng.normal(0, 0.05, 200)
    paired = paired_interval(baseline, candidate)
    unpaired_width = bootstrap_mean(candidate).hi - bootstrap_mean(candidate).lo
    assert paired.excludes_zero() and paired.lo > 0.05
    assert paired.hi - paired.lo < unpaired_width / 5
    same = paired_interval(baseline, baseline + rng.normal(0, 0.05, 200))
    assert not same.excludes_zero()


def test_mismatched_inputs_are_named():
    with pytest.raises(UserValueError, match="equal lengths"):
        paired_interval([1.0], [1.0, 2.0])
    with pytest.raises(UserValueError, match="row 1: .*'b' and 'c'"):
        check_same_prompts([Generation("a", "x", "", "m"), Generation("b", "y", "", "m")],
                           [Generation("a", "x", "", "n"), Generation("c", "y", "", "n")])


def test_cli_compare_reports_rewards_win_rates_and_h_tilde(tmp_path, capsys):
    from dora_engine.cli import main as cli_main
    from dora_engine.data.synth import oracle_reward

    prompts = ["How do I make tea?", "How do I cook rice?", "How do I wash a car?"]
    golden = ["First boil fresh water. Next warm the pot. Then add the tea leaves.",
              "First rinse the rice. Next add water to the pot. Then cover and simmer.",
              "First rinse the car. Next use car soap. Then dry with a towel."]
    records = [Record(f"r{i}", p, [Response(g, "golden", 2.0), Response("no idea", "off_topic", 0.0)])
               for i, (p, g) in enumerate(zip(prompts, golden, strict=True))]
    write_records(tmp_path / "heldout.jsonl", records)
    weak = ["boil boil boil", "rice", golden[2]]
    for name, texts in (("a", weak), ("b", golden)):
        write_generations(tmp_path / f"{name}.jsonl",
                          [Generation(r.id, r.prompt, t, name) for r, t in zip(records, texts, strict=True)])
    train = [Record("t0", "p", [Response("x", "golden", 1.0), Response("y", "verbose", 0.0)], h_tilde=1.5),
             Record("t1", "q", [Response("x", "verbose", 1.0), Response("y", "repetitive", 0.0)], h_tilde=0.5),
             Record("t2", "r", [Response("x", "verbose", 1.0), Response("y", "repetitive", 0.0)], h_tilde=0.7)]
    write_records(tmp_path / "train.jsonl", train)
    out = tmp_path / "compare.json"
    assert cli_main(["eval", "compare", "--baseline", f"sft={tmp_path / 'a.jsonl'}", "--candidate",
                     f"aligned={tmp_path / 'b.jsonl'}", "--data", str(tmp_path / "heldout.jsonl"),
                     "--h-tilde-data", str(tmp_path / "train.jsonl"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    base = [oracle_reward(p, w) for p, w in zip(prompts, weak, strict=True)]
    cand = [oracle_reward(p, g) for p, g in zip(prompts, golden, strict=True)]
    assert report["reward"]["baseline"]["mean"] == pytest.approx(np.mean(base))
    assert report["reward"]["difference"]["mean"] == pytest.approx(np.mean(cand) - np.mean(base))
    # the candidate repeats the golden responses (three ties); the baseline loses twice and ties once
    assert report["win_rate_ties_half"]["candidate"]["mean"] == pytest.approx(0.5)
    assert report["win_rate_ties_half"]["baseline"]["mean"] == pytest.approx(1 / 6)
    assert report["mean_h_tilde"]["with_target"] == {"mean": 1.5, "records": 1}
    assert report["mean_h_tilde"]["without_target"]["mean"] == pytest.approx(0.6)
    assert "| mean reward |" in printed and "aligned − sft" in printed and "1.500 with a golden response" in printed
    assert out.with_suffix(".md").read_text().startswith("| metric (oracle, 3 held-out prompts)")
