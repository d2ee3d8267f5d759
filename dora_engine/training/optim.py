"""The optimizer and learning-rate schedule of a run (``launch/README.md``: ``train.lr``, ``train.schedule``,
``train.warmup_steps``, ``train.weight_decay``), and its length in optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dora_engine.training.config import TrainConfig
from dora_engine.training.data import Sampler


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step s: linear warmup, then constant/linear/cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def total_steps(train: TrainConfig, sampler: Sampler) -> int:
    """Optimizer steps of a run: ``train.max_steps``, else its epochs' worth of the sampler's steps."""
    return train.max_steps or train.epochs * sampler.steps_per_epoch


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """The optimizer a run uses when the DeepSpeed config names none: AdamW at the peak lr, torch's fused
    kernel (CPU and CUDA). Under ZeRO-3 its parameter is one flat partition of all the weights, and the
    unfused update makes two temporaries of that size (√v and √v / c + ε); the fused one makes none."""
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)


def build_schedule(
    optimizer: torch.optim.Optimizer, train: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of a run of ``total`` optimizer steps (``lr_lambda``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train.schedule, train.warmup_steps, total))
