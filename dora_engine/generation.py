"""Text generation from a causal LM: n sampled completions per prompt, transformers or vllm.

Prompts (``dora_engine.prompt.Prompt``) go through the tokenizer's chat template when it has one
(a string prompt as one user turn); otherwise the plain prompt text is the model input. ``Sampling``
holds the settings, with the paper's two presets: ``AUGMENTATION_SAMPLING`` for synthetic responses
(temperature 0.8, repetition penalty 1.1) and ``EVALUATION_SAMPLING`` for evaluated responses
(temperature 0.8, top-k 50, top-p 0.9); temperature 0 means greedy decoding.

Every prompt comes with its own seed, and a completion's random draws depend only on that seed and the
completion's index, never on the batch: transformers draws token ``t`` of a row as
``argmax(logits_t / T + G_t)`` with Gumbel noise ``G_t`` from a generator owned by the row (the
Gumbel-max trick: that argmax is a sample of ``softmax(logits_t / T)`` after top-k/top-p filtering);
vllm seeds each request. So the output does not depend on the batch size or on which prompts share a
batch (up to floating-point differences between padded batches).

Backends: ``transformers`` (batched ``generate`` with left padding, CPU or GPU; the tokenizer's padding
is restored afterwards, so that ``save_pretrained`` does not write the left padding) and ``vllm`` (the
``generate`` extra; a clear ``ImportError`` when it cannot be imported). vLLM always reads a checkpoint
in its Hugging Face form: HF tokenizer (whose chat template renders the prompts), ``config.json`` and the
safetensors shards that ``model.safetensors.index.json`` lists, also where a Mistral repository ships
its own format beside them (``consolidated.safetensors``, ``params.json``, ``tekken.json``), which
vLLM's ``auto`` modes would pick and whose tokenizer has no HF chat template. ``VLLMOptions`` holds its
engine settings (tensor parallelism, memory share, context length); ``add_backend_arguments`` gives the
commands one definition of the ``--backend`` and vLLM flags.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dora_engine.device import resolve_device
from dora_engine.errors import UserImportError, UserValueError
from dora_engine.hf_loading import load_pretrained, refuse_remote_code
from dora_engine.prompt import Prompt

GENERATION_BACKENDS = ("transformers", "vllm")

EXPORT_FOLDER = "final"  # <output_dir>/final: the Hugging Face export of a training run (training/engine.py)
"""The folder a training run exports its model to (``<output_dir>/final``): the same for every run."""


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and ``parts``, stable across processes and platforms: a prompt's seed
    from the run's seed and the record id, a completion's from the prompt's seed and its index."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def model_name(model: str | os.PathLike) -> str:
    """A name that tells models apart, for the source of augmented responses and the generator of
    evaluated ones: a local folder's name, except for a training run's export ``RUN/final``, which is
    named after its run folder ``RUN`` (every export is called ``final``); a hub id's last part."""
    text = os.fspath(model).rstrip("/\\") or os.fspath(model)
    path = Path(os.path.abspath(text)) if text and os.path.isdir(text) else Path(text)
    if path.name == EXPORT_FOLDER and path.parent.name:
        return path.parent.name
    return path.name or text


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``temperature = 0`` is greedy, ``top_k = 0`` and ``top_p = 1`` switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise UserValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0



#: The paper's synthetic responses (data augment): temperature 0.8, repetition penalty 1.1, 256 new tokens.
AUGMENTATION_SAMPLING = Sampling(temperature=0.8, repetition_penalty=1.1, max_new_tokens=256)
#: The paper's decoding of evaluated responses (eval generate): temperature 0.8, top-k 50, top-p 0.9, 512 tokens.
EVALUATION_SAMPLING = Sampling(temperature=0.8, top_k=50, top_p=0.9, max_new_tokens=512)

def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text fed to the model: the chat template with a generation prompt, else the plain prompt text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def adds_special_tokens(tokenizer: Any) -> bool:
    """Whether to let the tokenizer add its special tokens (bos) to a rendered prompt: a chat template
    already writes them into the text, a plain prompt needs them."""
    return not getattr(tokenizer, "chat_template", None)


def sample_texts(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], sampling: Sampling, seeds: Sequence[int], *, n: int = 1,
    batch_size: int = 8, progress: bool = True,
) -> list[list[str]]:
    """``n`` completions per prompt from an in-memory causal LM (batched, left-padded, on the model's device);
    ``seeds[i]`` seeds prompt i."""
    import torch
    from tqdm.auto import tqdm

    if len(seeds) != len(prompts):
        raise ValueError(f"one seed per prompt: got {len(seeds)} seeds for {len(prompts)} prompts")
    if n < 1:
        raise UserValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise UserValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserValueError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_prompt(tokenizer, p) for p in prompts]
    special = adds_special_tokens(tokenizer)
    # Longest first, so that each batch holds prompts of similar length (less padding); order restored below.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    outputs: list[list[str]] = [[] for _ in texts]
    with _left_padding(tokenizer), _eval_mode(model), torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=special)
            # Rows are expanded here rather than with num_return_sequences, which greedy decoding refuses.
            enc = {key: value.repeat_interleave(n, dim=0).to(model.device) for key, value in enc.items()}
            row_seeds = [derived_seed(seeds[i], j) for i in idx for j in range(n)]
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=1.0, logits_processor=_logits_processors(sampling, row_seeds, model.device),
            )
            decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for k, i in enumerate(idx):
                outputs[i] = [text.strip() for text in decoded[k * n:(k + 1) * n]]
    return outputs


def _logits_processors(sampling: Sampling, row_seeds: Sequence[int], device: Any) -> Any:
    """Repetition penalty, then (unless greedy) temperature, top-k, top-p and per-row Gumbel noise."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors: list[Any] = []
    if sampling.repetition_penalty != 1:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        if sampling.temperature != 1:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1:
            processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(_RowGumbelNoise(row_seeds, device))
    return LogitsProcessorList(processors)


class _RowGumbelNoise:
    """Adds standard Gumbel noise ``-log(-log U)`` to every row's scores, from a generator seeded per row;
    the greedy argmax over the noisy scores is then a sample of the softmax of the scores."""

    def __init__(self, row_seeds: Sequence[int], device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in row_seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        uniform = torch.stack([
            torch.rand(scores.shape[-1], generator=g, device=self.device, dtype=torch.float32)
            for g in self.generators
        ])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores + gumbel.to(device=scores.device, dtype=scores.dtype)


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    """Left padding (generation continues from the right end of every row) for the block only: a fast
    tokenizer's backend keeps, and ``save_pretrained`` writes, the last padding it used, so that is restored too."""
    padding_side = tokenizer.padding_side
    backend = getattr(tokenizer, "backend_tokenizer", None)
    backend_padding = backend.padding if backend is not None else None
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = padding_side
        if backend is not None:
            if backend_padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**backend_padding)


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Generator(Protocol):
    def generate(self, prompts: Sequence[Prompt], n: int, seeds: Sequence[int]) -> list[list[str]]:
        """``n`` completions per prompt; ``seeds[i]`` seeds prompt i."""
        ...


class TransformersGenerator:
    """``sample_texts`` with a model loaded by ``AutoModelForCausalLM`` (default dtype: bfloat16 on cuda,
    float32 on cpu; else a torch dtype name or ``"auto"`` for the checkpoint's); ``trust_remote_code``:
    ``dora_engine.hf_loading``."""

    def __init__(self, model: str, sampling: Sampling, *, batch_size: int = 8, device: str | None = None,
                 dtype: str | None = None, progress: bool = False, trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise UserValueError(f"batch_size must be >= 1, got {batch_size}")
        device = resolve_device(device)
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        self.tokenizer = load_pretrained(AutoTokenizer, model, trust_remote_code=trust_remote_code)
        self.model = load_pretrained(AutoModelForCausalLM, model, trust_remote_code=trust_remote_code,
                                     dtype=dtype).to(device)
        self.sampling = sampling
        self.batch_size = batch_size
        self.progress = progress

    def generate(self, prompts: Sequence[Prompt], n: int, seeds: Sequence[int]) -> list[list[str]]:
        return sample_texts(self.model, self.tokenizer, prompts, self.sampling, seeds, n=n,
                            batch_size=self.batch_size, progress=self.progress)


@dataclass(frozen=True)
class VLLMOptions:
    """vLLM engine settings: ``tensor_parallel_size`` GPUs per model, the share of each GPU's memory the
    engine may take (weights + KV cache), and the context length (prompt + completion; ``None``: the
    model's own, which may not fit the KV cache of a long-context model on one GPU)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise UserValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UserValueError(f"gpu_memory_utilization must lie in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise UserValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and the vLLM engine flags (``VLLMOptions``), read back by ``vllm_options``."""
    parser.add_argument("--backend", choices=GENERATION_BACKENDS, default="transformers")
    group = parser.add_argument_group("vllm backend")
    group.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                       help=f"GPUs per model (default: {VLLMOptions.tensor_parallel_size})")
    group.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                       help=f"share of each GPU's memory vLLM may use (default: {VLLMOptions.gpu_memory_utilization})")
    group.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                       help="context length, prompt + completion (default: the model's)")


def vllm_options(args: argparse.Namespace) -> VLLMOptions | None:
    """The ``VLLMOptions`` of parsed ``add_backend_arguments`` flags (``None`` for the transformers backend,
    which refuses them)."""
    given = {name: getattr(args, name) for name in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")
             if getattr(args, name) is not None}
    if args.backend != "vllm":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UserValueError(f"{flags} apply to --backend vllm only")
        return None
    return VLLMOptions(**given)


def vllm_load_format(model: str) -> str:
    """vLLM's weight format for ``model``: the safetensors shards (only those the HF index lists, never a
    Mistral ``consolidated.safetensors``), except a local folder without safetensors files (``auto``: its
    ``.bin`` files)."""
    if os.path.isdir(model) and not any(Path(model).glob("*.safetensors")):
        return "auto"
    return "safetensors"


class VLLMGenerator:
    """Sampling with vLLM (``pip install 'dora-engine[generate]'``); each request seeded with its prompt's seed."""

    def __init__(self, model: str, sampling: Sampling, *, dtype: str | None = None,
                 options: VLLMOptions | None = None, progress: bool = False, trust_remote_code: bool = False) -> None:
        refuse_remote_code(model, trust_remote_code)
        try:
            import vllm
        except ImportError as err:
            raise UserImportError(
                f"backend 'vllm' was requested but vllm cannot be imported ({err}); install it with "
                "`pip install 'dora-engine[generate]'` or use backend 'transformers'"
            ) from None
        options = options or VLLMOptions()
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model, dtype=dtype or "auto", tokenizer_mode="hf", config_format="hf",
            load_format=vllm_load_format(model), tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
            trust_remote_code=trust_remote_code,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = sampling
        self.progress = progress

    def generate(self, prompts: Sequence[Prompt], n: int, seeds: Sequence[int]) -> list[list[str]]:
        s = self.sampling
        params = [
            self._vllm.SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
                                      repetition_penalty=s.repetition_penalty, max_tokens=s.max_new_tokens, seed=seed)
            for seed in seeds
        ]
        special = adds_special_tokens(self.tokenizer)
        # Token ids, so that a templated prompt does not get a second bos.
        token_ids = [self.tokenizer(render_prompt(self.tokenizer, p), add_special_tokens=special)["input_ids"]
                     for p in prompts]
        requests = [{"prompt_token_ids": ids} for ids in token_ids]
        results = self.llm.generate(requests, params, use_tqdm=self.progress)
        return [[o.text.strip() for o in r.outputs] for r in results]


def make_generator(model: str, sampling: Sampling, *, backend: str = "transformers", batch_size: int = 8,
                   device: str | None = None, dtype: str | None = None, vllm: VLLMOptions | None = None,
                   progress: bool = False, trust_remote_code: bool = False) -> Generator:
    """A generator for ``model`` (a local folder or hub id) on ``backend`` (see ``GENERATION_BACKENDS``);
    ``vllm`` holds the vLLM engine's settings (vllm backend only); ``trust_remote_code``:
    ``dora_engine.hf_loading``."""
    if backend == "transformers":
        if vllm is not None:
            raise UserValueError("vLLM options apply to backend 'vllm' only")
        return TransformersGenerator(model, sampling, batch_size=batch_size, device=device, dtype=dtype,
                                     progress=progress, trust_remote_code=trust_remote_code)
    if backend == "vllm":
        return VLLMGenerator(model, sampling, dtype=dtype, options=vllm, progress=progress,
                             trust_remote_code=trust_remote_code)
    raise UserValueError(f"unknown backend {backend!r}; valid backends: {', '.join(GENERATION_BACKENDS)}")
