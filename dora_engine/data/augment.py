"""``data augment``: add n sampled responses per prompt from a causal LM.

The paper adds synthetic responses from Mistral-7B-Instruct-v0.3 sampled with temperature 0.8 and
repetition penalty 1.1 (``AUGMENTATION_SAMPLING``, the default). Generation, prompt rendering and
the backends (``transformers``, ``vllm``) are ``dora_engine.generation``'s. Each new response has
``source`` = the model's name unless given (``generation.model_name``: its folder's name, or ``RUN``
for a training run's export ``RUN/final``) and no score;
``meta["generation"][source]`` records the sampling settings.

Every record gets a seed derived from ``seed`` and its id, and its completions depend only on that
seed (not on the batch or shard it runs in). So ``augment_file`` resumes an interrupted run to exactly
the output of an uninterrupted one (``dora_engine.data.sharded``), and any shard size gives the same
output as ``augment_records``.

API: ``augment_records(records, model, n=2, ...) -> list[Record]`` in memory;
``augment_file(input, output, model, n=2, ...)`` sharded, resumable and streamed (the input is never held
at once; the result reads the output file as it is iterated).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from dora_engine.data.schema import Record, Response
from dora_engine.data.sharded import ShardedRun
from dora_engine.errors import UserValueError
from dora_engine.generation import (
    AUGMENTATION_SAMPLING,
    Generator,
    Sampling,
    VLLMOptions,
    derived_seed,
    make_generator,
    model_name,
)


def source_name(model: str | os.PathLike) -> str:
    """The source label of a model: ``generation.model_name`` (its folder's name, the run's name for a
    training run's export ``RUN/final``, a hub id's last part)."""
    return model_name(model)


def _augment_shard(records: Sequence[Record], generator: Generator, n: int, source: str, seed: int,
                   settings: dict[str, Any]) -> list[Record]:
    seeds = [derived_seed(seed, rec.id) for rec in records]
    completions = generator.generate([rec.prompt for rec in records], n, seeds)
    out = []
    for rec, texts in zip(records, completions, strict=True):
        meta = dict(rec.meta)
        meta["generation"] = {**meta.get("generation", {}), source: settings}
        responses = [*rec.responses, *(Response(t, source) for t in texts)]
        out.append(Record(rec.id, rec.prompt, responses, rec.h_tilde, meta))
    return out


def _checked(n: int, sampling: Sampling | None) -> Sampling:
    """The sampling settings (default: the paper's), refusing settings that cannot give n different responses."""
    if n < 1:
        raise UserValueError(f"n must be >= 1, got {n}")
    sampling = sampling or AUGMENTATION_SAMPLING
    if sampling.greedy:
        raise UserValueError("augment samples its responses: temperature must be > 0, got 0 (greedy decoding)")
    return sampling


def augment_records(
    records: Sequence[Record], model: str, n: int = 2, *, backend: str = "transformers",
    sampling: Sampling | None = None, batch_size: int = 8, source: str | None = None, seed: int = 0,
    device: str | None = None, vllm: VLLMOptions | None = None, trust_remote_code: bool = False,
) -> list[Record]:
    """Every record with ``n`` more responses sampled from ``model`` (in memory, one shard);
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    sampling = _checked(n, sampling)
    generator = make_generator(model, sampling, backend=backend, batch_size=batch_size, device=device, vllm=vllm,
                               trust_remote_code=trust_remote_code)
    source = source or source_name(model)
    return _augment_shard(records, generator, n, source, seed, {"n": n, **asdict(sampling)})


def augment_file(
    input: str | os.PathLike, output: str | os.PathLike, model: str, n: int = 2, *, backend: str = "transformers",
    sampling: Sampling | None = None, batch_size: int = 8, source: str | None = None, seed: int = 0,
    device: str | None = None, vllm: VLLMOptions | None = None, shard_size: int = 256,
    work_dir: str | os.PathLike | None = None, restart: bool = False, trust_remote_code: bool = False,
) -> Sequence[Record]:
    """Augment a JSONL dataset shard by shard, resuming an interrupted run (see the module docstring);
    ``trust_remote_code``: ``dora_engine.hf_loading``."""
    sampling = _checked(n, sampling)
    records = input  # streamed by the sharded run
    source = source or source_name(model)
    generation = {"n": n, **asdict(sampling)}
    settings = {"step": "augment", "model": str(model), "source": source, "backend": backend, "seed": seed,
                **generation}
    # The work directory is checked (and an earlier run's progress reported) before the model loads.
    run = ShardedRun(records, output, settings=settings, shard_size=shard_size, work_dir=work_dir, restart=restart,
                     desc="augment")
    generator = make_generator(model, sampling, backend=backend, batch_size=batch_size, device=device, vllm=vllm,
                               trust_remote_code=trust_remote_code)
    return run.run(lambda shard, _: _augment_shard(shard, generator, n, source, seed, generation))
