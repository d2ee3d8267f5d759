"""The row layout every trainer of dora-engine feeds the op (docs/design.md section 3.1, "Token rows and labels").

A prompt with K responses becomes K rows ``prompt tokens + response tokens (+ EOS)``; a batch of B prompts is
N = B·K right-padded rows, row n = b·K + k. Labels follow the Hugging Face convention: ``labels[t]`` is token
t on response positions and ``IGNORE_INDEX`` on prompt and padding positions, so only response tokens are
scored (the model wrapper aligns them with the logits, ``dora_engine.ops.shift_labels``).

One implementation serves the engine (``training/data.py``, ``training/tokenised.py``), ``ListwiseCollator``
(``integrations/hf_trainer.py``) and the TRL adapter (``integrations/trl.py``):

- ``RowTokenizer``: prompt and response texts → token ids (chat template, length limits);
- ``scorable_rows``: the check that every row has a response token to score;
- ``alignment_problem``: the record ↔ K-rows checks (same K in a batch, scores, h̃);
- ``pad_rows``: rows → ``input_ids``, ``attention_mask``, ``labels`` tensors;
- ``response_major_order`` and ``completion_labels``: a batch laid out response-major (row k·B + b, TRL's
  chosen-then-rejected halves) in the op's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dora_engine.data.schema import Prompt, RecordError, prompt_as_text
from dora_engine.ops import IGNORE_INDEX  # the op's label convention, which the rows follow


@dataclass
class Row:
    """One tokenised (prompt, response) sequence."""

    input_ids: list[int]
    prompt_len: int

    def labels(self) -> list[int]:
        """Hugging Face labels: input_ids[t] where token t belongs to the response, else IGNORE_INDEX."""
        return [IGNORE_INDEX] * self.prompt_len + self.input_ids[self.prompt_len :]


class RowTokenizer:
    """Prompt and response texts → token ids with a Hugging Face tokenizer.

    The prompt goes through the tokenizer's chat template (``add_generation_prompt``) when ``chat_template``
    is true (None: when the tokenizer has one), else it is tokenised as text with the special tokens (a chat
    prompt as its 'role: content' lines) and keeps its last ``max_prompt_tokens`` tokens. A response is
    tokenised without special tokens, gets the EOS token when the tokenizer has one and keeps its first
    ``max_response_tokens`` tokens (EOS counted). None: no limit.
    """

    def __init__(self, tokenizer: Any, *, chat_template: bool | None = None, max_prompt_tokens: int | None = None,
                 max_response_tokens: int | None = None):
        self.tok = tokenizer
        self.use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
        self.max_prompt = max_prompt_tokens
        self.max_response = max_response_tokens

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if self.use_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = self.tok(prompt_as_text(prompt), add_special_tokens=True)["input_ids"]
        return keep_last(list(ids), self.max_prompt)

    def response_ids(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        if self.tok.eos_token_id is not None:
            ids.append(self.tok.eos_token_id)
        return keep_first(ids, self.max_response)

    def rows(self, where: str, prompt: Prompt, texts: Sequence[str], responses: Sequence[int]) -> list[Row]:
        """The rows of responses ``responses`` (indices into ``texts``); ``where`` names the record in errors,
        a chat template that rejects the prompt (e.g. a role it does not support) included."""
        try:
            prompt_ids = self.prompt_ids(prompt)
        except _template_errors(self.use_template) as err:
            source = getattr(self.tok, "name_or_path", "") or "the tokenizer"
            raise RecordError(
                f"{where}: the chat template of {source} rejects this prompt: {' '.join(str(err).split())}"
            ) from None
        ids = [self.response_ids(texts[k]) for k in responses]
        return scorable_rows(where, prompt_ids, ids, [f"responses[{k}].text" for k in responses])


def _template_errors(use_template: bool) -> tuple[type[BaseException], ...]:
    """The errors a chat template raises (jinja2's, which only a templated prompt needs)."""
    if not use_template:
        return ()
    from jinja2 import TemplateError

    return (TemplateError,)


def keep_last(ids: list[int], limit: int | None) -> list[int]:
    """The last ``limit`` ids (all for None)."""
    return ids if limit is None else ids[max(len(ids) - limit, 0) :]


def keep_first(ids: list[int], limit: int | None) -> list[int]:
    """The first ``limit`` ids (all for None)."""
    return ids if limit is None else ids[:limit]


def scorable_rows(where: str, prompt: list[int], responses: Sequence[list[int]], fields: Sequence[str]) -> list[Row]:
    """Rows ``prompt + response``; a RecordError naming ``where`` and the response's field when a row has no
    response token the model predicts (an empty response, or one token after an empty prompt: the first token
    of a row is never predicted)."""
    for ids, name in zip(responses, fields, strict=True):
        if not ids:
            raise RecordError(f"{where}: field '{name}' has no token to score (no tokens, and no EOS token)")
        if not prompt and len(ids) < 2:
            raise RecordError(
                f"{where}: field '{name}' has no token to score: with an empty prompt the first token is never "
                "predicted, so a one-token response has nothing to score"
            )
    return [Row(prompt + ids, len(prompt)) for ids in responses]


def alignment_problem(
    where: str, scores: Sequence[float | None], h_tilde: float | None, *, K: int, k_from: str | None,
    needs_h_tilde: bool,
) -> str:
    """Why a record with ``scores`` (one per response) and ``h_tilde`` cannot be a prompt of an align batch
    of K rows, or '' when it can: every prompt of a batch has the same K (``k_from`` names where K comes
    from; None: the data's first record), the losses rank the responses by score, and the strategies that
    weigh prompts by h̃ need it (docs/design.md section 3)."""
    if len(scores) != K:
        if k_from is None:
            need = f"a batch needs a fixed K = {K} (set data.num_responses, or split the data by K)"
        else:
            need = f"the records of {k_from} have K = {K}, and every batch needs the same K"
        return f"{where}: has {len(scores)} responses but {need}"
    if any(s is None for s in scores):
        k = next(k for k, s in enumerate(scores) if s is None)
        return f"{where}: field 'responses[{k}].score' is missing; the losses rank by score"
    if needs_h_tilde and h_tilde is None:
        return (f"{where}: field 'h_tilde' is missing; this strategy needs it (run `dora-engine calibrate` first, "
                "`dora-engine calibrate --apply` for a held-out file, or use robust.strategy erm/dro)")
    return ""


def pad_rows(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded int64 ``input_ids`` (pad ``pad_id``), ``attention_mask`` and ``labels`` (N, T) of ``rows``,
    T the longest row."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for n, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids[n, :length] = torch.tensor(row.input_ids, dtype=torch.int64)
        labels[n, :length] = torch.tensor(row.labels(), dtype=torch.int64)
        mask[n, :length] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def response_major_order(num_rows: int, K: int, device: torch.device | None = None) -> torch.Tensor:
    """The permutation that takes rows laid out response-major (row k·B + b: all first responses, then all
    second ones, as TRL's chosen-then-rejected halves) to the op's layout (row b·K + k): ``x[order]``."""
    return torch.arange(num_rows, device=device).view(K, num_rows // K).t().reshape(-1)


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels of rows whose response positions are marked 1 in ``completion_mask``."""
    return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
