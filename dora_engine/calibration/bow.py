"""The bag-of-words classifiers: TF-IDF n-grams of the response (``--backbone tfidf``), and with prompt × response
word pairs (``--backbone tfidf-pair``), + logistic regression (docs/design.md section 4.5).

Features: two TF-IDF blocks of the response text, each with sublinear tf, idf and L2-normalised rows:
word 1-2 grams and character 2-5 grams (``char``, across word boundaries), lower-cased, terms in at least
2 training responses, at most ``MAX_FEATURES`` per block. The character block carries punctuation,
markdown marks, spacing and word forms that the word block drops. Each block's columns are then scaled by
their class-ratio weight and its rows L2-normalised again (``ratio_weights``: a term frequent in one class
and rare in the others counts more, one common to all counts less; the weights come from the training
responses and are saved with the model). The character n-grams across word boundaries and the weights
were chosen on AlpacaEval pairs: benchmarks/RESULTS.md.
``tfidf`` does not read the prompt: within a prompt it is the same for every response, across prompts it is
topic, not source. ``tfidf-pair`` (prompt-aware) appends the ``wordpairs`` features, which relate the response's
words to the prompt's (an answer to another question):

    x = [w_word ⊙ tfidf_word(y), w_char ⊙ tfidf_char(y)]  (each block re-normalised)      (tfidf)
    x = [the same blocks, 2 · pairs(x, y), overlap(x, y)]                                   (tfidf-pair)

The model is a multinomial (binary: plain) logistic regression with an L2 penalty ``C``. Its
probabilities are calibrated by the calibration itself, on out-of-fold scores (``pipeline``).

Everything is saved as plain data (``bow.json``: the vocabularies; ``bow.npz``: idf, the class-ratio weights,
the hashed-pair columns seen in training and the model's weights), never as a pickle; ``predict`` recomputes
TF-IDF from those exactly as scikit-learn's ``TfidfVectorizer`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

META_FILE = "bow.json"
ARRAYS_FILE = "bow.npz"
FORMAT = "tfidf-word12-char25-ratio-lr-c16/3"
"""What a saved bag-of-words classifier is; part of its identity (a change retrains)."""
PAIR_FORMAT = "tfidf-word12-char25-ratio+wordpairs-w2-p32-r64+overlap-lr-c16/2"
"""The same for the prompt-aware classifier (``tfidf-pair``)."""

BLOCKS = {"word": (1, 2), "char": (2, 5)}
"""TF-IDF blocks: analyzer → n-gram range."""
MIN_DF = 2
MAX_FEATURES = 200_000
C = 16.0


def _counts(texts: Sequence[str], analyzer: str, vocabulary: dict[str, int]):
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(analyzer=analyzer, ngram_range=BLOCKS[analyzer], vocabulary=vocabulary,
                           dtype=np.float64).transform(texts)


def _tfidf(counts, idf: np.ndarray):
    """scikit-learn's TF-IDF of term counts: sublinear tf (1 + log), times idf, rows L2-normalised."""
    from sklearn.preprocessing import normalize

    counts = counts.tocsr(copy=True)
    counts.data = 1.0 + np.log(counts.data)
    return normalize(counts.multiply(idf[None, :]).tocsr(), norm="l2")


def ratio_weights(block, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Class-ratio weight of each column of a TF-IDF block (rows: training responses): for each class c,
    p_c = (Σ of the block over c's rows + 1) and q_c = (the same over the other rows + 1), each normalised to
    sum 1; the weight is max_c |log(p_c / q_c)| (two classes: the absolute log-count ratio)."""
    labels = np.asarray(labels)
    totals = np.vstack([np.asarray(block[labels == c].sum(axis=0)).ravel() for c in range(num_labels)])
    weight = np.zeros(block.shape[1])
    for c in range(num_labels):
        p = totals[c] + 1.0
        q = totals.sum(axis=0) - totals[c] + 1.0
        weight = np.maximum(weight, np.abs(np.log(p / p.sum()) - np.log(q / q.sum())))
    return weight


def _weighted(block, weight: np.ndarray):
    from sklearn.preprocessing import normalize

    return normalize(block.multiply(weight[None, :]).tocsr(), norm="l2")


def _features(texts: Sequence[str], vocabularies: dict[str, dict[str, int]], idfs: dict[str, np.ndarray],
              prompts: Sequence[str] | None = None, columns: np.ndarray | None = None, pairs=None,
              weights: dict[str, np.ndarray] | None = None):
    """The response's TF-IDF blocks, each scaled by its ``weights`` (``ratio_weights``) and re-normalised
    when given; with ``prompts`` and the hashed-pair ``columns``, then the ``wordpairs`` features (``pairs``:
    their hashed pairs when already computed)."""
    from scipy.sparse import hstack

    blocks = [_tfidf(_counts(texts, analyzer, vocabularies[analyzer]), idfs[analyzer]) for analyzer in BLOCKS]
    if weights is not None:
        blocks = [_weighted(block, weights[analyzer]) for block, analyzer in zip(blocks, BLOCKS, strict=True)]
    if prompts is not None:
        from dora_engine.calibration import wordpairs

        blocks.append(wordpairs.features(prompts, texts, columns, pairs))
    return hstack(blocks).tocsr()


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def linear_head(fitted, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef (C, F), intercept (C,)) of a fitted scikit-learn logistic regression, as softmax logits
    (a binary model's single row becomes the logits [0, z])."""
    if fitted.classes_.tolist() != list(range(num_labels)):
        raise ValueError(f"logistic regression: training labels {fitted.classes_.tolist()} are not "
                         f"0..{num_labels - 1}")
    if num_labels > 2:
        return fitted.coef_, fitted.intercept_
    return np.vstack([np.zeros_like(fitted.coef_[0]), fitted.coef_[0]]), np.array([0.0, fitted.intercept_[0]])


def train(texts: Sequence[str], labels: np.ndarray, num_labels: int, seed: int, output_dir: str | os.PathLike,
          prompts: Sequence[str] | None = None) -> None:
    """Fit TF-IDF + logistic regression on ``texts`` (responses) and save it to ``output_dir``; with
    ``prompts`` (one per response), the prompt-aware classifier (the word-pair features too)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, dtype=int)
    texts = list(texts)
    vocabularies, idfs = {}, {}
    for analyzer, ngrams in BLOCKS.items():
        vectorizer = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, min_df=min(MIN_DF, len(texts)),
                                     sublinear_tf=True, max_features=MAX_FEATURES, dtype=np.float64)
        vectorizer.fit(texts)
        vocabularies[analyzer] = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
        idfs[analyzer] = vectorizer.idf_.astype(np.float64)
    plain = _features(texts, vocabularies, idfs)
    weights, start = {}, 0
    for analyzer in BLOCKS:
        width = len(idfs[analyzer])
        weights[analyzer] = ratio_weights(plain[:, start : start + width], labels, num_labels)
        start += width
    extra: dict[str, np.ndarray] = {f"weight_{k}": v for k, v in weights.items()}
    if prompts is None:
        x = _features(texts, vocabularies, idfs, weights=weights)
    else:
        from dora_engine.calibration import wordpairs

        prompts = list(prompts)
        pairs = wordpairs.hashed_pairs(prompts, texts)
        extra["pair_columns"] = wordpairs.seen_columns(pairs)
        x = _features(texts, vocabularies, idfs, prompts, extra["pair_columns"], pairs, weights)

    fitted = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(x, labels)
    coef, intercept = linear_head(fitted, num_labels)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT if prompts is None else PAIR_FORMAT, "num_labels": num_labels,
            "vocabularies": vocabularies}
    (folder / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    with open(folder / ARRAYS_FILE, "wb") as handle:
        np.savez_compressed(handle, **{f"idf_{k}": v for k, v in idfs.items()}, **extra, coef=coef,
                            intercept=intercept)


def is_saved(folder: str | os.PathLike) -> bool:
    return Path(folder, META_FILE).is_file()


def load_saved(
    folder: str | os.PathLike, kind: str, versions: tuple[str, ...], meta_file: str, arrays_file: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, arrays) of a saved linear classifier of ``kind``, refusing a format not in ``versions``."""
    folder = Path(folder)
    meta: dict[str, Any] = json.loads((folder / meta_file).read_text(encoding="utf-8"))
    if meta.get("format") not in versions:
        readable = " or ".join(repr(v) for v in versions)
        raise ValueError(f"{folder} holds a {kind} classifier of format {meta.get('format')!r}, "
                         f"this version reads {readable}: fit it again")
    with np.load(folder / arrays_file) as saved:
        return meta, {k: saved[k] for k in saved.files}


def predict(folder: str | os.PathLike, texts: Sequence[str], prompts: Sequence[str] | None = None) -> np.ndarray:
    """Class probabilities (len(texts), num_labels) in float64; a prompt-aware classifier needs the
    ``prompts`` (one per text), the other ignores them."""
    meta, a = load_saved(folder, "bag-of-words", (FORMAT, PAIR_FORMAT), META_FILE, ARRAYS_FILE)
    if not texts:
        return np.empty((0, meta["num_labels"]))
    idfs = {k: a[f"idf_{k}"] for k in BLOCKS}
    weights = {k: a[f"weight_{k}"] for k in BLOCKS}
    if meta["format"] == PAIR_FORMAT:
        if prompts is None:
            raise ValueError(f"{folder} holds a prompt-aware bag-of-words classifier: pass the prompts")
        x = _features(list(texts), meta["vocabularies"], idfs, list(prompts), a["pair_columns"], weights=weights)
    else:
        x = _features(list(texts), meta["vocabularies"], idfs, weights=weights)
    logits = np.asarray(x @ a["coef"].T) + a["intercept"]
    return softmax(logits)
