"""augment and score with tiny randomly-initialised models on CPU: shapes, resume, bad input."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest

from dora_engine.cli import main as cli_main
from dora_engine.data.augment import augment_file, augment_records
from dora_engine.data.schema import read_records, write_records
from dora_engine.data.score import RewardModel, score_file, score_records
from dora_engine.data.synth import build_synth_tokenizer, synth_records
from dora_engine.generation import (
    AUGMENTATION_SAMPLING,
    Sampling,
    TransformersGenerator,
    adds_special_tokens,
    render_prompt,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_llama_config(tok, **extra):
    return transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = build_synth_tokenizer(root / "tok")
    torch.manual_seed(0)
    paths = {}
    for name, cls, extra in [
        ("tiny-lm", transformers.LlamaForCausalLM, {}),
        ("tiny-rm", transformers.LlamaForSequenceClassification, {"num_labels": 1}),
        ("tiny-rm3", transformers.LlamaForSequenceClassification, {"num_labels": 3}),
    ]:
        cls(_tiny_llama_config(tok, **extra)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "in.jsonl"
    write_records(path, synth_records(10, k=2, seed=0))
    return path


SHORT = replace(AUGMENTATION_SAMPLING, max_new_tokens=6)


def test_augment_adds_n_responses_with_the_model_source(models, dataset, tmp_path):
    out = augment_file(dataset, tmp_path / "out.jsonl", models["tiny-lm"], device="cpu", n=3, sampling=SHORT,
                       batch_size=4, shard_size=4)
    before = read_records(dataset)
    assert [r.to_dict() for r in read_records(tmp_path / "out.jsonl")] == [r.to_dict() for r in out]
    for old, new in zip(before, out, strict=True):
        assert new.num_responses == old.num_responses + 3
        assert [r.to_dict() for r in new.responses[:2]] == [r.to_dict() for r in old.responses]
        assert [r.source for r in new.responses[2:]] == ["tiny-lm"] * 3
        assert all(r.score is None for r in new.responses[2:])
        assert new.meta["generation"]["tiny-lm"]["temperature"] == 0.8
    assert any(r.text for rec in out for r in rec.responses[2:])
    assert not (tmp_path / ".out.jsonl.shards").exists()
    # seeds follow the records, so in memory (one shard, another batch size) == sharded
    mem = augment_records(before, models["tiny-lm"], device="cpu", n=3, sampling=SHORT, batch_size=3)
    assert [r.to_dict() for r in mem] == [r.to_dict() for r in out]
    other_seed = augment_records(before, models["tiny-lm"], device="cpu", n=3, sampling=SHORT, batch_size=4, seed=1)
    assert [r.to_dict() for r in other_seed] != [r.to_dict() for r in out]


def test_augment_resume_after_kill_equals_uninterrupted(models, dataset, tmp_path, monkeypatch):
    kwargs = {"n": 2, "sampling": SHORT, "batch_size": 3, "shard_size": 3}
    reference = augment_file(dataset, tmp_path / "ref.jsonl", models["tiny-lm"], device="cpu", **kwargs)

    calls = {"n": 0}
    original = TransformersGenerator.generate

    def dies_after_two_shards(self, prompts, n, seeds):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, prompts, n, seeds)

    monkeypatch.setattr(TransformersGenerator, "generate", dies_after_two_shards)
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        augment_file(dataset, out, models["tiny-lm"], device="cpu", **kwargs)
    assert not out.exists()
    assert len(list((tmp_path / ".out.jsonl.shards").glob("shard-*.jsonl"))) == 2
    monkeypatch.setattr(TransformersGenerator, "generate", original)
    calls["resumed"] = 0

    def counting(self, prompts, n, seeds):
        calls["resumed"] += len(prompts)
        return original(self, prompts, n, seeds)

    monkeypatch.setattr(TransformersGenerator, "generate", counting)
    resumed = augment_file(dataset, out, models["tiny-lm"], device="cpu", **kwargs)
    assert calls["resumed"] == 10 - 6  # only the unfinished prompts were generated again
    assert [r.to_dict() for r in resumed] == [r.to_dict() for r in reference]
    assert out.read_text() == (tmp_path / "ref.jsonl").read_text()


def test_resume_refuses_a_different_run(models, dataset, tmp_path, monkeypatch):
    def boom(self, prompts, n, seeds):
        raise RuntimeError("stop")

    monkeypatch.setattr(TransformersGenerator, "generate", boom)
    with pytest.raises(RuntimeError):
        augment_file(dataset, tmp_path / "o.jsonl", models["tiny-lm"], device="cpu", n=1, sampling=SHORT)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"different run \(differs in \['n'\]\)"):
        augment_file(dataset, tmp_path / "o.jsonl", models["tiny-lm"], device="cpu", n=2, sampling=SHORT)
    out = augment_file(dataset, tmp_path / "o.jsonl", models["tiny-lm"], device="cpu", n=2, sampling=SHORT,
                       restart=True)
    assert all(r.num_responses == 4 for r in out)


def test_score_fills_every_score_with_the_reward_logit(models, dataset, tmp_path):
    records = read_records(dataset)
    scored = score_records(records, models["tiny-rm"], device="cpu", batch_size=3)
    # independent: score each pair alone through the model
    tok = transformers.AutoTokenizer.from_pretrained(models["tiny-rm"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(models["tiny-rm"]).eval()
    for rec in scored[:3]:
        for r in rec.responses:
            enc = tok(rec.prompt, r.text, return_tensors="pt")
            with torch.no_grad():
                expected = model(**enc).logits[0, 0].item()
            assert r.score == pytest.approx(expected, abs=1e-4)
    # keep_existing keeps the synth oracle scores and scores only what is missing
    records[0].responses[1].score = None
    kept = score_records(records, models["tiny-rm"], device="cpu", keep_existing=True)
    assert kept[0].responses[0].score == records[0].responses[0].score
    assert kept[0].responses[1].score == pytest.approx(scored[0].responses[1].score, abs=1e-4)
    assert [r.to_dict() for r in kept[1:]] == [r.to_dict() for r in records[1:]]
    # fresh scores over corrupted ones clear the corruption mark; kept scores keep it
    records[0].meta["corrupted"] = records[1].meta["corrupted"] = True
    marked = score_records(records[:2], models["tiny-rm"], device="cpu", keep_existing=True)
    assert [r.meta["corrupted"] for r in marked] == [False, True]


def test_score_truncates_from_the_left(models):
    rm = RewardModel(models["tiny-rm"], max_length=8, device="cpu")
    long_prompt = "How do I make tea? " + "Boil fresh water. " * 20
    enc = rm._encode([(long_prompt, "pour the tea")])
    assert enc["input_ids"].shape[1] == 8
    assert rm.tokenizer.decode(enc["input_ids"][0]).endswith("pour the tea")
    assert len(rm.score([(long_prompt, "pour the tea " * 30)])) == 1


def test_score_resume_after_kill_equals_uninterrupted(models, dataset, tmp_path, monkeypatch):
    reference = score_file(dataset, tmp_path / "ref.jsonl", models["tiny-rm"], device="cpu", batch_size=4, shard_size=4)
    original = RewardModel.score
    calls = {"n": 0}

    def dies_on_second_shard(self, pairs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, pairs)

    monkeypatch.setattr(RewardModel, "score", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        score_file(dataset, tmp_path / "out.jsonl", models["tiny-rm"], device="cpu", batch_size=4, shard_size=4)
    monkeypatch.setattr(RewardModel, "score", original)
    resumed = score_file(dataset, tmp_path / "out.jsonl", models["tiny-rm"], device="cpu", batch_size=4, shard_size=4)
    assert [r.to_dict() for r in resumed] == [r.to_dict() for r in reference]


def test_oracle_scoring_matches_oracle_reward(dataset, tmp_path):
    from dora_engine.data.score import ORACLE
    from dora_engine.data.synth import oracle_reward

    records = read_records(dataset)
    for rec in records:
        for r in rec.responses:
            r.score = None
    assert cli_main(["data", "score", str(dataset), "--out", str(tmp_path / "o.jsonl"), "--oracle"]) == 0
    rescored = score_records(records, ORACLE)
    assert [r.to_dict() for r in read_records(tmp_path / "o.jsonl")] == [r.to_dict() for r in read_records(dataset)]
    for rec in rescored:
        assert [r.score for r in rec.responses] == [oracle_reward(rec.prompt, r.text) for r in rec.responses]


def test_reward_model_with_more_than_one_output_is_refused(models):
    with pytest.raises(ValueError, match="has 3 outputs.*exactly one logit"):
        RewardModel(models["tiny-rm3"], device="cpu")


def test_vllm_requested_but_missing(models, dataset, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match="backend 'vllm' was requested but vllm cannot be imported"):
        augment_file(dataset, tmp_path / "o.jsonl", models["tiny-lm"], device="cpu", backend="vllm")


def test_bad_sampling_and_n(models, dataset, tmp_path):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        augment_file(dataset, tmp_path / "o.jsonl", models["tiny-lm"], device="cpu",
                     sampling=replace(AUGMENTATION_SAMPLING, temperature=0))
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=1.5)
    with pytest.raises(ValueError, match="n must be"):
        augment_file(dataset, tmp_path / "o.jsonl", models["tiny-lm"], device="cpu", n=0)
    with pytest.raises(ValueError, match="unknown backend"):
        augment_file(dataset, tmp_path / "o.jsonl", models["tiny-lm"], device="cpu", backend="onnx")


def test_chat_template_is_used_when_present(models):
    tok = transformers.AutoTokenizer.from_pretrained(models["tiny-lm"])
    assert render_prompt(tok, "How do I make tea?") == "How do I make tea?" and adds_special_tokens(tok)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    )
    assert render_prompt(tok, [{"role": "user", "content": "make tea"}]) == "<s>make tea</s><s>"
    assert not adds_special_tokens(tok)  # the template already wrote them


def test_cli_augment_then_score(models, dataset, tmp_path):
    aug, scored = tmp_path / "aug.jsonl", tmp_path / "scored.jsonl"
    assert cli_main(["data", "augment", str(dataset), "--out", str(aug), "--model", models["tiny-lm"], "--n", "1",
                         "--max-new-tokens", "4", "--shard-size", "4", "--device", "cpu"]) == 0
    assert cli_main(["data", "score", str(aug), "--out", str(scored), "--model", models["tiny-rm"],
                         "--device", "cpu"]) == 0
    records = read_records(scored)
    assert len(records) == 10 and all(r.num_responses == 3 and r.has_scores for r in records)


def test_augment_survives_sigkill_and_resumes_exactly(models, tmp_path):
    """A real kill (SIGKILL of the CLI process) mid-run, then a resume, equals an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    dataset = tmp_path / "in.jsonl"
    write_records(dataset, synth_records(16, k=2, seed=1))
    argv = [str(dataset), "--out", str(tmp_path / "out.jsonl"), "--model", models["tiny-lm"], "--n", "2",
            "--max-new-tokens", "16", "--batch-size", "2", "--shard-size", "2", "--device", "cpu"]
    tests_dir = Path(__file__).resolve().parent
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from dora_engine.cli import main; "
            "sys.exit(main(['data', 'augment', *sys.argv[3:]]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tests_dir), str(tests_dir.parent), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / ".out.jsonl.shards"
    deadline = time.monotonic() + 120
    while not list(shards.glob("shard-*.jsonl")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out.jsonl").exists(), "the run finished before it could be killed"
    finished = len(list(shards.glob("shard-*.jsonl")))
    assert 1 <= finished < 8
    assert cli_main(["data", "augment", *argv]) == 0
    reference = augment_file(dataset, tmp_path / "ref.jsonl", models["tiny-lm"], device="cpu", n=2,
                             sampling=replace(AUGMENTATION_SAMPLING, max_new_tokens=16), batch_size=2, shard_size=2)
    assert [r.to_dict() for r in read_records(tmp_path / "out.jsonl")] == [r.to_dict() for r in reference]


def test_resume_says_how_much_was_done_and_a_refusal_names_restart_before_loading(models, dataset, tmp_path,
                                                                                  monkeypatch, capsys):
    from dora_engine.data import augment, score

    out = tmp_path / "o.jsonl"
    argv = ["data", "score", str(dataset), "--out", str(out), "--oracle", "--shard-size", "3"]
    real = score._oracle_scores
    calls = []

    def dies_on_third_shard(pairs):
        calls.append(len(pairs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(pairs)

    monkeypatch.setattr(score, "_oracle_scores", dies_on_third_shard)
    assert cli_main(argv) == 130
    monkeypatch.setattr(score, "_oracle_scores", real)
    capsys.readouterr()
    # Another scorer: refused before it loads (this model does not exist, so loading it would fail otherwise).
    assert cli_main([*argv[:-3], "--model", str(tmp_path / "no-such-model"), "--shard-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 finished shard(s) of a different run (differs in ['model'])" in err, err
    assert "pass --restart to discard them" in err and err.count("\n") == 1
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert f"score: resuming: 2 of 4 shards (6 of 10 prompts) already done in {tmp_path / '.o.jsonl.shards'}" in err
    assert [r.to_dict() for r in read_records(out)] == [r.to_dict() for r in score_records(read_records(dataset),
                                                                                           score.ORACLE)]

    # augment: the refusal comes before the model loads; --restart says what it discards
    aug = ["data", "augment", str(dataset), "--out", str(tmp_path / "a.jsonl"), "--model", models["tiny-lm"],
           "--max-new-tokens", "2", "--shard-size", "5", "--device", "cpu"]

    def interrupted(self, prompts, n, seeds):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TransformersGenerator, "generate", interrupted)
        assert cli_main([*aug, "--n", "1"]) == 130

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the work directory was checked")

    with monkeypatch.context() as patch:
        patch.setattr(augment, "make_generator", no_loading)
        assert cli_main([*aug, "--n", "2"]) == 2
    assert "differs in ['n']); rerun with the same input and settings to resume, or pass --restart" in (
        capsys.readouterr().err)
    assert cli_main([*aug, "--n", "2", "--restart"]) == 0
    assert "augment: --restart: discarding 0 finished shard(s)" in capsys.readouterr().err
    assert all(r.num_responses == 4 for r in read_records(tmp_path / "a.jsonl"))
