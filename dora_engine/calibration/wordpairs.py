"""Prompt × response word-pair features: what the prompt-aware bag of words (``--backbone tfidf-pair``) adds to
the response's TF-IDF (docs/design.md section 4.5).

A response can be well formed and still answer another question (the synthetic ``off_topic`` source: a
golden-style answer about a different task). Nothing in the response alone tells it apart; its words have
to be related to the prompt's, and plain word overlap is not enough when a good answer does not repeat the
question ("How do I bake bread?" → "First knead the dough. ..."). So every pair of a prompt word and a
response word is a feature, and the logistic regression learns which response words go with which prompt
words (bread × dough: on topic; bread × hole: not).

Content words of a text: lower-cased tokens of two or more word characters (scikit-learn's default token
pattern) outside scikit-learn's English stop-word list, distinct, in order of first occurrence; the
prompt keeps its last ``MAX_PROMPT_WORDS`` (the turn being answered), the response its first
``MAX_RESPONSE_WORDS``. With P and R those sets for one (prompt, response):

    pairs(x, y)   = L2-normalised binary vector over hash("p r") for every p ∈ P, r ∈ R,
                    restricted to the hashed pairs seen in training (``columns``)
    overlap(x, y) = (|P ∩ R| / |P|, |P ∩ R| / |R|)    (0 for an empty set)

``features`` returns ``[PAIR_WEIGHT · pairs, overlap]``; the pair block is weighted up against the
response's TF-IDF blocks (the same L2 penalty then shrinks it less), without which the logistic regression
fits its training data on response n-grams and learns fewer pairs. The hash is scikit-learn's
``FeatureHasher`` (signed 32-bit MurmurHash3, seed 0; non-negative indices modulo ``HASH_FEATURES``), the
same on every platform, so a saved classifier keeps only its column indices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

HASH_FEATURES = 2**20
MAX_PROMPT_WORDS = 32
MAX_RESPONSE_WORDS = 64
PAIR_WEIGHT = 2.0

DESCRIPTION = (f"wordpairs-w{PAIR_WEIGHT:g}-p{MAX_PROMPT_WORDS}-r{MAX_RESPONSE_WORDS}-h{HASH_FEATURES}"
               "+overlap")
"""These features' settings, part of the prompt-aware classifier's saved format (``bow.PAIR_FORMAT``)."""

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def content_words(text: str) -> list[str]:
    """The distinct lower-cased content words of ``text`` in order of first occurrence."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return list(dict.fromkeys(w for w in _TOKEN.findall(text.lower()) if w not in ENGLISH_STOP_WORDS))


def _word_sets(prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    return [(content_words(p)[-MAX_PROMPT_WORDS:], content_words(r)[:MAX_RESPONSE_WORDS])
            for p, r in zip(prompts, responses, strict=True)]


def hashed_pairs(prompts: Sequence[str], responses: Sequence[str]):
    """(N, ``HASH_FEATURES``) CSR matrix with 1 at the hash of every (prompt word, response word) pair."""
    from sklearn.feature_extraction import FeatureHasher

    words = _word_sets(prompts, responses)
    hasher = FeatureHasher(n_features=HASH_FEATURES, input_type="string", alternate_sign=False)
    x = hasher.transform([f"{p} {r}" for p in prompt for r in response] for prompt, response in words).tocsr()
    x.data[:] = 1.0  # binary: two pairs sharing a hash count once
    return x


def seen_columns(pairs) -> np.ndarray:
    """The sorted hashed-pair indices that occur in ``pairs`` (the training examples' ``hashed_pairs``)."""
    return np.unique(pairs.indices).astype(np.int64)


def overlap(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """(N, 2): shares of the prompt's and of the response's content words found in the other text."""
    out = np.zeros((len(prompts), 2))
    for i, (prompt, response) in enumerate(_word_sets(prompts, responses)):
        common = len(set(prompt) & set(response))
        out[i] = (common / len(prompt) if prompt else 0.0, common / len(response) if response else 0.0)
    return out


def features(prompts: Sequence[str], responses: Sequence[str], columns: np.ndarray, pairs=None):
    """[PAIR_WEIGHT · pairs restricted to ``columns`` (rows L2-normalised), overlap] as a CSR matrix;
    ``pairs``: the ``hashed_pairs`` of these texts when already computed."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.preprocessing import normalize

    if pairs is None:
        pairs = hashed_pairs(prompts, responses)
    kept = pairs[:, columns]
    if kept.shape[1]:
        kept = normalize(kept, norm="l2")
    return hstack([PAIR_WEIGHT * kept, csr_matrix(overlap(prompts, responses))]).tocsr()
