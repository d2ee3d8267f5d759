"""The library warnings a training run silences, all of them here, each with why it is safe to.

Only warnings that are understood and that the project cannot act on are silenced, each matched by its
category and the start of its message; every other warning still shows.
"""

from __future__ import annotations

import warnings

UNDERSTOOD = (
    # DeepSpeed ZeRO-3 gathers partitioned parameters and reduce-scatters gradients with these two
    # torch.distributed collectives, which torch has renamed. The call sites are DeepSpeed's
    # (deepspeed.comm), not this project's, and the deprecated names still run the same collectives in
    # the supported torch versions; the warning repeats on every run and says nothing about the run.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    # peft (LoRA) reads `model.is_gradient_checkpointing`, which transformers has renamed to
    # `is_activation_checkpointing`; the old name is an alias that returns the same value, so the
    # gradient-checkpointing setting peft sees is right.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


def silence_understood_warnings() -> None:
    """Ignore the ``UNDERSTOOD`` warnings in this process (idempotent: filters already present are kept once)."""
    for category, message in UNDERSTOOD:
        warnings.filterwarnings("ignore", message=message, category=category)
