"""Responses of a trained causal LM to held-out prompts (``dora-engine eval generate``).

Decoding defaults are the paper's, ``EVALUATION_SAMPLING``: temperature 0.8, top-k 50, top-p 0.9
(temperature 0 means greedy). Generation, prompt rendering and the backends (``transformers``,
``vllm``) are ``dora_engine.generation``'s. Results are written as JSONL, one line per prompt
``{"id", "instruction", "output", "generator"}``, and optionally as AlpacaEval's ``model_outputs.json`` (a JSON list of
``{"instruction", "output", "generator"}``) for AlpacaEval 2 / Arena-Hard tooling.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write
from dora_engine.data.schema import Record, RecordError, iter_jsonl
from dora_engine.generation import EVALUATION_SAMPLING, Sampling, VLLMOptions, derived_seed, make_generator, model_name


@dataclass(frozen=True)
class Generation:
    """One generated response; ``instruction`` is the prompt as plain text (the AlpacaEval join key)."""

    id: str
    instruction: str
    output: str
    generator: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def generate_records(
    records: Sequence[Record],
    model_path: str,
    *,
    generator: str | None = None,
    backend: str = "transformers",
    sampling: Sampling | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    vllm: VLLMOptions | None = None,
    trust_remote_code: bool = False,
) -> list[Generation]:
    """One response per record from the model at ``model_path`` (a local folder or hub id), with
    ``EVALUATION_SAMPLING`` unless given; each record's draws are seeded by ``seed`` and its id. The
    generator name defaults to ``generation.model_name(model_path)``."""
    engine = make_generator(model_path, sampling or EVALUATION_SAMPLING, backend=backend, batch_size=batch_size,
                            device=device, dtype=dtype, vllm=vllm, progress=True,
                            trust_remote_code=trust_remote_code)
    outputs = engine.generate([r.prompt for r in records], 1, [derived_seed(seed, r.id) for r in records])
    name = generator or model_name(model_path)
    return [Generation(r.id, r.prompt_text(), texts[0], name) for r, texts in zip(records, outputs, strict=True)]


def write_generations(path: str | os.PathLike, generations: Sequence[Generation]) -> None:
    """JSONL, one generation per line (atomic)."""
    with atomic_write(path) as handle:
        for g in generations:
            handle.write(json.dumps(g.to_dict(), ensure_ascii=False) + "\n")


def write_model_outputs(path: str | os.PathLike, generations: Sequence[Generation]) -> None:
    """AlpacaEval's ``model_outputs.json``: a list of {instruction, output, generator} (atomic)."""
    rows = [{"instruction": g.instruction, "output": g.output, "generator": g.generator} for g in generations]
    with atomic_write(path) as handle:
        json.dump(rows, handle, ensure_ascii=False, indent=1)


def read_generations(path: str | os.PathLike) -> list[Generation]:
    """Generations from this module's JSONL, or from a ``model_outputs.json`` list (ids are then the row index).

    Every row needs string ``instruction`` and ``output`` fields; errors name the row.
    """
    path = Path(path)
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            try:
                rows = json.load(handle)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(rows, list):
            raise RecordError(f"{path}: expected a JSON list of {{instruction, output, generator}} objects")
        numbered = list(enumerate(rows))
    else:
        numbered = list(iter_jsonl(path))
    return [_generation(row, f"{path}: row {i}", default_id=str(i)) for i, row in numbered]


def _generation(row: Any, where: str, default_id: str) -> Generation:
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected an object, got {type(row).__name__}")
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise RecordError(f"{where}: field {key!r} must be a string, got {row.get(key)!r}")
    return Generation(str(row.get("id", default_id)), row["instruction"], row["output"], str(row.get("generator", "")))
