"""Loading a run's tokenizer and data: tokenised into (or mapped from) the shared cache of docs/design.md
section 3.2, checked against the model's vocabulary."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dora_engine.data.schema import RecordError
from dora_engine.training.config import TrainingConfig
from dora_engine.training.data import NoRecordsError, TrainingData, check_token_range, row_tokenizer


def load_data(
    cfg: TrainingConfig, tokenizer: Any, files: list[str], progress: bool, train: TrainingData | None = None
) -> TrainingData:
    """Read, validate and tokenise ``files`` into the memory-mapped cache (``data.cache_dir``), or map the
    tokens an earlier run or another rank of this node made; every data error names its file and record.
    With ``train`` (the loaded data.train) the files are data.eval, whose records must have the same K."""
    from dora_engine.training.tokenised import load_tokenised

    try:
        return load_tokenised(
            files, row_tokenizer(tokenizer, cfg.model, cfg.data), stage=cfg.stage,
            target_source=cfg.data.target_source,
            num_responses=train.num_responses if train is not None else cfg.data.num_responses,
            needs_h_tilde=cfg.needs_h_tilde, cache_dir=data_cache_dir(cfg), allow_empty=cfg.data.allow_empty_responses,
            k_from="data.train" if train is not None else None, columns=cfg.data.columns or None,
            data_format=cfg.data.format, num_proc=cfg.data.num_proc,
            progress=progress and os.environ.get("LOCAL_RANK", "0") == "0",
        )
    except NoRecordsError as err:
        raise RecordError(f"{'data.eval' if train is not None else 'data.train'}: {err}") from None


def data_cache_dir(cfg: TrainingConfig) -> Path:
    """Where tokenised data live: ``data.cache_dir``, else the user's cache (``default_cache_dir``), which
    every later run shares whatever its output_dir."""
    from dora_engine.training.tokenised import default_cache_dir

    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()


@dataclass(frozen=True)
class RunData:
    """The tokenizer and the tokenised data of a run (data.eval: None when the config names none)."""

    tokenizer: Any
    train: TrainingData
    eval: TrainingData | None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def load_run_data(cfg: TrainingConfig, progress: bool) -> RunData:
    """The tokenizer, data.train and data.eval of ``cfg``, every token id checked against the model's
    vocabulary (docs/design.md section 7.2): everything that can be wrong with the input, before any
    process group or model."""
    from dora_engine.training.model import load_tokenizer, model_vocab_size

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    train = load_data(cfg, tokenizer, cfg.data.train, progress)
    evaluation = load_data(cfg, tokenizer, cfg.data.eval, progress, train) if cfg.data.eval else None
    vocab = model_vocab_size(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    check_token_range(train, vocab, "data.train")
    if evaluation is not None:
        check_token_range(evaluation, vocab, "data.eval")
    return RunData(tokenizer, train, evaluation)
