"""Tokenised training data, the deterministic sampler and the collator (docs/design.md sections 3-5).

Each response becomes one row of the layout of ``dora_engine.rows`` (prompt tokens + response tokens + EOS,
Hugging Face labels); a batch of B prompts × K responses is N = B·K rows, row n = b·K + k.

``tokenise`` makes the rows in memory (small data, tests); a training run gets the same rows from the
memory-mapped cache of ``dora_engine.training.tokenised`` (docs/design.md section 3.2), which has the
same ``TrainingData`` interface.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dora_engine.data.schema import Record, RecordError, read_records
from dora_engine.rows import Row, RowTokenizer, alignment_problem, pad_rows
from dora_engine.training.config import DataConfig, ModelConfig


@dataclass
class Example:
    """One training item: a prompt with its K rows (align), or one prompt-response row (sft)."""

    record_index: int
    rows: list[Row]
    scores: list[float] | None
    h_tilde: float | None


class NoRecordsError(RecordError):
    """Data files that hold no record; the message names them (``load_data`` adds the config key)."""

    def __init__(self, paths: Sequence[str]) -> None:
        super().__init__(f"no records in {', '.join(str(p) for p in paths)}")


def _where(index: int, record: Record) -> str:
    return f"record {index} (id={record.id!r})"


def row_tokenizer(tokenizer: Any, model_cfg: ModelConfig, data_cfg: DataConfig) -> RowTokenizer:
    """The run's ``RowTokenizer``: the chat template under ``model.chat_template: auto`` when the tokenizer has
    one, and the ``data.max_prompt_tokens`` / ``data.max_response_tokens`` limits."""
    use_template = model_cfg.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
    return RowTokenizer(tokenizer, chat_template=use_template, max_prompt_tokens=data_cfg.max_prompt_tokens,
                        max_response_tokens=data_cfg.max_response_tokens)


def record_rows(tokenizer: RowTokenizer, index: int, record: Record, responses: Sequence[int]) -> list[Row]:
    """The rows of ``record``'s responses ``responses``; errors name the record."""
    return tokenizer.rows(_where(index, record), record.prompt, [r.text for r in record.responses], responses)


@dataclass
class TrainingData:
    """Tokenised examples of one split and the hashes that key the reference cache."""

    examples: list[Example]
    num_responses: int  # K (1 for sft)
    data_hash: str
    token_hash: str

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_records(self) -> int:
        """Records of the files (examples refer to them by ``record_index``; the reference cache has a row each)."""
        return max(ex.record_index for ex in self.examples) + 1

    def mean_h_tilde(self) -> float:
        """Mean h̃ over the examples of an align split (one per record, every one with h̃): the c of
        ``robust.h_scale: dataset`` (docs/design.md section 4.3)."""
        return sum(ex.h_tilde for ex in self.examples) / len(self.examples)


def file_hash(paths: Sequence[str]) -> str:
    """sha256 over the bytes of the data files, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class LoadedRecords(list):
    """Records read from files; ``origins[i]`` is record i's (file, index in that file), for error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.origins: list[tuple[str, int]] = []

    def where(self, index: int) -> str:
        path, n = self.origins[index]
        return f"{path}: {_where(n, self[index])}"


def load_records(paths: Sequence[str]) -> LoadedRecords:
    """Records of several JSONL files; ids must be unique across the files."""
    records = LoadedRecords()
    seen: dict[str, str] = {}
    for path in paths:
        try:
            part = read_records(path)
        except RecordError as err:
            raise RecordError(f"{path}: {err}") from None
        for n, rec in enumerate(part):
            if rec.id in seen:
                raise RecordError(f"{path}: record {n} (id={rec.id!r}): duplicate id (also in {seen[rec.id]})")
            seen[rec.id] = path
        records.extend(part)
        records.origins.extend((str(path), n) for n in range(len(part)))
    return records


def check_align_records(
    records: Sequence[Record], num_responses: int | None, needs_h_tilde: bool, *, k_from: str | None = None
) -> int:
    """The checks an align run needs before its first step; returns K. Failures name the record (and its
    file, for records of ``load_records``). ``k_from`` names where a given ``num_responses`` comes from
    (e.g. data.train, for the records of data.eval)."""
    if not records:
        raise RecordError("the training data has no records")
    K = num_responses or records[0].num_responses

    def where(i: int) -> str:
        return records.where(i) if isinstance(records, LoadedRecords) else _where(i, records[i])

    for i, rec in enumerate(records):
        problem = alignment_problem(where(i), [r.score for r in rec.responses], rec.h_tilde, K=K, k_from=k_from,
                                    needs_h_tilde=needs_h_tilde)
        if problem:
            raise RecordError(problem)
    return K


ALL_SOURCES = "*"
"""``data.target_source`` value under which SFT trains on every response, whatever its source."""


def sft_targets(record: Record, target_source: str) -> list[int]:
    """The responses an SFT run trains on: those of ``target_source`` (every one for ``ALL_SOURCES``)."""
    return [k for k, r in enumerate(record.responses) if target_source in (ALL_SOURCES, r.source)]


def check_nonempty(index: int, record: Record, responses: Sequence[int]) -> None:
    """The responses ``responses`` of a record have text (docs/design.md section 7.2: an empty response would
    train as EOS alone; ``data.allow_empty_responses`` keeps them)."""
    for k in responses:
        if not record.responses[k].text.strip():
            raise RecordError(
                f"{_where(index, record)}: field 'responses[{k}].text' is empty; remove the response (or the record), "
                "or set data.allow_empty_responses: true to train it as the EOS token alone"
            )


def tokenise(
    records: Sequence[Record], tokenizer: RowTokenizer, *, stage: str, target_source: str, num_responses: int | None,
    needs_h_tilde: bool, data_hash: str, progress: bool = False, k_from: str | None = None,
    allow_empty: bool = False,
) -> TrainingData:
    """Examples of ``stage``: whole prompts with their K responses (align) or target-source responses (sft).
    ``k_from``: see ``check_align_records``. A response with empty (or blank) text is an error unless
    ``allow_empty``."""
    from tqdm.auto import tqdm

    examples: list[Example] = []
    if stage == "align":
        K = check_align_records(records, num_responses, needs_h_tilde, k_from=k_from)
    else:
        K = 1
    for i, rec in enumerate(tqdm(records, desc="tokenising", disable=not progress, leave=False)):
        if stage == "align":
            if not allow_empty:
                check_nonempty(i, rec, range(K))
            rows = record_rows(tokenizer, i, rec, range(K))
            examples.append(Example(i, rows, [r.score for r in rec.responses], rec.h_tilde))
        else:
            targets = sft_targets(rec, target_source)
            if not allow_empty:
                check_nonempty(i, rec, targets)
            examples.extend(Example(i, record_rows(tokenizer, i, rec, [k]), None, None) for k in targets)
    if not examples:
        sources = sorted({r.source for rec in records for r in rec.responses})
        raise RecordError(
            f"no response has source {target_source!r} (data.target_source); sources in the data: {sources}"
        )
    digest = hashlib.sha256(f"{stage}|{K}".encode())
    for ex in examples:
        for row in ex.rows:
            digest.update(f"{ex.record_index}:{row.prompt_len}:".encode())
            digest.update(torch.tensor(row.input_ids, dtype=torch.int64).numpy().tobytes())
    return TrainingData(examples, K, data_hash, digest.hexdigest())


def check_token_range(data: TrainingData, vocab_size: int, key: str) -> None:
    """Every token id is below the model's vocabulary size, so the op can run without checking labels."""
    if hasattr(data, "max_token_ids"):  # memory-mapped data: one pass over a column of per-row maxima
        import pyarrow.compute as pc

        tops = data.max_token_ids()
        if len(tops) == 0 or pc.max(tops).as_py() < vocab_size:
            return
        row = pc.indices_nonzero(pc.greater_equal(tops, vocab_size))[0].as_py()
        example = data.examples[row // len(data.examples[0].rows)]  # every example has the same number of rows
        raise RecordError(
            f"{key}: record {example.record_index}: token id {tops[row].as_py()} is outside the model's vocabulary "
            f"({vocab_size} tokens); the tokenizer does not match model.path"
        )
    for ex in data.examples:
        for row in ex.rows:
            top = max(row.input_ids)
            if top >= vocab_size:
                raise RecordError(
                    f"{key}: record {ex.record_index}: token id {top} is outside the model's vocabulary "
                    f"({vocab_size} tokens); the tokenizer does not match model.path"
                )


# --------------------------------------------------------------------------------------------------
# Sampler: a global order per epoch from (seed, epoch), cut into optimizer steps
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """Deterministic data order: epoch e visits ``randperm(n, seed + e)``; the remainder is dropped.

    One optimizer step consumes ``prompts_per_step = micro · world · accum`` examples; micro-step j of
    a step gives rank r the slice ``[(j·world + r)·micro, … + micro)`` of that step's examples, so the
    global batch of a micro-step is the same whatever the world size. A position is the number of
    examples consumed, which keeps the order when a run resumes on another world size.
    """

    num_examples: int
    micro: int
    world: int
    accum: int
    seed: int

    @property
    def prompts_per_step(self) -> int:
        return self.micro * self.world * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.prompts_per_step

    def order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=gen)

    def step_indices(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of optimizer step ``step`` (0-based) for ``rank``, one list per micro-step."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        base = within * self.prompts_per_step
        out = []
        for j in range(self.accum):
            lo = base + (j * self.world + rank) * self.micro
            out.append(order[lo : lo + self.micro].tolist())
        return out


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


def collate(
    data: TrainingData, indices: Sequence[int], *, pad_id: int, ref_logps: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """A micro-batch of ``indices``: right-padded input_ids/attention_mask/labels (N = B·K, T), plus
    scores (B, K), h_tilde (B,), ref_logps (N,) where the data has them."""
    batch = pad_rows([row for i in indices for row in data.examples[i].rows], pad_id)
    examples = [data.examples[i] for i in indices]
    if examples[0].scores is not None:
        batch["scores"] = torch.tensor([ex.scores for ex in examples], dtype=torch.float32)
    if all(ex.h_tilde is not None for ex in examples):
        batch["h_tilde"] = torch.tensor([ex.h_tilde for ex in examples], dtype=torch.float32)
    if ref_logps is not None:
        batch["ref_logps"] = ref_logps[[ex.record_index for ex in examples]].reshape(-1)
    return batch
