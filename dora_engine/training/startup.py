"""What a run does before its first step, after its data are loaded (docs/design.md sections 6-7):
remove what interrupted writes left, check the data against the batch sizes, choose and check the
checkpoint to resume from, and build the policy's DeepSpeed engine. ``Trainer.from_config`` calls these
in order."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dora_engine.atomic import remove_stale_temporaries
from dora_engine.errors import TrainingError
from dora_engine.losses import ResolvedObjective
from dora_engine.training.checkpoint import (
    CheckpointManager,
    check_resumable,
    check_same_data,
    data_hashes,
    written_world_size,
)
from dora_engine.training.config import TrainingConfig
from dora_engine.training.data import Sampler
from dora_engine.training.dsconfig import torch_dtype
from dora_engine.training.loading import RunData, data_cache_dir
from dora_engine.training.model import LossPath, PolicyLoss, load_causal_lm
from dora_engine.training.optim import build_optimizer, build_schedule
from dora_engine.training.process_group import Ranks

SHARED_TEMPORARY_AGE_S = 600.0  # a temporary in a folder other runs may share is stale after this long


def say(ranks: Ranks, message: str) -> None:
    """A progress line, printed once (rank 0)."""
    if ranks.main:
        print(f"[dora-engine] {message}", flush=True)


def remove_run_temporaries(cfg: TrainingConfig) -> None:
    """Remove what killed writes of an earlier run left under our temporary names (``dora_engine.atomic``):
    everything in the run's own folders, only old ones in a cache other runs may share (section 7.4)."""
    output_dir = Path(cfg.output_dir)
    checkpoints = output_dir / "checkpoints"
    folders = [(output_dir, 0.0), (checkpoints, 0.0)]
    if checkpoints.is_dir():
        folders += [(p, 0.0) for p in checkpoints.iterdir() if p.is_dir()]
    if cfg.data.ref_cache_dir:
        folders.append((Path(cfg.data.ref_cache_dir), SHARED_TEMPORARY_AGE_S))
    else:
        folders.append((output_dir / "ref_cache", 0.0))
    # Tokenised data: other ranks of this run may be building there already, and other runs may share it.
    folders.append((data_cache_dir(cfg), SHARED_TEMPORARY_AGE_S))
    removed = [p for folder, age in folders for p in remove_stale_temporaries(folder, older_than_s=age)]
    if removed and os.environ.get("RANK", "0") == "0":
        names = ", ".join(str(p) for p in removed[:3]) + (f" and {len(removed) - 3} more" if removed[3:] else "")
        print(f"[dora-engine] removed {len(removed)} temporary file(s) of interrupted writes: {names}", flush=True)


def check_sizes(cfg: TrainingConfig, data: RunData, sampler: Sampler, world: int) -> None:
    """Enough data for one optimizer step and, with data.eval, one evaluation batch."""
    if sampler.steps_per_epoch == 0:
        raise TrainingError(
            f"data.train has {len(data.train)} examples, fewer than one optimizer step uses "
            f"(train.micro_batch_prompts × world size × train.grad_accum_steps = {sampler.prompts_per_step})"
        )
    per_eval = cfg.train.micro_batch_prompts * world
    if data.eval is not None and len(data.eval) < per_eval:
        raise TrainingError(
            f"data.eval has {len(data.eval)} examples, fewer than one evaluation batch "
            f"(train.micro_batch_prompts × world size = {per_eval})"
        )


def choose_checkpoint(cfg: TrainingConfig, checkpoints: CheckpointManager, ranks: Ranks, data: RunData) -> str | None:
    """The verified checkpoint tag to resume from (None: a fresh start), checked against this run's
    world size, config and data content before anything heavy starts (section 7.5)."""
    wanted = cfg.checkpoint.resume
    if wanted is None:
        return None
    chosen = checkpoints.choose(wanted, lambda message: say(ranks, message))
    if chosen is None:
        say(ranks, f"no checkpoint in {checkpoints.directory}; starting from step 0")
        return None
    tag, meta = chosen
    path = checkpoints.directory / tag
    written = written_world_size(path, meta)
    if written != ranks.world:
        raise TrainingError(
            f"checkpoint {path} was written by {written} rank(s) and this run has {ranks.world}; ZeRO-3 keeps "
            f"one optimizer shard per rank, so resume it with {written} rank(s) (dora-engine train --num-procs "
            f"{written}, or deepspeed --num_gpus {written})"
        )
    if isinstance(meta.get("config"), dict):
        check_resumable(tag, meta["config"], cfg.to_dict())
    changed = check_same_data(tag, meta.get("data"), data_hashes(data.train, data.eval),
                              cfg.checkpoint.allow_data_change)
    if changed:
        say(ranks, f"warning: {changed}")
    return tag


def run_objective(cfg: TrainingConfig, data: RunData, ranks: Ranks) -> ResolvedObjective:
    """The run's objective. Under ``robust.h_scale: dataset`` (with a strategy that reads h̃) its c is the
    mean h̃ over every record of data.train, the same on every rank (each holds all of data.train), and
    serves data.eval too; it is printed once (docs/design.md section 4.3)."""
    if cfg.h_scale != "dataset":
        return cfg.objective()
    h_mean = data.train.mean_h_tilde()
    say(ranks, f"robust.h_scale dataset: h̃ divided by its mean over data.train, c = {h_mean:.6g} "
               f"({len(data.train)} records)")
    return cfg.objective(h_mean)


def build_policy_engine(
    cfg: TrainingConfig, objective: ResolvedObjective, ds_config: dict[str, Any], precision: str, total_steps: int
) -> tuple[Any, Any, Any]:
    """The policy (``PolicyLoss`` around the model, LoRA-wrapped when enabled, training ``objective``) under
    DeepSpeed ZeRO-3, with the run's optimizer and schedule; returns (engine, lr scheduler, the
    ``HfDeepSpeedConfig`` to keep)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # While this object lives, from_pretrained partitions the weights across ranks as it loads them.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = load_causal_lm(
        cfg.model.path, torch_dtype(precision), trust_remote_code=cfg.model.trust_remote_code,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )
    if cfg.lora.enabled:
        from dora_engine.training.model import add_lora

        model = add_lora(model, cfg.lora)
    module = PolicyLoss(model, objective, stage=cfg.stage, path=LossPath.of(cfg.train))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = None if "optimizer" in ds_config else build_optimizer(params, cfg.train)

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return build_schedule(opt, cfg.train, total_steps)

    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=module, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
    )
    share_fp32_master(engine.optimizer)
    return engine, lr_scheduler, hf_ds_config


def share_fp32_master(optimizer: Any) -> int:
    """Make the fp32 master partitions of a ZeRO-3 optimizer the weight partitions themselves wherever
    those are fp32 already (``train.precision: fp32``, nothing offloaded); returns the bytes this frees.

    DeepSpeed (0.19) means to skip the master copy then ("we don't need another copy of the weights",
    ``stage3.py``) but compares the partition's ``torch.device`` with the accelerator's device *name*, a
    string, which are never equal: it keeps a clone, one more copy of every weight, and copies it back
    into the partition after each step. Pointing the master tensor at the partition's storage keeps the
    tensor object the optimizer holds (its state is keyed by it) and the values (the clone equals the
    partition); the copy back after each step is then a copy onto itself, which DeepSpeed allows for.
    Anything else (bf16/fp16 weights, offload, NVMe swapping, another optimizer class) is left alone."""
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    weights = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if not masters or not weights or getattr(optimizer, "offload_optimizer", False):
        return 0
    freed = 0
    for master, weight in zip(masters, weights, strict=True):
        if (weight is None or master.data_ptr() == weight.data_ptr() or master.dtype != weight.dtype
                or master.device != weight.device or master.shape != weight.shape):
            continue
        freed += master.numel() * master.element_size()
        master.data = weight.data
    return freed


def offload_summary(engine: Any) -> str | None:
    """What the built ZeRO-3 optimizer offloads and where, e.g. ``optimizer state to cpu, parameters to cpu``
    (read from the optimizer DeepSpeed made, which is what runs, rather than from the config); None
    when nothing is offloaded."""
    optimizer = getattr(engine, "optimizer", None)
    parts = []
    for flag, what, config in (
        ("offload_optimizer", "optimizer state", engine.zero_offload_optimizer()),
        ("offload_param", "parameters", engine.zero_offload_param()),
    ):
        if getattr(optimizer, flag, False):
            device = getattr(config, "device", "cpu")
            parts.append(f"{what} to {getattr(device, 'value', device)}")
    return ", ".join(parts) or None
