"""``dora-engine iterate``: its config, the rounds' bookkeeping, steps skipped by content hash, resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from benchmark_script import load_benchmark

from dora_engine.cli import main
from dora_engine.data.schema import Record, Response, read_records, write_records
from dora_engine.errors import UserValueError
from dora_engine.iterate.config import IterateConfig, load_iterate_config
from dora_engine.iterate.config_docs import ITERATE
from dora_engine.iterate.pipeline import (
    RUN_MANIFEST,
    Policy,
    Runner,
    _merge,
    align_config,
    kept_rounds,
    lineage,
    open_run,
    planned_steps,
    reference,
)
from dora_engine.iterate.steps import MANIFEST, Step, content_digest, record
from dora_engine.training.config import ConfigError
from dora_engine.training.config_docs import with_key_table
from dora_engine.training.signals import StopSignals

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "launch" / "configs" / "iterate_synth.yaml"


def _config(tmp_path: Path, *overrides: str) -> IterateConfig:
    return load_iterate_config(DEFAULT, [f"output_dir={tmp_path / 'run'}", *overrides])


def _runner(cfg: IterateConfig, steps: int) -> Runner:
    """A runner of a new run in ``cfg.output_dir``."""
    open_run(cfg, resume=False)
    return Runner(cfg, StopSignals(), steps)


# ---------------------------------------------------------------- config


def test_the_embedded_default_loads() -> None:
    cfg = load_iterate_config(DEFAULT)
    assert (cfg.rounds, cfg.strategies, cfg.start.model, cfg.data.train) == (3, ["erm", "dora"], "tiny", "synth")
    assert cfg.source(2) == "synth-round2"


@pytest.mark.parametrize("override,message", [
    ("rounds=0", "config key 'rounds' must be ≥ 1, got 0"),
    ("strategies=[erm, erm]", "config key 'strategies' names a strategy twice"),
    ("strategies=[erm, robust]", "config key 'strategies': unknown strategy 'robust'"),
    ("strategies=[]", "config key 'strategies' must name at least one strategy"),
    ("align.reference=initial", "config key 'align.reference' must be one of previous, start, got 'initial'"),
    ("align.loss=hinge", "config key 'align.loss': unknown loss 'hinge'"),
    ("align.lr=0", "config key 'align.lr' must be > 0"),
    ("align.h_scale=prompt", "config key 'align.h_scale' must be one of none, dataset, batch, got 'prompt'"),
    ("generate.temperature=0", "config key 'generate.temperature' must be > 0"),
    ("generate.top_p=1.5", "config key 'generate.top_p' must lie in (0, 1], got 1.5"),
    ("generate.backend=onnx", "config key 'generate.backend' must be one of transformers, vllm"),
    ("score.reward=gpt4", "config key 'score.reward' must be 'oracle' or 'reward-model:PATH', got 'gpt4'"),
    ("score.previous_rounds=-1", "config key 'score.previous_rounds' must be ≥ 0, got -1"),
    ("calibrate.folds=1", "config key 'calibrate.folds' must be ≥ 2, got 1"),
    ("start.heads=3", "config key 'start.heads' must divide start.hidden (64), got 3"),
    ("data.train=missing.jsonl", "config key 'data.train': file not found: missing.jsonl"),
    ("name=two words", "config key 'name' must be a name without spaces"),
    ("align.lrr=1", "unknown config key 'align.lrr' in override"),
    ("rounds=two", "config key 'rounds' must be an integer, got 'two'"),
])
def test_a_bad_value_is_one_line_naming_its_key(tmp_path: Path, override: str, message: str, capsys) -> None:
    assert main(["iterate", "--config", str(DEFAULT), f"output_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dora-engine iterate: error: ") and "\n" not in err
    assert message in err
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_the_key_table_in_launch_readme_is_up_to_date() -> None:
    text = (ROOT / "launch" / "README.md").read_text(encoding="utf-8")
    assert with_key_table(text, ITERATE) == text, f"launch/README.md's iterate keys are stale: run `{ITERATE.command}`"
    assert "| `align.reference` | `str` | `previous` |" in text


def test_a_tiny_start_needs_the_synthetic_data(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    write_records(data, [Record("a", "p", [Response("x", "golden", 1.0), Response("y", "other", 0.0)])])
    with pytest.raises(ConfigError, match="'start.model': `tiny` .* needs data.train: synth"):
        _config(tmp_path, f"data.train={data}")


# ---------------------------------------------------------------- round bookkeeping


def test_sources_and_lineage_name_each_round(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 'name=""')
    assert cfg.run_name == "run" and [cfg.source(r) for r in (1, 3)] == ["run-round1", "run-round3"]
    # round 1 generates from the start policy in every chain (one folder, computed once); later rounds per chain
    assert [lineage("dora", r) for r in (1, 2, 3)] == ["start", "dora", "dora"]
    assert [lineage("erm", r) for r in (1, 2)] == ["start", "erm"]
    assert planned_steps(cfg) == 3 + 3 * (4 + 5)  # start: data, policy, eval; erm 4 steps a round, dora 5


@pytest.mark.parametrize("previous,expected", [(0, []), (1, [3]), (2, [2, 3]), (9, [1, 2, 3])])
def test_earlier_rounds_kept(tmp_path: Path, previous: int, expected: list[int]) -> None:
    assert kept_rounds(_config(tmp_path, f"score.previous_rounds={previous}"), 4) == expected


@pytest.mark.parametrize("choice", ["previous", "start"])
def test_the_reference_is_the_previous_policy_or_the_start(tmp_path: Path, choice: str) -> None:
    cfg = _config(tmp_path, f"align.reference={choice}", "align.h_scale=dataset")
    runner = Runner(cfg, StopSignals(), 1)
    start = Policy(tmp_path / "start", "s", "start")
    previous = Policy(tmp_path / "round1" / "align-dora" / "final", "p", "dora-round1")
    ref = reference(cfg, previous, start)
    train = align_config(runner, "dora", previous, ref, tmp_path / "data.jsonl", tmp_path / "round2" / "align-dora")
    assert train.model.path == str(previous.path)
    assert (train.robust.strategy, train.robust.h_scale) == ("dora", "dataset")
    assert train.model.reference == (None if choice == "previous" else str(start.path))  # None: the policy itself
    assert (train.stage, train.checkpoint.resume, train.checkpoint.export) == ("align", "auto", True)
    assert reference(cfg, start, start) is start  # round 1: both choices are the start policy


def _records(ids: list[str], responses: list[tuple[str, float | None]]) -> list[Record]:
    return [Record(i, f"How do I bake bread? {i}", [Response(f"{s} answer {i}", s, score) for s, score in responses])
            for i in ids]


@pytest.mark.parametrize("all_responses", [False, True])
def test_a_round_s_data_keeps_the_training_responses_and_the_kept_rounds(tmp_path: Path, all_responses: bool) -> None:
    cfg = _config(tmp_path, "name=t", "score.previous_rounds=1", f"score.all_responses={str(all_responses).lower()}")
    runner = _runner(cfg, 2)
    ids = ["a", "b"]
    earlier = Step(runner.root, "round1/data-start", {"round": 1})
    write_records(earlier.folder / "train.jsonl",
                  _records(ids, [("golden", 2.0), ("verbose", 0.5), ("t-round1", 0.25)]))
    generate = Step(runner.root, "round2/generate-dora", {"round": 2})
    write_records(generate.folder / "generations.jsonl",
                  _records(ids, [("golden", 2.0), ("verbose", 0.5), ("t-round2", None), ("t-round2", None)]))
    generated = ("round2/generate-dora", record(generate, ["generations.jsonl"]))
    kept = {1: ("round1/data-start", record(earlier, ["train.jsonl"]))}
    done = _merge(runner, "score", "round2/data-dora", generated, kept, "t-round2")
    merged = read_records(runner.root / "round2" / "data-dora" / "train.jsonl")
    assert [r.source for r in merged[0].responses] == ["golden", "verbose", "t-round1", "t-round2", "t-round2"]
    kept_scores = [r.score for r in merged[0].responses[:3]]
    if all_responses:  # the training responses scored again by the oracle, the kept round's as scored then
        assert kept_scores[0] not in (2.0, None) and kept_scores[1] not in (0.5, None) and kept_scores[2] == 0.25
    else:  # scores already there are kept
        assert kept_scores == [2.0, 0.5, 0.25]
    assert all(r.score is not None for r in merged[1].responses)  # the round's own responses are scored
    assert "t-round2" in done.info["summary"]


# ---------------------------------------------------------------- steps skipped by content hash


def test_a_step_runs_once_for_the_same_inputs_and_refuses_others(tmp_path: Path, capsys) -> None:
    runner = _runner(_config(tmp_path), 4)
    calls = []

    def run(folder: Path) -> tuple[list[str], dict]:
        calls.append(folder)
        (folder / "out.txt").write_text(f"run {len(calls)}")
        return ["out.txt"], {"summary": "made"}

    first = runner.step("make", "round1/make", {"x": 1, "policy": "abc"}, run)
    again = runner.step("make", "round1/make", {"x": 1, "policy": "abc"}, run)
    assert len(calls) == 1 and again == first
    assert "done already (round1/make, same inputs); made" in capsys.readouterr().out
    with pytest.raises(UserValueError, match=r"round1/make was written from other inputs \(they differ in: policy\)"):
        runner.step("make", "round1/make", {"x": 1, "policy": "abd"}, run)
    (runner.root / "round1" / "make" / "out.txt").unlink()  # an output gone: the step is done again
    runner.step("make", "round1/make", {"x": 1, "policy": "abc"}, run)
    assert len(calls) == 2
    manifest = json.loads((runner.root / "round1" / "make" / MANIFEST).read_text())
    assert manifest["inputs"] == {"x": 1, "policy": "abc"} and set(manifest["outputs"]) == {"out.txt"}


def test_a_step_killed_before_its_manifest_is_done_again(tmp_path: Path) -> None:
    runner = _runner(_config(tmp_path), 2)

    def killed(folder: Path) -> tuple[list[str], dict]:
        (folder / "out.txt").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.step("make", "round1/make", {"x": 1}, killed)
    assert not (runner.root / "round1" / "make" / MANIFEST).exists()

    def whole(folder: Path) -> tuple[list[str], dict]:
        (folder / "out.txt").write_text("whole")
        return ["out.txt"], {}

    assert runner.step("make", "round1/make", {"x": 1}, whole).outputs["out.txt"]["bytes"] == len("whole")


def test_the_content_digest_follows_the_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"\0\1")
    before = content_digest(folder)
    assert content_digest(folder) == before
    (folder / "weights.bin").write_bytes(b"\0\2")
    assert content_digest(folder) != before
    assert content_digest(folder / "config.json") != content_digest(folder / "weights.bin")


# ---------------------------------------------------------------- the run's folder


def test_a_run_continues_only_with_resume_and_the_same_config(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    open_run(cfg, resume=False)
    assert json.loads((tmp_path / "run" / RUN_MANIFEST).read_text())["config"]["rounds"] == 3
    with pytest.raises(UserValueError, match="holds an iterate run already; continue it with --resume auto"):
        open_run(cfg, resume=False)
    open_run(cfg, resume=True)
    open_run(_config(tmp_path, "rounds=4", "strategies=[dora]"), resume=True)  # more rounds, fewer chains: fine
    with pytest.raises(UserValueError) as err:
        open_run(_config(tmp_path, "align.lr=2e-4", "generate.n=3"), resume=True)
    assert str(err.value) == (
        f"the config differs from the one the run in {tmp_path / 'run'} was started with: align.lr (0.0001 then, "
        "0.0002 now); generate.n (2 then, 3 now). Resume with the same config, or set output_dir to a new folder")


def test_a_folder_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserValueError, match="is not empty and holds no iterate run"):
        open_run(_config(tmp_path), resume=True)


def test_resume_refused_on_a_changed_config_through_the_command(tmp_path: Path, capsys) -> None:
    open_run(_config(tmp_path), resume=False)
    code = main(["iterate", "--config", str(DEFAULT), "--resume", "auto", f"output_dir={tmp_path / 'run'}",
                 "align.reference=start"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.endswith("align.reference (\"previous\" then, \"start\" now). Resume with the same config, or set "
                        "output_dir to a new folder")


# ---------------------------------------------------------------- killed and resumed


SMALL = ["name=small", "rounds=3", "data.synth_prompts=16", "data.synth_eval_prompts=8", "start.sft_epochs=1",
         "generate.n=1", "generate.max_new_tokens=8", "calibrate.folds=2", "calibrate.min_examples=1",
         "align.epochs=1", "evaluate.max_new_tokens=8", "evaluate.n_boot=200"]


def _iterate(output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "dora_engine.cli", "iterate", "--config", str(DEFAULT), *extra,
               f"output_dir={output_dir}", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 600.0) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (polled every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit code {proc.returncode}) before {path} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.005)
    proc.kill()
    proc.communicate()


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_killed_twice_and_resumed_it_gives_the_uninterrupted_table(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _iterate(whole)  # alongside, on the other core
    run = _iterate(killed)
    _kill_when(run, killed / "round2" / "align-erm" / "metrics.jsonl")  # inside round 2's alignment loop
    assert not (killed / "round2" / "align-erm" / MANIFEST).exists()
    assert (killed / "round2" / "generate-erm" / MANIFEST).exists()
    run = _iterate(killed, "--resume", "auto")
    _kill_when(run, killed / "round3" / "generate-erm" / ".generations.jsonl.shards" / "run.json")  # round 3's sampling
    assert not (killed / "round3" / "generate-erm" / MANIFEST).exists()
    out = _finish(_iterate(killed, "--resume", "auto"))
    assert "round 2/3 · erm · generate: done already" in out and "round 3/3 · erm · generate -> " in out
    _finish(reference)
    assert (killed / "results.md").read_text() == (whole / "results.md").read_text()
    assert json.loads((killed / "results.json").read_text()) == json.loads((whole / "results.json").read_text())
    assert (killed / "iterate.png").stat().st_size > 0
    sources = {r.source for rec in read_records(killed / "round3" / "data-dora" / "train.jsonl") for r in rec.responses}
    assert sources == {"golden", "verbose", "off_topic", "repetitive", "small-round3"}
    trained = yaml.safe_load((killed / "round3" / "align-dora" / "final" / "dora_training.yaml").read_text())
    assert trained["model"]["path"] == str(killed / "round2" / "align-dora" / "final")
    assert trained["model"]["reference"] is None  # the previous round's policy, itself


# ---------------------------------------------------------------- benchmarks/bench_iterate.py


@pytest.fixture
def bench():
    return load_benchmark("bench_iterate")


def test_the_bench_pairs_dora_and_erm_per_seed_and_iteration(bench) -> None:
    seeds = [{"seed": s, "seconds": 1.0, "prompts": 8,
              "reward": {"erm": [1.0, 1.0 + s, 1.0], "dora": [1.0, 1.5 + s, 1.2]},
              "win_rate": {"erm": [0.1, 0.2, 0.3], "dora": [0.1, 0.2, 0.4]}} for s in (0, 1, 2)]
    summary = bench.summarise(seeds, ["erm", "dora"], n_boot=200)
    assert [c["mean"] for c in summary["reward_dora_minus_erm"]] == pytest.approx([0.0, 0.5, 0.2])
    assert summary["reward"]["erm"][1]["mean"] == pytest.approx(2.0) and summary["seeds"] == [0, 1, 2]
    table = bench.markdown(summary, seeds, "Reported")
    assert "| 1 | +0.500 | +0.500 | +0.500 |" in table and "| 2 | +0.200 | +0.200 | +0.200 |" in table
    assert "| dora − erm (paired) | – | **+0.500 [+0.500, +0.500]** | **+0.200 [+0.200, +0.200]** |" in table
    overrides = bench.seed_overrides(12, Path("/w/seed12"), bench.BENCH, ["align.lr=2e-4"])
    cfg = load_iterate_config(DEFAULT, [*overrides[:-1], "output_dir=/tmp/unused"])
    assert (cfg.seed, cfg.data.synth_seed, cfg.run_name, cfg.align.lr) == (12, 12, "seed12", 2e-4)
