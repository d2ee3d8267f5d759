"""``data augment``: add n sampled responses per prompt from a causal LM (issue 7).

The paper adds synthetic responses from Mistral-7B-Instruct-v0.3 sampled with temperature 0.8 and
repetition penalty 1.1 (``Sampling`` defaults). Prompts go through the tokenizer's chat template when
it has one (chat prompts as they are, string prompts as one user turn); otherwise the plain prompt
text is the model input. Each new response has ``source`` = the model's name (its path's basename
unless given) and no score; ``meta["generation"][source]`` records the sampling settings.

Backends: ``transformers`` (default; batched ``generate`` with left padding, CPU or GPU) and ``vllm``
(the ``generate`` extra; a clear error when it is not installed). Every record gets a seed derived from
``seed`` and its id; vllm seeds each prompt with it, transformers each batch with its first prompt's.
So ``augment_file`` resumes an interrupted run to exactly the output of an uninterrupted one
(``dora_engine.data.sharded``), and with transformers any shard size that is a multiple of the batch
size gives the same output as ``augment_records``.

API: ``augment_records(records, model, n=2, ...) -> list[Record]`` in memory;
``augment_file(input, output, model, n=2, ...) -> list[Record]`` sharded and resumable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from dora_engine.data.schema import Prompt, Record, Response, read_records
from dora_engine.data.sharded import derived_seed, run_sharded

BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``top_k = 0`` and ``top_p = 1`` switch those filters off."""

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class Generator(Protocol):
    def generate(self, prompts: Sequence[Prompt], n: int, seeds: Sequence[int]) -> list[list[str]]:
        """n completions per prompt; ``seeds[i]`` belongs to prompt i (a batched backend seeds each batch
        with the seed of its first prompt)."""
        ...


def render_prompt(tokenizer: Any, prompt: Prompt) -> tuple[str, bool]:
    """(model input text, whether it came from the chat template and so already holds special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
    if isinstance(prompt, str):
        return prompt, False
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt), False


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class TransformersGenerator:
    """Batched sampling with ``AutoModelForCausalLM.generate``."""

    def __init__(self, model: str, sampling: Sampling, batch_size: int = 8, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.sampling = sampling
        self.batch_size = batch_size

    def generate(self, prompts: Sequence[Prompt], n: int, seeds: Sequence[int]) -> list[list[str]]:
        import torch

        out: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            torch.manual_seed(seeds[start])
            rendered = [render_prompt(self.tokenizer, p) for p in prompts[start:start + self.batch_size]]
            templated = rendered[0][1]
            batch = self.tokenizer([text for text, _ in rendered], return_tensors="pt", padding=True,
                                   add_special_tokens=not templated).to(self.device)
            s = self.sampling
            with torch.no_grad():
                generated = self.model.generate(
                    **batch, do_sample=True, num_return_sequences=n, temperature=s.temperature, top_p=s.top_p,
                    top_k=s.top_k, repetition_penalty=s.repetition_penalty, max_new_tokens=s.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            texts = self.tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            out.extend([t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(rendered)))
        return out


class VLLMGenerator:
    """Sampling with vLLM (``pip install 'dora-engine[generate]'``); each prompt seeded on its own."""

    def __init__(self, model: str, sampling: Sampling) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "backend 'vllm' was requested but vllm is not installed: pip install 'dora-engine[generate]' "
                f"or use backend 'transformers' ({err})"
            ) from None
        self._vllm = vllm
        self.llm = vllm.LLM(model=model)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = sampling

    def generate(self, prompts: Sequence[Prompt], n: int, seeds: Sequence[int]) -> list[list[str]]:
        s = self.sampling
        params = [
            self._vllm.SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                                      repetition_penalty=s.repetition_penalty, max_tokens=s.max_new_tokens, seed=seed)
            for seed in seeds
        ]
        inputs = []
        for prompt in prompts:  # token ids, so that a templated prompt does not get a second BOS
            text, templated = render_prompt(self.tokenizer, prompt)
            inputs.append({"prompt_token_ids": self.tokenizer(text, add_special_tokens=not templated)["input_ids"]})
        results = self.llm.generate(inputs, params, use_tqdm=False)
        return [[o.text.strip() for o in r.outputs] for r in results]


def make_generator(model: str, backend: str, sampling: Sampling, batch_size: int = 8,
                   device: str | None = None) -> Generator:
    if backend == "transformers":
        return TransformersGenerator(model, sampling, batch_size, device)
    if backend == "vllm":
        return VLLMGenerator(model, sampling)
    raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")


def source_name(model: str | os.PathLike) -> str:
    """The source label of a model: the basename of its path or hub name."""
    return Path(str(model).rstrip("/")).name


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


def augment_records(
    records: Sequence[Record], model: str, n: int = 2, *, backend: str = "transformers",
    sampling: Sampling | None = None, batch_size: int = 8, source: str | None = None, seed: int = 0,
    device: str | None = None,
) -> list[Record]:
    """Every record with ``n`` more responses sampled from ``model`` (in memory, one shard)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sampling = sampling or Sampling()
    generator = make_generator(model, backend, sampling, batch_size, device)
    source = source or source_name(model)
    return _augment_shard(records, generator, n, source, seed, {"n": n, **asdict(sampling)})


def augment_file(
    input: str | os.PathLike, output: str | os.PathLike, model: str, n: int = 2, *, backend: str = "transformers",
    sampling: Sampling | None = None, batch_size: int = 8, source: str | None = None, seed: int = 0,
    device: str | None = None, shard_size: int = 256, work_dir: str | os.PathLike | None = None,
    restart: bool = False,
) -> list[Record]:
    """Augment a JSONL dataset shard by shard, resuming an interrupted run (see the module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sampling = sampling or Sampling()
    records = read_records(input)
    generator = make_generator(model, backend, sampling, batch_size, device)
    source = source or source_name(model)
    generation = {"n": n, **asdict(sampling)}
    settings = {"step": "augment", "model": str(model), "source": source, "backend": backend, "seed": seed,
                "batch_size": batch_size, **generation}
    return run_sharded(
        records,
        lambda shard, _: _augment_shard(shard, generator, n, source, seed, generation),
        output, settings=settings, shard_size=shard_size, work_dir=work_dir, restart=restart, desc="augment",
    )
