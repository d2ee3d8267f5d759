"""The bag-of-words classifiers: TF-IDF n-grams of the response (``--backbone tfidf``), and with prompt × response
word pairs (``--backbone tfidf-pair``), + logistic regression (docs/design.md section 4.5).

Features: three TF-IDF blocks of the response, each with sublinear tf, idf and L2-normalised rows: word 1-2
grams and character 2-5 grams (``char``, across word boundaries) of the lower-cased text, and word 1-2 grams
of its opening and closing tokens (``edges``: ``textshape.edge_text``); terms in at least 2 training
responses, at most ``MAX_FEATURES`` per block (none at all: the block is left out). The character block
carries punctuation, markdown marks, where spaces fall (runs of white space count as one) and word forms
that the word block drops. Each block's columns are then scaled by their
class-ratio weight and its rows L2-normalised again (``ratio_weights``: a term frequent in one class and rare
in the others counts more, one common to all counts less; the weights come from the training responses and
are saved with the model). Last come the ``textshape.shape_counts`` (length and markdown), standardised
with the training responses' mean and standard deviation. Every choice here (the blocks, the weights
``Block.weight`` and ``SHAPE_WEIGHT`` against the shared L2 penalty, ``C``) was made on AlpacaEval pairs:
benchmarks/RESULTS.md.
``tfidf`` does not read the prompt: it sees how a response is written, not whether it answers the question.
``tfidf-pair`` (prompt-aware) appends the ``wordpairs`` features, which relate the response's
words to the prompt's (an answer to another question):

    x = [n(w_word ⊙ tfidf_word(y)), n(w_char ⊙ tfidf_char(y)), 0.5 · n(w_edges ⊙ tfidf_edges(y)),
         0.1 · (shape_counts(y) − mean) / sd]                              (n: row L2-normalised)   (tfidf)
    x = [the same, 2 · pairs(x, y), overlap(x, y)]                                                 (tfidf-pair)

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
from typing import TYPE_CHECKING, Any

import numpy as np

from dora_engine.calibration import wordpairs
from dora_engine.calibration.textshape import EDGE_TOKENS, SHAPE_COUNTS, edge_text, shape_counts

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix

META_FILE = "bow.json"
ARRAYS_FILE = "bow.npz"


@dataclass(frozen=True)
class Block:
    """One TF-IDF block: scikit-learn's ``analyzer`` with ``ngrams`` over the response, or over its
    ``edge_text`` (``edges``: already tokenised, lower-cased and tagged, so split on spaces only); its
    re-normalised, class-ratio-weighted rows count ``weight`` times in the features."""

    analyzer: str
    ngrams: tuple[int, int]
    weight: float = 1.0
    edges: bool = False

    def options(self) -> dict[str, Any]:
        """Keyword arguments of scikit-learn's vectorizers for this block."""
        split_on_spaces = {"token_pattern": r"\S+", "lowercase": False} if self.edges else {}
        return {"analyzer": self.analyzer, "ngram_range": self.ngrams, **split_on_spaces}

    def texts(self, responses: Sequence[str]) -> list[str]:
        """What the block's vectorizer reads for each response."""
        return [edge_text(t) for t in responses] if self.edges else list(responses)


BLOCKS = {"word": Block("word", (1, 2)), "char": Block("char", (2, 5)),
          "edges": Block("word", (1, 2), weight=0.5, edges=True)}
SHAPE_WEIGHT = 0.1
MIN_DF = 2
MAX_FEATURES = 200_000
C = 16.0
_NO_TERMS = ("no terms remain", "empty vocabulary")
"""scikit-learn's messages for a block without a term in ``MIN_DF`` training responses (tiny data)."""


def _describe() -> str:
    blocks = "-".join(f"{name}{b.ngrams[0]}{b.ngrams[1]}x{b.weight:g}" for name, b in BLOCKS.items())
    return (f"tfidf-{blocks}-edgetokens{EDGE_TOKENS}-df{MIN_DF}-max{MAX_FEATURES}-ratio"
            f"+shape{len(SHAPE_COUNTS)}x{SHAPE_WEIGHT:g}-lr-c{C:g}")


FORMAT = f"{_describe()}/5"
"""What a saved bag-of-words classifier is: its settings, and a version bumped when the code changes what
they mean; part of its identity (a change retrains)."""
PAIR_FORMAT = f"{_describe()}+{wordpairs.DESCRIPTION}/4"
"""The same for the prompt-aware classifier (``tfidf-pair``)."""


def saved_format(prompt_aware: bool) -> str:
    """The format of a classifier trained with (``tfidf-pair``) or without the prompts (``tfidf``)."""
    return PAIR_FORMAT if prompt_aware else FORMAT


def _tfidf(counts: csr_matrix, idf: np.ndarray) -> csr_matrix:
    """scikit-learn's TF-IDF of term counts: sublinear tf (1 + log), times idf, rows L2-normalised."""
    from sklearn.preprocessing import normalize

    counts = counts.tocsr(copy=True)
    counts.data = 1.0 + np.log(counts.data)
    return normalize(counts.multiply(idf[None, :]).tocsr(), norm="l2")


def tfidf_blocks(texts: Sequence[str], vocabularies: dict[str, dict[str, int]],
                 idfs: dict[str, np.ndarray]) -> list[csr_matrix]:
    """The plain TF-IDF of each block of ``BLOCKS`` (rows: ``texts``), as scikit-learn computes it; a block
    without terms has no columns."""
    from scipy.sparse import csr_matrix
    from sklearn.feature_extraction.text import CountVectorizer

    blocks = []
    for name, block in BLOCKS.items():
        if not vocabularies[name]:
            blocks.append(csr_matrix((len(texts), 0)))
            continue
        vectorizer = CountVectorizer(**block.options(), vocabulary=vocabularies[name], dtype=np.float64)
        blocks.append(_tfidf(vectorizer.transform(block.texts(texts)), idfs[name]))
    return blocks


def ratio_weights(tfidf: csr_matrix, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Class-ratio weight of each column of a TF-IDF block (rows: training responses): for each class c,
    p_c = (Σ of the column over c's rows + 1) and q_c = (the same over the other rows + 1), each normalised to
    sum 1 over the columns; the weight is max_c |log(p_c / q_c)| (two classes: the absolute log-count ratio)."""
    labels = np.asarray(labels)
    totals = np.vstack([np.asarray(tfidf[labels == c].sum(axis=0)).ravel() for c in range(num_labels)])
    weight = np.zeros(tfidf.shape[1])
    for c in range(num_labels):
        p = totals[c] + 1.0
        q = totals.sum(axis=0) - totals[c] + 1.0
        weight = np.maximum(weight, np.abs(np.log(p / p.sum()) - np.log(q / q.sum())))
    return weight


def _features(texts: Sequence[str], vocabularies: dict[str, dict[str, int]], arrays: dict[str, np.ndarray],
              prompts: Sequence[str] | None = None, *, plain: list[csr_matrix] | None = None,
              counts: np.ndarray | None = None, pairs: csr_matrix | None = None) -> csr_matrix:
    """The classifier's features of ``texts`` from its saved ``arrays`` (``idf_*``, ``weight_*``,
    ``shape_mean``, ``shape_scale``; ``pair_columns`` with ``prompts``): the weighted TF-IDF blocks, the
    standardised shape counts and, with ``prompts``, the ``wordpairs`` features. ``plain`` (the
    ``tfidf_blocks``), ``counts`` (the ``shape_counts``) and ``pairs`` (the hashed word pairs): when already
    computed."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.preprocessing import normalize

    if plain is None:
        plain = tfidf_blocks(texts, vocabularies, {name: arrays[f"idf_{name}"] for name in BLOCKS})
    if counts is None:
        counts = shape_counts(texts)
    blocks = [block.weight * normalize(x.multiply(arrays[f"weight_{name}"][None, :]).tocsr(), norm="l2")
              for (name, block), x in zip(BLOCKS.items(), plain, strict=True) if x.shape[1]]
    blocks.append(csr_matrix(SHAPE_WEIGHT * (counts - arrays["shape_mean"]) / arrays["shape_scale"]))
    if prompts is not None:
        blocks.append(wordpairs.features(prompts, texts, arrays["pair_columns"], pairs))
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
    from scipy.sparse import csr_matrix
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, dtype=int)
    texts = list(texts)
    vocabularies: dict[str, dict[str, int]] = {}
    arrays: dict[str, np.ndarray] = {}
    plain = []
    for name, block in BLOCKS.items():
        vectorizer = TfidfVectorizer(**block.options(), min_df=min(MIN_DF, len(texts)), sublinear_tf=True,
                                     max_features=MAX_FEATURES, dtype=np.float64)
        try:
            plain.append(vectorizer.fit_transform(block.texts(texts)).tocsr())
        except ValueError as error:
            if not any(message in str(error) for message in _NO_TERMS):
                raise
            plain.append(csr_matrix((len(texts), 0)))
            vocabularies[name], arrays[f"idf_{name}"] = {}, np.empty(0)
        else:
            vocabularies[name] = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
            arrays[f"idf_{name}"] = vectorizer.idf_.astype(np.float64)
        arrays[f"weight_{name}"] = ratio_weights(plain[-1], labels, num_labels)
    counts = shape_counts(texts)
    arrays["shape_mean"], arrays["shape_scale"] = counts.mean(axis=0), counts.std(axis=0)
    arrays["shape_scale"][arrays["shape_scale"] < 1e-8] = 1.0  # a count the same in every response
    pairs = None
    if prompts is not None:
        prompts = list(prompts)
        pairs = wordpairs.hashed_pairs(prompts, texts)
        arrays["pair_columns"] = wordpairs.seen_columns(pairs)
    x = _features(texts, vocabularies, arrays, prompts, plain=plain, counts=counts, pairs=pairs)

    fitted = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(x, labels)
    coef, intercept = linear_head(fitted, num_labels)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": saved_format(prompts is not None), "num_labels": num_labels,
            "vocabularies": vocabularies}
    (folder / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    with open(folder / ARRAYS_FILE, "wb") as handle:
        np.savez_compressed(handle, **arrays, coef=coef, intercept=intercept)


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
    meta, arrays = load_saved(folder, "bag-of-words", (FORMAT, PAIR_FORMAT), META_FILE, ARRAYS_FILE)
    if not texts:
        return np.empty((0, meta["num_labels"]))
    if meta["format"] == PAIR_FORMAT and prompts is None:
        raise ValueError(f"{folder} holds a prompt-aware bag-of-words classifier: pass the prompts")
    x = _features(list(texts), meta["vocabularies"], arrays,
                  list(prompts) if meta["format"] == PAIR_FORMAT else None)
    logits = np.asarray(x @ arrays["coef"].T) + arrays["intercept"]
    return softmax(logits)
