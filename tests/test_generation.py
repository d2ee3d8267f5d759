"""dora_engine.generation's sampling step: per-row Gumbel noise draws from the filtered softmax."""

from __future__ import annotations

import pytest

from dora_engine.device import resolve_device
from dora_engine.generation import GENERATION_BACKENDS, Sampling, _logits_processors, make_generator

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def _draws(sampling: Sampling, row_seeds: list[int]) -> torch.Tensor:
    processors = _logits_processors(sampling, row_seeds, "cpu")
    input_ids = torch.zeros((len(row_seeds), 1), dtype=torch.long)
    return processors(input_ids, LOGITS.repeat(len(row_seeds), 1)).argmax(dim=-1)


def test_draws_follow_the_tempered_top_k_softmax():
    sampling = Sampling(temperature=0.7, top_k=3)
    rows = 20_000
    counts = torch.bincount(_draws(sampling, list(range(rows))), minlength=len(LOGITS)).double() / rows
    # independent: softmax of logits / T over the 3 largest logits, 0 elsewhere
    expected = torch.zeros(len(LOGITS), dtype=torch.double)
    top = LOGITS.topk(3).indices
    expected[top] = torch.softmax(LOGITS[top].double() / 0.7, dim=0)
    assert torch.allclose(counts, expected, atol=0.015)


def test_a_row_draws_the_same_in_any_batch():
    sampling = Sampling(temperature=1.5)
    alone = [_draws(sampling, [seed]).item() for seed in range(40)]
    assert _draws(sampling, list(range(40))).tolist() == alone
    assert _draws(sampling, list(range(39, -1, -1))).tolist() == alone[::-1]
    assert len(set(alone)) > 1


def test_greedy_adds_no_noise():
    assert _draws(Sampling(temperature=0), [0, 1, 2]).tolist() == [0, 0, 0]


def test_unknown_backend_names_the_generation_backends():
    with pytest.raises(ValueError, match=", ".join(GENERATION_BACKENDS)):
        make_generator("unused", Sampling(), backend="tgi")


def test_resolve_device():
    visible = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None) == resolve_device("auto") == visible
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
