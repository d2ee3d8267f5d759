"""The prompt-aware bag of words (``--backbone tfidf-pair``, docs/design.md section 4.5): it tells an answer to
another question apart out of fold where the response-only ``tfidf`` cannot, its saved classifiers score as
they were fitted, and its cache entries are its own."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dora_engine.calibration import ClassifierSettings, bow, classifier, fit, score, wordpairs
from dora_engine.calibration.pipeline import FOLD_META_KEY, PROBS_META_KEY, apply_combiner, load_calibration
from dora_engine.cli import main
from dora_engine.data.schema import read_records, write_records
from dora_engine.data.synth import synth_records

PAIR = "golden-vs-off_topic"


def off_topic_records(num_prompts: int = 128, seed: int = 0, split: str = "train"):
    """Synthetic prompts with one golden response and one golden-style answer about another task."""
    return synth_records(num_prompts=num_prompts, k=2, mix={"off_topic": 1.0}, seed=seed, split=split)


def test_tfidf_pair_tells_off_topic_apart_out_of_fold_where_tfidf_cannot(tmp_path):
    records = off_topic_records()
    auc = {}
    for backbone in ("tfidf", "tfidf-pair"):
        calibration = fit(records, target="golden", output_dir=tmp_path / backbone,
                          settings=ClassifierSettings(backbone=backbone, folds=3))
        assert list(calibration.classifiers) == [PAIR]
        auc[backbone] = calibration.classifiers[PAIR].metrics["roc_auc"]
    # the response alone is a well-formed golden-style answer either way: only its relation to the prompt tells
    assert auc["tfidf"] < 0.7, auc
    assert auc["tfidf-pair"] >= 0.9, auc


def test_quickstart_calibration_separates_golden_from_every_source(tmp_path):
    """launch/quickstart.sh's step 3 on another draw of its data: every classifier >= 0.9 out of fold."""
    records = synth_records(256, k=4, golden_fraction=0.5, split="train", seed=7)
    calibration = fit(records, target="golden", output_dir=tmp_path,
                      settings=ClassifierSettings(backbone="tfidf-pair", folds=5))
    auc = {name: c.metrics["roc_auc"] for name, c in calibration.classifiers.items()}
    assert set(auc) == {"golden-vs-off_topic", "golden-vs-repetitive", "golden-vs-verbose", "golden-vs-rest"}
    assert min(auc.values()) >= 0.9, auc


def test_word_pairs_by_hand():
    prompts, responses = ["How do I bake bread?"], ["First knead the dough. Then bake it."]
    assert wordpairs.content_words(prompts[0]) == ["bake", "bread"]
    assert wordpairs.content_words(responses[0]) == ["knead", "dough", "bake"]
    pairs = wordpairs.hashed_pairs(prompts, responses)
    assert pairs.nnz == 6 and set(pairs.data) == {1.0}  # 2 prompt words x 3 response words
    np.testing.assert_allclose(wordpairs.overlap(prompts, responses), [[1 / 2, 1 / 3]])
    x = wordpairs.features(prompts, responses, wordpairs.seen_columns(pairs)).toarray()[0]
    np.testing.assert_allclose(x[:-2], wordpairs.PAIR_WEIGHT / np.sqrt(6))
    unseen = wordpairs.features(["How do I plant a tree?"], responses, wordpairs.seen_columns(pairs)).toarray()[0]
    np.testing.assert_allclose(unseen, 0.0)  # no pair seen in training, no shared word


def test_saved_tfidf_pair_classifier_is_the_fitted_one(tmp_path):
    from sklearn.linear_model import LogisticRegression

    records = off_topic_records(48, seed=3)
    prompts = [r.prompt_text() for r in records for _ in r.responses]
    texts = [x.text for r in records for x in r.responses]
    labels = np.array([int(x.source == "golden") for r in records for x in r.responses])
    bow.train(texts[:60], labels[:60], 2, seed=0, output_dir=tmp_path, prompts=prompts[:60])
    meta = json.loads((tmp_path / bow.META_FILE).read_text())
    assert meta["format"] == bow.PAIR_FORMAT
    with np.load(tmp_path / bow.ARRAYS_FILE) as saved:
        a = {k: saved[k] for k in saved.files}
    x = bow._features(texts, meta["vocabularies"], a, prompts)
    reference = LogisticRegression(C=bow.C, max_iter=5000, random_state=0).fit(x[:60], labels[:60])
    np.testing.assert_allclose(bow.predict(tmp_path, texts[60:], prompts[60:]),
                               reference.predict_proba(x[60:]), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="pass the prompts"):
        bow.predict(tmp_path, texts[60:])


def test_tfidf_pair_round_trip_cache_and_apply(tmp_path, monkeypatch, capsys):
    data, run = tmp_path / "data.jsonl", tmp_path / "run"
    write_records(data, off_topic_records(64, seed=1))
    argv = ["calibrate", str(data), "--target", "golden", "--out", str(tmp_path / "out.jsonl"), "--folds", "2",
            "--output-dir", str(run)]
    assert main([*argv, "--backbone", "tfidf"]) == 0
    assert main([*argv, "--backbone", "tfidf-pair"]) == 0  # same data and folds: its own classifiers all the same
    report = json.loads((run / "report.json").read_text())
    assert report["settings"]["backbone"] == "tfidf-pair" and not report["classifiers"][0]["reused"]
    assert len(list((run / "classifiers").iterdir())) == 4  # 2 folds x {tfidf, tfidf-pair}
    first = read_records(tmp_path / "out.jsonl")

    moved = tmp_path / "moved"
    shutil.move(run, moved)  # a calibration folder reads its classifiers from beside calibration.json
    calibration = load_calibration(moved)
    assert calibration.settings.backbone == "tfidf-pair"
    fitted = calibration.classifiers[PAIR]
    for record in first:  # the saved classifiers give again the out-of-fold c computed when they were fitted
        fold = fitted.folds[record.meta[FOLD_META_KEY]]
        probs = classifier.predict(fold.paths[0], [classifier.Example(record.prompt_text(), r.text)
                                                   for r in record.responses], max_length=8, batch_size=4)
        c = apply_combiner(fold.combiner, [probs])[:, 1]
        np.testing.assert_allclose(record.meta[PROBS_META_KEY], c, rtol=1e-9)

    def no_training(*args, **kwargs):
        raise AssertionError("a classifier was trained again")

    monkeypatch.setattr(classifier, "train", no_training)
    capsys.readouterr()
    assert main(["calibrate", str(data), "--apply", str(moved), "--out", str(tmp_path / "applied.jsonl")]) == 0
    applied = read_records(tmp_path / "applied.jsonl")
    assert [r.h_tilde for r in applied] == pytest.approx([r.h_tilde for r in first], rel=1e-12)
    new = off_topic_records(16, seed=2, split="eval")  # prompts the classifiers never saw: every fold scores
    for record in score(new, calibration):
        assert record.meta[FOLD_META_KEY] is None and all(0 < c < 1 for c in record.meta[PROBS_META_KEY])
