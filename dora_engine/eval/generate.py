"""Responses of a trained causal LM to held-out prompts (``dora-engine eval generate``).

Decoding defaults are the paper's: sampling with temperature 0.8, top-k 50, top-p 0.9 (temperature 0
means greedy). Prompts go through the tokenizer's chat template when it has one. Backends:
``transformers`` (batched ``generate`` with left padding; CPU or GPU) and ``vllm`` (the ``generate``
extra). Results are written as JSONL, one line per prompt ``{"id", "instruction", "output",
"generator"}``, and optionally as AlpacaEval's ``model_outputs.json`` (a JSON list of
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
from dora_engine.data.schema import Prompt, Record, RecordError, iter_jsonl

BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class DecodingConfig:
    """Sampling settings; the defaults are the paper's."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.9
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Generation:
    """One generated response; ``instruction`` is the prompt as plain text (the AlpacaEval join key)."""

    id: str
    instruction: str
    output: str
    generator: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as a chat: a plain string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text fed to the model: the chat template with a generation prompt, else the plain prompt text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def adds_special_tokens(tokenizer: Any) -> bool:
    """Whether to let the tokenizer add its special tokens (bos) to a rendered prompt: a chat template
    already writes them into the text, a plain prompt needs them."""
    return not getattr(tokenizer, "chat_template", None)


def generate_records(
    records: Sequence[Record],
    model_path: str,
    *,
    generator: str | None = None,
    backend: str = "transformers",
    decoding: DecodingConfig = DecodingConfig(),
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
) -> list[Generation]:
    """One response per record from the model at ``model_path`` (a local folder or hub id)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [r.prompt for r in records]
    if backend == "vllm":
        outputs = _generate_vllm(model_path, prompts, decoding, dtype)
    else:
        outputs = _generate_transformers(model_path, prompts, decoding, batch_size, device, dtype)
    name = generator or Path(model_path.rstrip("/")).name
    return [Generation(r.id, r.prompt_text(), out, name) for r, out in zip(records, outputs, strict=True)]


def _generate_transformers(
    model_path: str, prompts: Sequence[Prompt], decoding: DecodingConfig, batch_size: int, device: str | None,
    dtype: str,
) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    return generate_texts(model, tokenizer, prompts, decoding, batch_size=batch_size)


def generate_texts(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], decoding: DecodingConfig = DecodingConfig(), *,
    batch_size: int = 8, progress: bool = True,
) -> list[str]:
    """One response per prompt from an in-memory causal LM (batched, left-padded, on the model's device)."""
    import torch
    from tqdm.auto import tqdm

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_prompt(tokenizer, p) for p in prompts]
    special = adds_special_tokens(tokenizer)
    # Longest first, so that each batch holds prompts of similar length (less padding); order restored below.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    sampling = {} if decoding.greedy else {
        "temperature": decoding.temperature, "top_k": decoding.top_k or None, "top_p": decoding.top_p,
    }
    torch.manual_seed(decoding.seed)
    # Left padding is set for this call only: the fast tokenizer's backend keeps (and save_pretrained writes)
    # the last padding it used, so its previous state is restored as well.
    was_training, padding_side = model.training, tokenizer.padding_side
    backend = getattr(tokenizer, "backend_tokenizer", None)
    backend_padding = backend.padding if backend is not None else None
    model.eval()
    tokenizer.padding_side = "left"
    outputs: list[str] = [""] * len(texts)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=special)
            enc = enc.to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **enc, do_sample=not decoding.greedy, max_new_tokens=decoding.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id, **sampling,
                )
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                outputs[i] = text.strip()
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
        if backend is not None:
            if backend_padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**backend_padding)
    return outputs


def _generate_vllm(model_path: str, prompts: Sequence[Prompt], decoding: DecodingConfig, dtype: str) -> list[str]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise RuntimeError(
            f"backend 'vllm' was requested but vllm cannot be imported ({err}); "
            "install it with `pip install 'dora-engine[generate]'` or use --backend transformers"
        ) from None
    llm = LLM(model=model_path, dtype=dtype, seed=decoding.seed)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(
        temperature=decoding.temperature, top_k=decoding.top_k or -1, top_p=decoding.top_p,
        max_tokens=decoding.max_new_tokens, seed=decoding.seed,
    )
    special = adds_special_tokens(tokenizer)
    requests = [
        {"prompt_token_ids": tokenizer(render_prompt(tokenizer, p), add_special_tokens=special)["input_ids"]}
        for p in prompts
    ]
    results = llm.generate(requests, params)
    return [r.outputs[0].text.strip() for r in results]


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
            rows = json.load(handle)
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
