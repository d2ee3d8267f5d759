"""The DeepSpeed JSON config: loaded from ``deepspeed`` (path or dict) and completed from ``train``.

Batch sizes, gradient accumulation, clipping and precision are owned by the YAML config; the JSON
carries the ZeRO settings (stage 3, offload, bucket sizes) and optionally an ``optimizer`` section.
Without one the trainer uses ``torch.optim.AdamW`` (nothing to compile, so it runs on CPU too).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from dora_engine.training.config import ConfigError, TrainingConfig

# The settings of launch/zero3.json: ZeRO-3 with parameters and optimizer states partitioned.
DEFAULT_DEEPSPEED: dict[str, Any] = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
        "stage3_prefetch_bucket_size": 5e7,
        "stage3_param_persistence_threshold": 1e5,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}

#: ``zero_optimization.reduce_bucket_size`` (elements) of a world of one under the default settings: ZeRO-3
#: gathers gradients in that bucket to reduce them across ranks, and a rank alone reduces nothing, so
#: launch/zero3.json's 5e7 (191 MiB in fp32) would be memory only (docs/design.md section 5.7).
SINGLE_RANK_BUCKET = 5_000_000

OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_prompts × world × train.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "train.micro_batch_prompts",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.max_grad_norm",
    "scheduler": "train.schedule",
}


def resolve_precision(precision: str) -> str:
    """``auto`` is bf16 on a GPU that computes in bf16 natively (compute capability 8.0 on) and fp32
    elsewhere: on CPU, and on GPUs that only emulate bf16 (T4, V100), slower than fp32 there."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and _bf16_native() else "fp32"


def _bf16_native() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch before the argument: bf16 is native from compute capability 8.0 (and on ROCm)
        return torch.version.hip is not None or torch.cuda.get_device_capability()[0] >= 8


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_deepspeed_config(source: str | dict[str, Any] | None) -> dict[str, Any]:
    if source is None:
        return copy.deepcopy(DEFAULT_DEEPSPEED)
    if isinstance(source, dict):
        return copy.deepcopy(source)
    try:
        return json.loads(Path(source).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"config key 'deepspeed': {source} is not valid JSON ({err})") from None


def build_deepspeed_config(cfg: TrainingConfig, world_size: int) -> dict[str, Any]:
    """The JSON passed to ``deepspeed.initialize``; keys the YAML owns must be absent or ``"auto"``. The
    default settings in a world of one take ``SINGLE_RANK_BUCKET``."""
    ds = load_deepspeed_config(cfg.deepspeed)
    if cfg.deepspeed is None and world_size == 1:
        ds["zero_optimization"]["reduce_bucket_size"] = SINGLE_RANK_BUCKET
    for key, owner in OWNED_KEYS.items():
        if key in ds and ds[key] != "auto":
            raise ConfigError(f"config key 'deepspeed': remove {key!r} from the DeepSpeed JSON; it is set by {owner}")
    t = cfg.train
    precision = resolve_precision(t.precision)
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_prompts,
        gradient_accumulation_steps=t.grad_accum_steps,
        train_batch_size=t.micro_batch_prompts * world_size * t.grad_accum_steps,
        gradient_clipping=t.max_grad_norm,
        steps_per_print=1 << 30,
        wall_clock_breakdown=False,
    )
    ds.pop("scheduler", None)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16", **({"initial_scale_power": 16} if precision == "fp16" else {})}
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", t.lr), ("weight_decay", t.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
        if not torch.cuda.is_available():
            params["torch_adam"] = True  # DeepSpeed's fused/CPU Adam would need compiling
    return ds
