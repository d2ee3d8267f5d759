"""benchmarks/bench_quality.py: the quick run end to end, and the table arithmetic on fixed results."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_end_to_end(bench, tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
    report = json.loads((tmp_path / "quality_results.json").read_text())
    config, runs = report["config"], report["runs"]
    assert report["quick"] is True and (config["train_prompts"], config["eval_prompts"]) == (32, 16)
    assert [(r["seed"], r["noise"], r["loss"], r["strategy"], r["lam"]) for r in runs] == [
        (0, 0.0, "dpo_pl", "erm", 1.0), (0, 0.0, "dpo_pl", "dora", 1.0), (0, 0.0, "dpo_pl", "dora", 4.0)
    ]
    assert list(report["sft_win_rate"]) == list(report["mean_h_tilde"]) == ["0"]
    # ties count half and every one of the 16 evaluation prompts is judged: a multiple of 1/32 in [0, 1]
    for rate in [r["win_rate"] for r in runs] + [report["sft_win_rate"]["0"]]:
        assert 0.0 <= rate <= 1.0 and (rate * 2 * config["eval_prompts"]).is_integer(), rate
    h = report["mean_h_tilde"]["0"]
    assert set(h) == {"with_golden", "shifted_only"} and all(math.isfinite(v) and v > 0 for v in h.values())
    # phase 1 tells the golden responses apart even in the quick run: prompts with one get the larger h̃
    assert h["with_golden"] > h["shifted_only"], h
    table = (tmp_path / "quality.md").read_text()
    assert "| dpo_pl | 0% |" in table and "λ = 4" in table
    assert f"golden response {h['with_golden']:.3f}, shifted-only prompts {h['shifted_only']:.3f}" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_tables_report_mean_and_std_over_seeds(bench):
    config = replace(bench.BenchConfig(), losses=("rrhf",), strategies=("erm", "dora"), noises=(0.4,),
                     lam_curve=(1.0, 2.0), lam_curve_loss="rrhf", seeds=(0, 1, 2))
    rates = {("erm", 1.0): [0.10, 0.20, 0.30], ("dora", 1.0): [0.25, 0.25, 0.40], ("dora", 2.0): [0.5, 0.6, 0.7]}
    results = [bench.RunResult(seed, 0.4, "rrhf", strategy, lam, rate, 1.0)
               for (strategy, lam), values in rates.items() for seed, rate in enumerate(values)]
    table = bench.markdown_tables(config, results, {"0": 0.05, "1": 0.15, "2": 0.1})

    def cell(values):
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"

    assert f"| rrhf | 40% | {cell(rates['erm', 1.0])} | {cell(rates['dora', 1.0])} |" in table
    assert f"| 40% | {cell(rates['dora', 1.0])} | {cell(rates['dora', 2.0])} | {cell(rates['erm', 1.0])} |" in table
    assert f"SFT starting point: {cell([0.05, 0.15, 0.1])}" in table


def test_training_rows_score_only_the_response(bench):
    from dora_engine.data.synth import build_synth_tokenizer

    tokenizer = build_synth_tokenizer()
    ids, labels = bench.encode_response(tokenizer, "How do I make tea?", "Boil fresh water.")
    prompt_len = len(tokenizer("How do I make tea?", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [bench.IGNORE] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tokenizer.eos_token_id
    batch = bench.collate(tokenizer, [(ids, labels), (ids[:3], labels[:3])])
    assert batch["labels"].shape[1] == batch["input_ids"].shape[1] - 1
    assert batch["attention_mask"][1].sum() == 3
