"""The DeepSpeed ZeRO-3 trainer for the ``sft`` and ``align`` stages (docs/design.md sections 5-7).

One optimizer step = ``train.grad_accum_steps`` micro-steps; each micro-step is one batch 𝓑 of
Algorithm 1: every rank forwards ``train.micro_batch_prompts`` whole prompts (K responses each) and
``dora_loss`` reduces the robust objective over the micro-step's prompts on all ranks. Order of work:
config and data are checked first (bad input fails before anything heavy starts), then the process
group, the checkpoint to resume from (verified, docs/design.md section 7.5), the reference log-probs
(computed once, cached), the policy engine, and the loop. SIGTERM or SIGINT stops the loop after the
current optimizer step with a checkpoint (section 6); a second SIGINT stops at once.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.atomic import remove_stale_temporaries
from dora_engine.errors import TrainingError
from dora_engine.training.checkpoint import CheckpointManager, config_differences, written_world_size
from dora_engine.training.config import TrainingConfig
from dora_engine.training.data import Sampler, check_token_range, collate
from dora_engine.training.dsconfig import build_deepspeed_config, resolve_precision, torch_dtype
from dora_engine.training.loading import data_cache_dir, load_data
from dora_engine.training.metrics import MetricsWriter, StepAccumulator, align_stats, peak_memory_bytes
from dora_engine.training.model import PolicyLoss, StepOutput, load_causal_lm, load_tokenizer, model_vocab_size
from dora_engine.training.optim import build_optimizer, build_schedule, total_steps
from dora_engine.training.plots import plot_metrics
from dora_engine.training.process_group import init_distributed
from dora_engine.training.ref_logps import ensure_reference
from dora_engine.training.signals import StopSignals

# Config keys a resumed run may change without breaking the identical continuation.
RESUMABLE_CHANGES = ("logging", "checkpoint", "output_dir", "train.max_steps", "train.epochs", "train.eval_every",
                     "data.cache_dir", "data.num_proc")
ZERO_GRAD_STEPS = 3  # applied steps in a row with a grad norm of exactly 0 before a warning
SHARED_TEMPORARY_AGE_S = 600.0  # a temporary in a folder other runs may share is stale after this long


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


class Trainer:
    """Builds everything from a ``TrainingConfig`` and runs the loop; ``run()`` returns the exit code."""

    def __init__(self, cfg: TrainingConfig, *, progress: bool = True, stop: StopSignals | None = None):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.progress = progress
        self.stop = stop if stop is not None else StopSignals()
        self.precision = resolve_precision(cfg.train.precision)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            self._remove_stale_temporaries()
        # 1. Everything that can be wrong with the input, before any process group or model.
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.train_data = load_data(cfg, self.tokenizer, cfg.data.train, progress)
        self.eval_data = (load_data(cfg, self.tokenizer, cfg.data.eval, progress, self.train_data)
                          if cfg.data.eval else None)
        vocab = model_vocab_size(cfg.model.path)
        check_token_range(self.train_data, vocab, "data.train")
        if self.eval_data is not None:
            check_token_range(self.eval_data, vocab, "data.eval")
        # 2. Processes, sampler, reference log-probs.
        self.dist = init_distributed()
        self.sampler = Sampler(
            len(self.train_data), cfg.train.micro_batch_prompts, self.dist.world, cfg.train.grad_accum_steps,
            cfg.train.seed,
        )
        self._check_sizes()
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", keep=cfg.checkpoint.keep, ranks=self.dist)
        self.resume_tag = self._choose_checkpoint()
        self.ds_config = build_deepspeed_config(cfg, self.dist.world)
        self.ref_train = self.ref_eval = None
        if cfg.needs_reference:
            self.ref_train = ensure_reference(cfg, self.train_data, self.ds_config, self.dist, self.pad_id, progress)
            if self.eval_data is not None:
                self.ref_eval = ensure_reference(cfg, self.eval_data, self.ds_config, self.dist, self.pad_id, progress)
        # 3. The policy engine.
        torch.manual_seed(cfg.train.seed)
        self.engine, self.lr_scheduler, self.hf_ds_config = self._build_engine()
        offloaded = offload_summary(self.engine)
        if offloaded:
            self._say(f"ZeRO-3 offload active: {offloaded}")

    # ---------------------------------------------------------------------------------------- setup

    @property
    def stop_signal(self) -> str | None:
        """Why the run stops after the current step (a signal's name), None while it goes on."""
        return self.stop.received

    @stop_signal.setter
    def stop_signal(self, reason: str) -> None:
        self.stop.received = reason

    @property
    def total_steps(self) -> int:
        return total_steps(self.cfg.train, self.sampler)

    def _remove_stale_temporaries(self) -> None:
        """Remove what killed writes of an earlier run left under our temporary names (``dora_engine.atomic``):
        everything in the run's own folders, only old ones in a reference cache other runs may share."""
        checkpoints = self.output_dir / "checkpoints"
        folders = [(self.output_dir, 0.0), (checkpoints, 0.0)]
        if checkpoints.is_dir():
            folders += [(p, 0.0) for p in checkpoints.iterdir() if p.is_dir()]
        if self.cfg.data.ref_cache_dir:
            folders.append((Path(self.cfg.data.ref_cache_dir), SHARED_TEMPORARY_AGE_S))
        else:
            folders.append((self.output_dir / "ref_cache", 0.0))
        # Tokenised data: other ranks of this run may be building there already, and other runs may share it.
        folders.append((data_cache_dir(self.cfg), SHARED_TEMPORARY_AGE_S))
        removed = [p for folder, age in folders for p in remove_stale_temporaries(folder, older_than_s=age)]
        if removed and os.environ.get("RANK", "0") == "0":
            names = ", ".join(str(p) for p in removed[:3]) + (f" and {len(removed) - 3} more" if removed[3:] else "")
            print(f"[dora-engine] removed {len(removed)} temporary file(s) of interrupted writes: {names}", flush=True)

    def _choose_checkpoint(self) -> str | None:
        """The verified checkpoint tag to resume from (None: a fresh start), checked against this run's
        world size and config before anything heavy starts."""
        wanted = self.cfg.checkpoint.resume
        if wanted is None:
            return None
        chosen = self.checkpoints.choose(wanted, self._say)
        if chosen is None:
            self._say(f"no checkpoint in {self.checkpoints.directory}; starting from step 0")
            return None
        tag, meta = chosen
        path = self.checkpoints.directory / tag
        written = written_world_size(path, meta)
        if written != self.dist.world:
            raise TrainingError(
                f"checkpoint {path} was written by {written} rank(s) and this run has {self.dist.world}; ZeRO-3 keeps "
                f"one optimizer shard per rank, so resume it with {written} rank(s) (dora-engine train --num-procs "
                f"{written}, or deepspeed --num_gpus {written})"
            )
        if isinstance(meta.get("config"), dict):
            self._check_config(tag, meta["config"])
        return tag

    def _check_config(self, tag: str, saved: dict[str, Any]) -> None:
        changed = [k for k in config_differences(saved, self.cfg.to_dict()) if not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise TrainingError(
                f"checkpoint {tag} was written with a different configuration ({', '.join(changed)}); "
                "resuming would not continue the same run"
            )

    def _check_sizes(self) -> None:
        if self.sampler.steps_per_epoch == 0:
            raise TrainingError(
                f"data.train has {len(self.train_data)} examples, fewer than one optimizer step uses "
                f"(train.micro_batch_prompts × world size × train.grad_accum_steps = {self.sampler.prompts_per_step})"
            )
        per_eval = self.cfg.train.micro_batch_prompts * self.dist.world
        if self.eval_data is not None and len(self.eval_data) < per_eval:
            raise TrainingError(
                f"data.eval has {len(self.eval_data)} examples, fewer than one evaluation batch "
                f"(train.micro_batch_prompts × world size = {per_eval})"
            )

    def _build_engine(self) -> tuple[Any, Any, Any]:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        cfg = self.cfg
        # While this object lives, from_pretrained partitions the weights across ranks as it loads them.
        hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = load_causal_lm(
            cfg.model.path, torch_dtype(self.precision), gradient_checkpointing=cfg.train.gradient_checkpointing
        )
        if cfg.lora.enabled:
            from dora_engine.training.model import add_lora

            model = add_lora(model, cfg.lora)
        module = PolicyLoss(model, cfg)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in self.ds_config else build_optimizer(params, cfg.train)

        def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return build_schedule(opt, cfg.train, self.total_steps)

        engine, _, _, lr_scheduler = deepspeed.initialize(
            model=module, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler,
            config=self.ds_config,
        )
        return engine, lr_scheduler, hf_ds_config

    def _resume(self) -> dict[str, Any]:
        """Client state of the checkpoint to resume from, or a fresh start's."""
        fresh = {"step": 0, "consumed_prompts": 0, "skipped_steps": 0, "consecutive_skips": 0}
        tag = self.resume_tag
        if tag is None:
            return fresh
        state = self.checkpoints.load(self.engine, tag)
        self._check_config(tag, state["config"])
        if state["consumed_prompts"] % self.sampler.prompts_per_step:
            raise TrainingError(
                f"checkpoint {tag} consumed {state['consumed_prompts']} prompts, not a multiple of this run's "
                f"{self.sampler.prompts_per_step} prompts per step (world size changed?)"
            )
        state["step"] = state["consumed_prompts"] // self.sampler.prompts_per_step
        self._say(f"resumed from {self.checkpoints.directory / tag} at step {state['step']}")
        return state

    # ---------------------------------------------------------------------------------------- loop

    def _say(self, message: str) -> None:
        if self.dist.main:
            print(f"[dora-engine] {message}", flush=True)

    def _warn(self, message: str) -> None:
        if self.dist.main:
            print(f"[dora-engine] warning: {message}", file=sys.stderr, flush=True)

    def _device_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device) for k, v in batch.items()}

    def train_step(self, step: int) -> tuple[dict[str, float], bool]:
        """One optimizer step; returns the global metrics and whether DeepSpeed applied the update."""
        started = time.perf_counter()
        lr = self.lr_scheduler.get_last_lr()[0]
        acc = StepAccumulator()
        self.engine.train()
        for indices in self.sampler.step_indices(step, self.dist.rank):
            batch = self._device_batch(collate(self.train_data, indices, pad_id=self.pad_id, ref_logps=self.ref_train))
            out: StepOutput = self.engine(**batch)
            loss = out.loss
            if not torch.isfinite(out.value):
                # The value is global, so every rank takes this branch: NaN gradients make DeepSpeed's
                # overflow check discard the whole accumulated step on all ranks.
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            acc.add(out, int(batch["attention_mask"].sum()), self._stats(out, batch))
        applied = bool(self.engine.was_step_applied()) and all(math.isfinite(x) for x in acc.losses)
        metrics, stop = acc.reduce(self.stop_signal is not None)
        if stop and self.stop_signal is None:
            self.stop_signal = "SIGTERM (another rank)"
        elapsed = time.perf_counter() - started
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update(
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
            tokens_per_s=metrics.pop("tokens") / elapsed,
            step_time_s=elapsed,
            mem_peak=peak_memory_bytes(self.engine.device),
        )
        return metrics, applied

    def _stats(self, out: StepOutput, batch: dict[str, torch.Tensor]) -> dict | None:
        if self.cfg.stage != "align":
            return None
        return align_stats(out, batch, self.cfg.loss.name, self.cfg.loss_params)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics of data.eval, prefixed ``eval/``; the remainder of a batch of micro × world is dropped."""
        data, micro, world = self.eval_data, self.cfg.train.micro_batch_prompts, self.dist.world
        acc = StepAccumulator()
        self.engine.eval()
        for lo in range(0, len(data) - micro * world + 1, micro * world):
            indices = list(range(lo + self.dist.rank * micro, lo + (self.dist.rank + 1) * micro))
            batch = self._device_batch(collate(data, indices, pad_id=self.pad_id, ref_logps=self.ref_eval))
            out = self.engine(**batch)
            acc.add(out, int(batch["attention_mask"].sum()), self._stats(out, batch))
        metrics, _ = acc.reduce(False)
        metrics.pop("tokens")
        return {f"eval/{k}": v for k, v in metrics.items()}

    def run(self) -> int:
        """Train to the end, or until a stop signal (module docstring); returns the exit code."""
        with self.stop.installed():
            return self._loop()

    def _loop(self) -> int:
        from tqdm.auto import tqdm

        state = self._resume()
        step, skipped, in_a_row = state["step"], state["skipped_steps"], state["consecutive_skips"]
        writer = MetricsWriter(self.output_dir, self.cfg.logging, self.cfg.to_dict(), step) if self.dist.main else None
        show = self.progress and self.dist.main
        bar = tqdm(total=self.total_steps, initial=step, desc=self.cfg.stage, disable=not show)
        first_step = last_saved = step
        zero_norms = 0
        client = self._client_state(step, skipped, in_a_row)
        try:
            while step < self.total_steps and self.stop_signal is None:
                metrics, applied = self.train_step(step)
                step += 1
                if applied:
                    in_a_row = 0
                else:
                    skipped += 1
                    in_a_row += self._report_skip(step, metrics["loss"])
                metrics["skipped_steps"] = skipped
                zero_norms = zero_norms + 1 if applied and metrics["grad_norm"] == 0.0 else 0
                if zero_norms == ZERO_GRAD_STEPS:
                    self._warn(f"step {step}: the gradient norm has been exactly 0 for {zero_norms} steps in a row, so "
                               "the weights no longer change (train.lr too high? a saturated loss?)")
                every_eval = self.cfg.train.eval_every
                if self.eval_data is not None and every_eval and step % every_eval == 0:
                    metrics.update(self.evaluate())
                if writer is not None and (step % self.cfg.logging.every == 0 or step == self.total_steps):
                    writer.write(step, metrics)
                # The postfix first: the update draws the bar, which then shows this step's loss.
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                bar.update(1)
                client = self._client_state(step, skipped, in_a_row)
                if in_a_row >= self.cfg.train.max_consecutive_skips:
                    tag = self.checkpoints.save(self.engine, step, client)
                    raise TrainingError(
                        f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient (limit "
                        f"train.max_consecutive_skips = {self.cfg.train.max_consecutive_skips}); stopped at step "
                        f"{step}, checkpoint {self.checkpoints.directory / tag}. Lower train.lr, check the data, "
                        "or use train.precision fp32."
                    )
                if self.cfg.checkpoint.every and step % self.cfg.checkpoint.every == 0:
                    self.checkpoints.save(self.engine, step, client)
                    last_saved = step
            bar.close()
            if self.stop_signal is not None or self.cfg.checkpoint.every:
                if last_saved != step:
                    self.checkpoints.save(self.engine, step, client)
            if self.stop_signal is not None:
                if step == first_step:
                    self._say(f"stopped on {self.stop_signal} before step {step + 1}; nothing new to save")
                else:
                    self._say(f"stopped on {self.stop_signal} after step {step}; checkpoint saved in "
                              f"{self.checkpoints.directory}. Continue with --resume auto")
                return 0
            self._finish(step, skipped, writer)
            return 0
        finally:
            bar.close()
            if writer is not None:
                writer.close()

    def _report_skip(self, step: int, loss: float) -> int:
        """Log a skipped update; 1 when it counts towards train.max_consecutive_skips, else 0."""
        if self.precision == "fp16" and math.isfinite(loss):
            # A gradient overflow with a finite loss is fp16 loss scaling at work, not a fault.
            self._say(f"step {step}: fp16 gradient overflow; loss scale lowered, update skipped")
            return 0
        self._say(f"step {step}: non-finite loss or gradient (loss={loss}); update skipped")
        return 1

    def _finish(self, step: int, skipped: int, writer: MetricsWriter | None) -> None:
        """End of a completed run: final evaluation, export, curves."""
        if self.eval_data is not None and not self.cfg.train.eval_every:
            final_eval = self.evaluate()
            if writer is not None:
                writer.write(step, final_eval)
        if self.cfg.checkpoint.export:
            self.export()
        if writer is not None:
            writer.close()
            plot = plot_metrics(writer.path, self.output_dir / "metrics.png")
            self._say(f"done: {step} steps, {skipped} skipped; metrics in {writer.path}"
                      + (f", curves in {plot}" if plot else "")
                      + (f", TensorBoard logs in {writer.tensorboard_dir}" if writer.tensorboard_dir else ""))

    def _client_state(self, step: int, skipped: int, in_a_row: int) -> dict[str, Any]:
        return {"step": step, "consumed_prompts": step * self.sampler.prompts_per_step, "skipped_steps": skipped,
                "consecutive_skips": in_a_row, "config": self.cfg.to_dict()}

    def export(self) -> Path:
        """Gather the ZeRO-3 weights and write ``<output_dir>/final`` (every rank must call this)."""
        from dora_engine.training.export import gathered_state_dict, merge_lora, write_export

        destination = self.output_dir / "final"
        state = gathered_state_dict(self.engine)
        if state is not None:
            if self.cfg.lora.enabled:
                state = merge_lora(state, self.cfg.lora.alpha, self.cfg.lora.r)
            model_config = self.engine.module.model.config
            write_export(destination, state, model_config, self.tokenizer, self.cfg.to_dict())
            self._say(f"exported the trained model to {destination}")
        dist.barrier()
        return destination
