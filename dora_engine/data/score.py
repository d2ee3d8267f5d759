"""``data score``: fill every response's ``score`` with a reward model (docs/design.md section 3).

The reward model is an ``AutoModelForSequenceClassification`` with exactly one output (its logit is
the score; any other head size is refused). Its input is (prompt, response) through the tokenizer's
chat template when it has one (the response as the assistant turn), otherwise the tokenizer's text
pair encoding of (prompt text, response). Sequences longer than ``max_length`` tokens are truncated
from the left, so that the response's end is always seen. With ``keep_existing`` responses that
already have a score keep it and are not scored; a record that gets fresh scores loses its
``meta.corrupted`` mark (see ``corrupt``). Scoring is deterministic; ``score_file`` is sharded and
resumable like ``augment_file``.

``model = ORACLE`` (``"synth:oracle"``) scores with the synthetic dataset's known reward
``dora_engine.data.synth.oracle_reward`` instead of a network (e.g. responses added by ``augment``
to a ``data synth`` dataset).

API: ``score_records(records, model, ...) -> list[Record]``; ``score_file(input, output, model, ...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from dora_engine.data.schema import Record, Response
from dora_engine.data.sharded import ShardedRun
from dora_engine.device import resolve_device
from dora_engine.errors import UserValueError
from dora_engine.hf_loading import load_pretrained
from dora_engine.prompt import Prompt

ORACLE = "synth:oracle"

Scorer = Callable[[Sequence[tuple[Prompt, str]]], list[float]]


class RewardModel:
    """A single-logit sequence classifier that scores (prompt, response) pairs in batches."""

    def __init__(self, model: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None, *,
                 trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise UserValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = load_pretrained(AutoTokenizer, model, trust_remote_code=trust_remote_code)
        self.model = load_pretrained(AutoModelForSequenceClassification, model, trust_remote_code=trust_remote_code,
                                     dtype=dtype)
        outputs = self.model.config.num_labels
        if outputs != 1:
            raise UserValueError(
                f"reward model {model!r} has {outputs} outputs (config.num_labels); a reward model must output "
                "exactly one logit"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"
        if self.model.config.pad_token_id is None:  # decoder-based classifiers find the last token by padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def _encode(self, pairs: Sequence[tuple[Prompt, str]]) -> Any:
        if getattr(self.tokenizer, "chat_template", None):
            texts = [
                self.tokenizer.apply_chat_template(
                    [*(p if isinstance(p, list) else [{"role": "user", "content": p}]),
                     {"role": "assistant", "content": r}],
                    tokenize=False,
                )
                for p, r in pairs
            ]
            return self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.max_length, add_special_tokens=False)
        prompts = [p if isinstance(p, str) else "\n".join(f"{m['role']}: {m['content']}" for m in p) for p, _ in pairs]
        return self.tokenizer(prompts, [r for _, r in pairs], return_tensors="pt", padding=True,
                              truncation=True, max_length=self.max_length)

    def score(self, pairs: Sequence[tuple[Prompt, str]]) -> list[float]:
        import torch

        scores: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            batch = self._encode(pairs[start:start + self.batch_size]).to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits
            scores.extend(float(x) for x in logits[:, 0].float().cpu())
        return scores


def _oracle_scores(pairs: Sequence[tuple[Prompt, str]]) -> list[float]:
    from dora_engine.data.synth import oracle_reward

    return [oracle_reward(prompt, response) for prompt, response in pairs]


def make_scorer(model: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None, *,
                trust_remote_code: bool = False) -> Scorer:
    """A function from (prompt, response) pairs to scores: the oracle for ``ORACLE``, else a ``RewardModel``
    (``trust_remote_code``: ``dora_engine.hf_loading``)."""
    if model == ORACLE:
        return _oracle_scores
    return RewardModel(model, batch_size, max_length, device, trust_remote_code=trust_remote_code).score


def _score_shard(records: Sequence[Record], scorer: Scorer, keep_existing: bool) -> list[Record]:
    todo = [(i, k) for i, rec in enumerate(records) for k, r in enumerate(rec.responses)
            if not (keep_existing and r.score is not None)]
    values = scorer([(records[i].prompt, records[i].responses[k].text) for i, k in todo])
    new_scores = dict(zip(todo, values, strict=True))
    rescored = {i for i, _ in todo}
    out = []
    for i, rec in enumerate(records):
        responses = [Response(r.text, r.source, new_scores.get((i, k), r.score)) for k, r in enumerate(rec.responses)]
        meta = dict(rec.meta)
        if i in rescored and meta.get("corrupted"):
            meta["corrupted"] = False  # fresh scores replace the permuted ones
        out.append(Record(rec.id, rec.prompt, responses, rec.h_tilde, meta))
    return out


def score_records(
    records: Sequence[Record], model: str, *, batch_size: int = 16, max_length: int = 1024,
    keep_existing: bool = False, device: str | None = None, trust_remote_code: bool = False,
) -> list[Record]:
    """Every record with its responses scored by the reward model ``model`` or ``ORACLE`` (in memory);
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    scorer = make_scorer(model, batch_size, max_length, device, trust_remote_code=trust_remote_code)
    return _score_shard(records, scorer, keep_existing)


def score_file(
    input: str | os.PathLike, output: str | os.PathLike, model: str, *, batch_size: int = 16,
    max_length: int = 1024, keep_existing: bool = False, device: str | None = None, shard_size: int = 256,
    work_dir: str | os.PathLike | None = None, restart: bool = False, trust_remote_code: bool = False,
) -> Sequence[Record]:
    """Score a JSONL dataset shard by shard, resuming an interrupted run (see the module docstring);
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    records = input  # streamed by the sharded run
    settings = {"step": "score", "model": str(model), "max_length": max_length, "keep_existing": keep_existing}
    # The work directory is checked (and an earlier run's progress reported) before the model loads.
    run = ShardedRun(records, output, settings=settings, shard_size=shard_size, work_dir=work_dir, restart=restart,
                     desc="score")
    scorer = make_scorer(model, batch_size, max_length, device, trust_remote_code=trust_remote_code)
    return run.run(lambda shard, _: _score_shard(shard, scorer, keep_existing))
