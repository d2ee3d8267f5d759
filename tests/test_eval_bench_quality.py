"""benchmarks/bench_quality.py: the quick run end to end (every run trained by the engine's ``Trainer``), the
reversed-preference check, and the paired-difference arithmetic on fixed results."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from benchmark_script import load_benchmark

from dora_engine.eval.paired import bootstrap_mean

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("bench_quality")
    sys.modules.pop("bench_quality", None)


def test_quick_run_end_to_end(bench, tmp_path, monkeypatch):
    import torch
    import torch.distributed as dist

    from dora_engine.training.engine import Trainer

    steps: list[tuple[str, int, int]] = []  # (stage, the run's total steps, step) of every Trainer.train_step
    train_step = Trainer.train_step

    def counted(self, step):
        steps.append((self.cfg.stage, self.total_steps, step))
        return train_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", counted)
    threads, environment = torch.get_num_threads(), dict(os.environ)
    try:
        assert bench.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process
        os.environ.clear()  # and the trainers' process group of one its RANK, MASTER_PORT, ...
        os.environ.update(environment)
    assert not dist.is_initialized()  # the bench leaves no process group behind
    report = json.loads((tmp_path / "quality_results.json").read_text())
    config, (seed,) = report["config"], report["seeds"]
    assert report["quick"] is True and seed["seed"] == 0
    runs = {r["strategy"]: r for r in seed["runs"]}
    assert set(runs) == {"erm", "dora", bench.REVERSED}
    # Every run, the SFT and the three alignment runs, trained through the engine's loop, each step once.
    sft_steps = config["sft_epochs"] * config["train_prompts"] * config["k"] // config["sft_batch"]
    align_steps = config["align_epochs"] * config["train_prompts"] // config["align_batch_prompts"]
    assert steps == [("sft", sft_steps, s) for s in range(sft_steps)] + [
        ("align", align_steps, s) for s in range(align_steps)] * 3
    for run in runs.values():
        rewards, points = run["per_prompt"]["reward"], run["per_prompt"]["win_rate"]
        assert len(rewards) == len(points) == config["eval_prompts"]
        assert run["reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
        assert set(points) <= {0.0, 0.5, 1.0}
    # Training on reversed preferences (the worst response preferred) must move the policy below its SFT
    # start: fails if labels, scores or the loss's sign were misaligned anywhere on the engine's path.
    reversed_reward = runs[bench.REVERSED]["reward"]
    assert reversed_reward < seed["sft"]["reward"] and reversed_reward < runs["erm"]["reward"], (seed["sft"], runs)
    h = seed["mean_h_tilde"]
    assert all(math.isfinite(v) and v > 0 for v in h.values())
    assert h["with_golden"] > h["without_golden"], h  # phase 1 tells golden responses apart even here
    table = (tmp_path / "quality.md").read_text()
    assert "| paper, noise 0% | dpo_pl |" in table and "dora − erm" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_prompts_are_unseen_in_training(bench):
    config = bench.BenchConfig()
    train = {r.prompt for s in bench.SETTINGS for r in bench.training_records(config, 10, s)}
    records = bench.eval_records(config, 10)
    held_out = {r.prompt for r in records}
    assert len(held_out) >= 200 and not train & held_out
    assert all(any(x.source == "golden" for x in r.responses) for r in records)


def test_paired_differences_over_seeds(bench):
    config = replace(bench.BenchConfig(), settings=("paper, noise 40%",), losses=("rrhf",),
                     strategies=("erm", "dora"), seeds=(0, 1, 2))
    rewards = {"erm": [0.50, 0.60, 0.70], "dora": [0.60, 0.65, 0.90]}
    seeds = [
        bench.SeedResult(seed, {"reward": 0.4, "win_rate": 0.1}, {"with_golden": 1.2, "without_golden": 0.7}, [
            bench.RunResult(seed, "paper, noise 40%", "rrhf", strategy, values[seed], 0.2, 1.0)
            for strategy, values in rewards.items()
        ], 1.0)
        for seed in range(3)
    ]
    per_seed, interval = bench.differences(seeds, "reward", "paper, noise 40%", "rrhf", "erm")
    assert per_seed == pytest.approx({0: 0.10, 1: 0.05, 2: 0.20})
    assert interval.mean == pytest.approx(0.35 / 3) and interval.n == 3
    expected = bootstrap_mean([0.10, 0.05, 0.20])  # the bootstrap of dora − erm over the seeds, in seed order
    assert (interval.lo, interval.hi) == pytest.approx((expected.lo, expected.hi)) and interval.lo > 0
    table = bench.markdown_tables(config, seeds)
    assert f"**{interval.format(1.0, 3)}**" in table  # all three differences > 0: the interval excludes zero
    assert "| paper, noise 40% | rrhf | +0.100 | +0.050 | +0.200 |" in table


def test_lambda_sweep_plan_and_combined_results(bench, tmp_path):
    """The sweep adds dora runs at each λ and h̃ scale except the plain dora run's point; its curve ends at
    reweighting (λ = ∞); two result files of the same seeds join per seed, and other seeds are refused."""
    config = replace(bench.BenchConfig(), strategies=("erm", "reweight", "dora"), lam=1.0, h_scale="none",
                     lam_sweep=(0.5, 1.0, 2.0), scale_sweep=("none", "dataset"), settings=("paper, noise 0%",),
                     losses=("rrhf",), seeds=(0, 1))
    labels = [label for label, _ in bench.variants(config)]
    assert labels == ["erm", "reweight", "dora", "dora[none] λ=0.5", "dora[none] λ=2", "dora[dataset] λ=0.5",
                      "dora[dataset] λ=1", "dora[dataset] λ=2"]
    assert dict(bench.variants(config))["dora[dataset] λ=2"] == bench.Variant("dora", 2.0, "dataset",
                                                                              config.ratio_power)
    assert bench.curve_labels(config, "none", config.ratio_power) == [(0.5, "dora[none] λ=0.5"), (1.0, "dora"),
                                                       (2.0, "dora[none] λ=2"), (math.inf, "reweight")]
    # a τ sweep without a λ sweep: dora at the config's λ on h̃ at each τ; reweighting is on the config's τ only
    powers = replace(config, lam_sweep=(), scale_sweep=(), ratio_power=1.0, power_sweep=(0.25, 1.0))
    assert bench.variants(powers)[3:] == [("dora[none] λ=1 τ=0.25", bench.Variant("dora", 1.0, "none", 0.25))]
    assert bench.curve_labels(powers, "none", 0.25) == [(1.0, "dora[none] λ=1 τ=0.25")]
    assert bench.curve_labels(powers, "none", 1.0) == [(1.0, "dora"), (math.inf, "reweight")]

    def results(labels: list[str], sft: float) -> list:
        return [bench.SeedResult(seed, {"reward": 0.4, "win_rate": 0.1}, {"with_golden": 1.0, "without_golden": 0.5},
                                 [bench.RunResult(seed, "paper, noise 0%", "rrhf", label, 0.1 * i + seed, 0.2, 1.0)
                                  for i, label in enumerate(labels)], 1.0, {"reward": [sft]})
                for seed in (0, 1)]

    first = replace(config, scale_sweep=("none",))
    second = replace(config, strategies=("erm",), scale_sweep=("dataset",))
    for name, cfg, labels in (("a", first, ["erm", "reweight", "dora", "dora[none] λ=0.5", "dora[none] λ=2"]),
                              ("b", second, ["erm", "dora[dataset] λ=0.5", "dora[dataset] λ=1"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "r.json").write_text(json.dumps({"config": bench.asdict(cfg),
                                                            "seeds": [bench.asdict(s) for s in results(labels, 0.3)]}))
    joined, seeds = bench.combine([tmp_path / "a" / "r.json", tmp_path / "b" / "r.json"])
    assert joined.scale_sweep == ("none", "dataset") and [s.seed for s in seeds] == [0, 1]
    assert [r.strategy for r in seeds[0].runs] == ["erm", "reweight", "dora", "dora[none] λ=0.5", "dora[none] λ=2",
                                                   "dora[dataset] λ=0.5", "dora[dataset] λ=1"]  # erm kept once
    table = "\n".join(bench.sweep_tables(joined, seeds))
    # τ: the config's; dora[dataset] λ=1 − erm = 0.2 on both seeds
    assert f"| dataset | {first.ratio_power:g} | 1 | +0.200 |" in table
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "r.json").write_text(json.dumps({"config": bench.asdict(second), "seeds": [
        bench.asdict(s) for s in results(["erm"], 0.9)]}))
    with pytest.raises(SystemExit, match="SFT start differs"):
        bench.combine([tmp_path / "a" / "r.json", tmp_path / "c" / "r.json"])


def test_bench_trains_with_the_quickstart_settings(bench, tmp_path):
    """The benchmark's defaults are the quickstart's (launch/quickstart.sh and its two configs), so the
    figures in benchmarks/RESULTS.md speak for what the quickstart runs."""
    from dora_engine.data.schema import write_records
    from dora_engine.data.synth import synth_records
    from dora_engine.training.config import load_config

    repo = BENCH.parents[1]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    write_records(tmp_path / "train.jsonl", synth_records(4))
    config = bench.BenchConfig()
    script = (repo / "launch" / "quickstart.sh").read_text()
    for stage, global_batch in (("sft", 64), ("align", 8)):
        shipped = load_config(repo / "launch" / "configs" / f"quickstart_{stage}.yaml", [
            f"model.path={tmp_path / 'model'}", f"data.train=[{tmp_path / 'train.jsonl'}]",
            f"output_dir={tmp_path / stage}", f"train.micro_batch_prompts={global_batch}"])  # 1 rank
        loss, strategy = ("rrhf", "dora") if stage == "align" else ("dpo_pl", "erm")
        variant = bench.Variant(strategy, config.lam, config.h_scale, config.ratio_power)
        ours = bench.run_config(config, stage, 0, loss, variant)
        for section, fields in (("train", ("micro_batch_prompts", "lr", "schedule", "warmup_steps", "epochs",
                                           "grad_accum_steps", "max_grad_norm", "weight_decay")),
                                ("data", ("max_prompt_tokens", "max_response_tokens"))):
            for name in fields:
                assert getattr(getattr(ours, section), name) == getattr(getattr(shipped, section), name), name
        assert f"{global_batch} / NPROC" in script
        if stage == "sft":
            assert ours.data.target_source == shipped.data.target_source == "*"
        else:
            assert (shipped.loss.name, shipped.robust.strategy, shipped.robust.lam, shipped.robust.h_scale) == (
                "rrhf", "dora", config.lam, config.h_scale)
            assert loss in config.losses
    assert f"--backbone {config.calibration_backbone} --folds {config.calibration_folds}" in script
    assert f"--num-prompts {config.train_prompts} --k {config.k} --golden-fraction {config.golden_fraction}" in script
    assert f"--num-prompts {config.eval_prompts}" in script and f"--max-new-tokens {config.max_new_tokens}" in script
