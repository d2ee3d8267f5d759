"""The reward–confidence diagnostic: OLS on constructed data with known slopes, normalisation, CLI output."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dora_engine.data.schema import RecordError
from dora_engine.eval import commands
from dora_engine.eval.calibration_diag import ScoredResponses, diagnose, normalise_rewards, ols_fit


def test_exact_line_is_recovered():
    c = np.linspace(0.05, 0.95, 19)
    fit = ols_fit(c, 0.25 - 1.5 * c)
    assert fit.slope == pytest.approx(-1.5)
    assert fit.intercept == pytest.approx(0.25)
    assert fit.r == pytest.approx(-1.0)
    assert fit.n == 19


def test_noisy_fit_agrees_with_numpy():
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 1, 500)
    y = 0.4 + 2.0 * c + rng.normal(0, 0.3, 500)
    fit = ols_fit(c, y)
    slope, intercept = np.polyfit(c, y, 1)
    assert (fit.slope, fit.intercept) == pytest.approx((slope, intercept))
    assert fit.r == pytest.approx(np.corrcoef(c, y)[0, 1])
    assert fit.slope == pytest.approx(2.0, abs=0.15)


def test_constant_confidence_gives_nan_slope():
    fit = ols_fit([0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    assert np.isnan(fit.slope) and np.isnan(fit.r) and fit.intercept == pytest.approx(2.0)


def test_normalisations():
    r = np.array([3.0, -1.0, 1.0, 5.0])
    assert normalise_rewards(r, "minmax") == pytest.approx((r + 1) / 6)
    z = normalise_rewards(r, "zscore")
    assert z.mean() == pytest.approx(0.0) and z.std() == pytest.approx(1.0)
    assert normalise_rewards(r, "none") == pytest.approx(r)
    assert normalise_rewards([2.0, 2.0], "minmax") == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise_rewards(r, "rank")


def _group(name, c, reward):
    return ScoredResponses(name, [f"p{i}" for i in range(len(c))], [f"y{i}" for i in range(len(c))],
                           list(c), list(reward))


def test_pooled_normalisation_scales_each_slope_by_the_pooled_range():
    c = np.linspace(0, 1, 11)
    policy = _group("policy", c, 1.0 + 2.0 * c)  # rewards 1..3
    baseline = _group("baseline", c, 5.0 - 1.0 * c)  # rewards 4..5
    normalised, fits = diagnose([policy, baseline], "minmax")
    pooled_range = 5.0 - 1.0
    assert fits["policy"].slope == pytest.approx(2.0 / pooled_range)
    assert fits["baseline"].slope == pytest.approx(-1.0 / pooled_range)
    assert normalised["policy"].min() == pytest.approx(0.0) and normalised["baseline"].max() == pytest.approx(1.0)


def test_missing_values_are_named():
    with pytest.raises(RecordError, match="model 'm': response 1 has no confidence"):
        diagnose([_group("m", [0.1, None, 0.3], [1, 2, 3])])


def _run(argv):
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_report_and_png(tmp_path):
    rng = np.random.default_rng(1)
    for name, slope in (("policy", 3.0), ("baseline", -2.0)):
        c = rng.uniform(0, 1, 40)
        rows = [{"instruction": f"p{i}", "output": f"y{i}", "confidence": float(ci), "reward": float(slope * ci)}
                for i, ci in enumerate(c)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert _run(["eval", "calibration", "--model", f"policy={tmp_path / 'policy.jsonl'}",
                 "--model", f"baseline={tmp_path / 'baseline.jsonl'}", "--normalise", "none",
                 "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "calibration_report.json").read_text())
    assert report["fits"]["policy"]["slope"] == pytest.approx(3.0)
    assert report["fits"]["baseline"]["slope"] == pytest.approx(-2.0)
    assert (tmp_path / "out" / "reward_confidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_out_of_range_confidence(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"instruction": "p", "output": "y", "confidence": 1.5, "reward": 1.0}) + "\n")
    with pytest.raises(RecordError, match="line 1: field 'confidence' must lie in"):
        _run(["eval", "calibration", "--model", f"m={path}", "--output-dir", str(tmp_path)])


def test_cli_scores_with_a_classifier_and_the_oracle(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from dora_engine.data.synth import build_synth_tokenizer, synth_records

    classifier = tmp_path / "classifier"
    tokenizer = build_synth_tokenizer(classifier)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id, num_labels=2,
    )).save_pretrained(classifier)
    records = synth_records(6, k=2, seed=0)
    for model in ("policy", "baseline"):
        rows = [{"instruction": r.prompt_text(), "output": r.responses[model == "policy"].text} for r in records]
        (tmp_path / f"{model}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert _run(["eval", "calibration", "--model", f"policy={tmp_path / 'policy.jsonl'}", "--model",
                 f"baseline={tmp_path / 'baseline.jsonl'}", "--reward", "oracle", "--classifier", str(classifier),
                 "--device", "cpu", "--max-length", "64", "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "calibration_report.json").read_text())
    assert report["reward"] == "oracle" and report["confidence"] == str(classifier)
    assert {name: fit["n"] for name, fit in report["fits"].items()} == {"policy": 6, "baseline": 6}


def _generations(path, **extra):
    rows = [{"id": f"r{i}", "instruction": f"p{i}", "output": f"y{i}", "generator": "final", **extra}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        # the rows of `eval generate` carry neither value: each missing one is named with what to pass,
        # before any model loads (the classifier named here does not exist)
        ({}, ["--classifier", "no/such/classifier"],
         "line 1 has no 'reward'; pass --reward oracle (data synth datasets) or --reward reward-model:PATH"),
        ({"reward": 1.0}, [], "line 1 has no 'confidence'; pass --classifier with the folder `dora-engine calibrate`"),
        ({}, ["--reward", "oracle", "--classifier", "{tmp}"],
         "is neither a calibration folder (with calibration.json) nor a classifier folder (with config.json): "
         "pass the folder `dora-engine calibrate` wrote"),
    ],
)
def test_cli_errors_say_what_to_pass(tmp_path, capsys, rows, options, message):
    from dora_engine.cli import main

    gen = _generations(tmp_path / "gen.jsonl", **rows)
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    assert main(["eval", "calibration", "--model", f"policy={gen}", *options,
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dora-engine eval calibration: error: ") and err.count("\n") == 1, err
    assert message in err, err
    if "line 1" in message:
        assert f"{gen} (model 'policy'): line 1" in err
    assert not (tmp_path / "out").exists()
