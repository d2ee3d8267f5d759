"""Final Hugging Face export: a ``from_pretrained``-loadable directory with config and tokenizer.

The ZeRO-3 partitions are gathered into one 16-bit (or fp32, as trained) state dict on rank 0, module
by module. LoRA adapters are merged into their base weights (W + (α/r)·B·A) so the export is a plain
model. The directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from dora_engine.atomic import give_default_modes, temporary_dir

WRAPPER_PREFIX = "model."  # PolicyLoss keeps the causal LM in its ``model`` attribute
PEFT_PREFIX = "base_model.model."


def gathered_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere). Every rank must call it."""
    # DeepSpeed's own consolidation (the one save_16bit_model uses) gathers one module at a time.
    state = engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank != 0:
        return None
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}


def merge_lora(state: dict[str, torch.Tensor], alpha: float, r: int) -> dict[str, torch.Tensor]:
    """Fold LoRA weights into their base layers and drop the PEFT prefixes."""
    scale = alpha / r
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if ".base_layer." in name:
            stem = key.split(".base_layer.")[0]
            name = name.replace(".base_layer.", ".")
            if key.endswith(".weight"):
                a, b = state[f"{stem}.lora_A.default.weight"], state[f"{stem}.lora_B.default.weight"]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        merged[name] = value
    return merged


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value.contiguous()
        seen.add(ptr)
    return out


def write_export(
    destination: Path, state: dict[str, torch.Tensor], model_config: Any, tokenizer: Any, run_config: dict
) -> Path:
    """Write config, weights (safetensors), tokenizer and the run's config, then rename into place."""
    from safetensors.torch import save_file

    tmp = temporary_dir(destination)
    try:
        model_config.save_pretrained(tmp)
        save_file(untie(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "dora_training.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False), encoding="utf-8")
        give_default_modes(tmp)
        old = None
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}.tmp")
            os.replace(destination, old)
        os.replace(tmp, destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination
