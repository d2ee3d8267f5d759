"""A learnable toy for the training tests: a word-level tokenizer, a tiny random Llama and data.

Each prompt is a few words; the best response repeats the prompt, the others are random words, so a
policy can learn to prefer the best one within a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

WORDS = [f"w{i}" for i in range(24)]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer(directory: Path) -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.save_pretrained(directory)
    return tok


def build_model(directory: Path, vocab_size: int, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(directory)


def make_records(n: int, K: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = rng.sample(WORDS, 3)
        responses = [{"text": " ".join(prompt), "source": "chosen", "score": 1.0}]
        for k in range(1, K):
            responses.append({"text": " ".join(rng.sample(WORDS, 3)), "source": f"synthetic{k}",
                              "score": round(1.0 - k / K, 3)})
        records.append({"id": f"toy-{i}", "prompt": " ".join(prompt), "responses": responses,
                        "h_tilde": round(rng.uniform(0.5, 1.5), 3)})
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_toy(root: Path, *, n_records: int = 16, K: int = 3, overrides: dict | None = None) -> Path:
    """Model, tokenizer, data and a config under ``root``; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        tok = build_tokenizer(model_dir)
        build_model(model_dir, len(tok))
    train = write_jsonl(root / "train.jsonl", make_records(n_records, K, seed=0))
    config = {
        "stage": "align",
        "model": {"path": str(model_dir)},
        "data": {"train": [str(train)], "max_prompt_tokens": 8, "max_response_tokens": 8,
                 "ref_cache_dir": str(root / "ref_cache")},
        "loss": {"name": "dpo", "params": {"beta": 0.5}},
        "robust": {"strategy": "dora", "lam": 1.0},
        "train": {"micro_batch_prompts": 2, "grad_accum_steps": 1, "lr": 0.02, "schedule": "constant",
                  "max_steps": 6, "seed": 3, "backend": "reference"},
        "logging": {"tensorboard": "off"},
        "checkpoint": {"every": 0},
        "output_dir": str(root / "run"),
    }
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def resume_tag(run_dir: Path) -> str:
    """The checkpoint that ``--resume auto`` takes in ``run_dir``: the newest complete one that verifies."""
    from dora_engine.training.checkpoint import CheckpointManager, Ranks

    chosen = CheckpointManager(run_dir / "checkpoints", keep=1, ranks=Ranks()).choose("auto", say=print)
    assert chosen is not None, f"no checkpoint in {run_dir}"
    return chosen[0]
