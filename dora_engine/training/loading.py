"""Loading a run's data: tokenised into (or mapped from) the shared cache of docs/design.md section 3.2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dora_engine.training.config import TrainingConfig
from dora_engine.training.data import Tokenizer, TrainingData


def load_data(
    cfg: TrainingConfig, tokenizer: Any, files: list[str], progress: bool, train: TrainingData | None = None
) -> TrainingData:
    """Read, validate and tokenise ``files`` into the memory-mapped cache (``data.cache_dir``), or map the
    tokens an earlier run or another rank of this node made; every data error names its file and record.
    With ``train`` (the loaded data.train) the files are data.eval, whose records must have the same K."""
    from dora_engine.training.tokenised import load_tokenised

    return load_tokenised(
        files, Tokenizer(tokenizer, cfg.model, cfg.data), stage=cfg.stage, target_source=cfg.data.target_source,
        num_responses=train.num_responses if train is not None else cfg.data.num_responses,
        needs_h_tilde=cfg.needs_h_tilde, cache_dir=data_cache_dir(cfg), allow_empty=cfg.data.allow_empty_responses,
        k_from="data.train" if train is not None else None, columns=cfg.data.columns or None,
        num_proc=cfg.data.num_proc, progress=progress and os.environ.get("LOCAL_RANK", "0") == "0",
    )


def data_cache_dir(cfg: TrainingConfig) -> Path:
    """Where tokenised data live: ``data.cache_dir``, else the user's cache (``default_cache_dir``), which
    every later run shares whatever its output_dir."""
    from dora_engine.training.tokenised import default_cache_dir

    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
