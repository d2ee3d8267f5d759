"""The bag-of-words classifiers: TF-IDF n-grams of the response (``--backbone tfidf``), and with prompt × response
word pairs (``--backbone tfidf-pair``), + logistic regression (docs/design.md section 4.5).

Features: three TF-IDF blocks of the response, each with sublinear tf, idf and L2-normalised rows: word 1-2
grams and character 2-5 grams (``char``, across word boundaries) of the lower-cased text, and word 1-2 grams
of its opening and closing tokens (``edges``: ``textshape.edge_text``); terms in at least 2 training
responses, at most ``MAX_FEATURES`` per block. The character block carries punctuation, markdown marks,
spacing and word forms that the word block drops. Each block's columns are then scaled by their
class-ratio weight and its rows L2-normalised again (``ratio_weights``: a term frequent in one class and rare
in the others counts more, one common to all counts less; the weights come from the training responses and
are saved with the model). Last come the ``textshape.shape_counts`` (length and markdown), standardised
with the training responses' mean and standard deviation. Every choice here (the blocks, the weights
``Block.weight`` and ``SHAPE_WEIGHT`` against the shared L2 penalty, ``C``) was made on AlpacaEval pairs:
benchmarks/RESULTS.md.
``tfidf`` does not read the prompt: within a prompt it is the same for every response, across prompts it is
topic, not source. ``tfidf-pair`` (prompt-aware) appends the ``wordpairs`` features, which relate the response's
words to the prompt's (an answer to another question):

    x = [w_word ⊙ tfidf_word(y), w_char ⊙ tfidf_char(y), 0.5 · w_edges ⊙ tfidf_edges(y),
         0.1 · standardised shape_counts(y)]           (each w ⊙ tfidf block re-normalised)      (tfidf)
    x = [the same, 2 · pairs(x, y), overlap(x, y)]                                              (tfidf-pair)

The model is a multinomial (binary: plain) logistic regression with an L2 penalty ``C``. Its
probabilities are calibrated by the calibration itself, on out-of-fold scores (``pipeline``).

Everything is saved as plain data (``bow.json``: the vocabularies; ``bow.npz``: idf, the class-ratio weights,
the shape counts' mean and scale, the hashed-pair columns seen in training and the model's weights), never as
a pickle; ``predict`` recomputes TF-IDF from those exactly as scikit-learn's ``TfidfVectorizer`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dora_engine.calibration.textshape import edge_text, shape_counts

META_FILE = "bow.json"
ARRAYS_FILE = "bow.npz"
FORMAT = "tfidf-word12-char25-edges12-ratio+shape-lr-c16/4"
"""What a saved bag-of-words classifier is; part of its identity (a change retrains)."""
PAIR_FORMAT = "tfidf-word12-char25-edges12-ratio+shape+wordpairs-w2-p32-r64+overlap-lr-c16/3"
"""The same for the prompt-aware classifier (``tfidf-pair``)."""


@dataclass(frozen=True)
class Block:
    """One TF-IDF block: scikit-learn's ``analyzer`` and ``ngrams`` over the response (``edges``: over its
    ``edge_text``), ``weight`` times its class-ratio-weighted rows in the features."""

    analyzer: str
    ngrams: tuple[int, int]
    weight: float = 1.0
    edges: bool = False

    def options(self) -> dict[str, Any]:
        """Keyword arguments of scikit-learn's vectorizers for this block."""
        if self.edges:  # edge_text is already tokenised, lower-cased and tagged
            return {"analyzer": "word", "ngram_range": self.ngrams, "token_pattern": r"\S+", "lowercase": False}
        return {"analyzer": self.analyzer, "ngram_range": self.ngrams}

    def texts(self, responses: Sequence[str]) -> list[str]:
        return [edge_text(t) for t in responses] if self.edges else list(responses)


BLOCKS = {"word": Block("word", (1, 2)), "char": Block("char", (2, 5)),
          "edges": Block("word", (1, 2), weight=0.5, edges=True)}
SHAPE_WEIGHT = 0.1
MIN_DF = 2
MAX_FEATURES = 200_000
C = 16.0


def _tfidf(counts, idf: np.ndarray):
    """scikit-learn's TF-IDF of term counts: sublinear tf (1 + log), times idf, rows L2-normalised."""
    from sklearn.preprocessing import normalize

    counts = counts.tocsr(copy=True)
    counts.data = 1.0 + np.log(counts.data)
    return normalize(counts.multiply(idf[None, :]).tocsr(), norm="l2")


def tfidf_blocks(texts: Sequence[str], vocabularies: dict[str, dict[str, int]], idfs: dict[str, np.ndarray]) -> list:
    """The plain TF-IDF of each block of ``BLOCKS`` (sparse, rows: ``texts``), as scikit-learn computes it."""
    from sklearn.feature_extraction.text import CountVectorizer

    return [_tfidf(CountVectorizer(**block.options(), vocabulary=vocabularies[name], dtype=np.float64)
                   .transform(block.texts(texts)), idfs[name]) for name, block in BLOCKS.items()]


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


def _features(texts: Sequence[str], vocabularies: dict[str, dict[str, int]], a: dict[str, np.ndarray],
              prompts: Sequence[str] | None = None, pairs=None):
    """The classifier's features of ``texts`` from the saved arrays ``a`` (``idf_*``, ``weight_*``,
    ``shape_mean``, ``shape_scale``; ``pair_columns`` with ``prompts``): the weighted TF-IDF blocks, the
    standardised shape counts and, with ``prompts``, the ``wordpairs`` features (``pairs``: their hashed pairs
    when already computed)."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.preprocessing import normalize

    plain = tfidf_blocks(texts, vocabularies, {name: a[f"idf_{name}"] for name in BLOCKS})
    blocks = [block.weight * normalize(x.multiply(a[f"weight_{name}"][None, :]).tocsr(), norm="l2")
              for (name, block), x in zip(BLOCKS.items(), plain, strict=True)]
    blocks.append(csr_matrix(SHAPE_WEIGHT * (shape_counts(texts) - a["shape_mean"]) / a["shape_scale"]))
    if prompts is not None:
        from dora_engine.calibration import wordpairs

        blocks.append(wordpairs.features(prompts, texts, a["pair_columns"], pairs))
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
    vocabularies, a = {}, {}
    for name, block in BLOCKS.items():
        vectorizer = TfidfVectorizer(**block.options(), min_df=min(MIN_DF, len(texts)), sublinear_tf=True,
                                     max_features=MAX_FEATURES, dtype=np.float64)
        vectorizer.fit(block.texts(texts))
        vocabularies[name] = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
        a[f"idf_{name}"] = vectorizer.idf_.astype(np.float64)
    plain = tfidf_blocks(texts, vocabularies, {name: a[f"idf_{name}"] for name in BLOCKS})
    for name, x in zip(BLOCKS, plain, strict=True):
        a[f"weight_{name}"] = ratio_weights(x, labels, num_labels)
    counts = shape_counts(texts)
    a["shape_mean"], a["shape_scale"] = counts.mean(axis=0), counts.std(axis=0)
    a["shape_scale"][a["shape_scale"] == 0] = 1.0
    pairs = None
    if prompts is not None:
        from dora_engine.calibration import wordpairs

        prompts = list(prompts)
        pairs = wordpairs.hashed_pairs(prompts, texts)
        a["pair_columns"] = wordpairs.seen_columns(pairs)
    x = _features(texts, vocabularies, a, prompts, pairs)

    fitted = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(x, labels)
    coef, intercept = linear_head(fitted, num_labels)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT if prompts is None else PAIR_FORMAT, "num_labels": num_labels,
            "vocabularies": vocabularies}
    (folder / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    with open(folder / ARRAYS_FILE, "wb") as handle:
        np.savez_compressed(handle, **a, coef=coef, intercept=intercept)


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
    if meta["format"] == PAIR_FORMAT and prompts is None:
        raise ValueError(f"{folder} holds a prompt-aware bag-of-words classifier: pass the prompts")
    x = _features(list(texts), meta["vocabularies"], a, list(prompts) if meta["format"] == PAIR_FORMAT else None)
    logits = np.asarray(x @ a["coef"].T) + a["intercept"]
    return softmax(logits)
