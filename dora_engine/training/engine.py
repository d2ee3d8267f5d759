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
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.errors import TrainingError
from dora_engine.generation import EXPORT_FOLDER
from dora_engine.training import startup
from dora_engine.training.checkpoint import CheckpointManager, check_resumable, data_hashes
from dora_engine.training.config import TrainingConfig
from dora_engine.training.data import Sampler, collate
from dora_engine.training.dsconfig import build_deepspeed_config, resolve_precision
from dora_engine.training.loading import RunData, load_run_data
from dora_engine.training.metrics import MetricsWriter, StepAccumulator, align_stats, peak_memory_bytes
from dora_engine.training.model import StepOutput
from dora_engine.training.optim import total_steps
from dora_engine.training.plots import plot_metrics
from dora_engine.training.process_group import Ranks, init_distributed
from dora_engine.training.ref_logps import ensure_reference, forget_zero3_module, release_memory
from dora_engine.training.signals import StopSignals

ZERO_GRAD_STEPS = 3  # applied steps in a row with a grad norm of exactly 0 before a warning


class Trainer:
    """The training loop of a run; ``Trainer.from_config(cfg)`` loads and builds its pieces, ``run()`` trains
    and returns the exit code.

    ``engine`` is the policy under DeepSpeed (or an object with the same methods: ``__call__``,
    ``backward``, ``step``, ``was_step_applied``, ``get_global_grad_norm``, ``train``, ``eval``, ``device``,
    ``module``, ``save_checkpoint`` / ``load_checkpoint``, and for ``export`` / ``trained_state_dict`` and
    ``close`` DeepSpeed's ZeRO-3 consolidation and ``destroy``), ``lr_scheduler`` its schedule, ``sampler`` the
    data order over ``ranks``, ``checkpoints`` where checkpoints go, ``resume_tag`` the verified checkpoint
    to start from (None: step 0), ``ref_train`` / ``ref_eval`` the reference log-probs of the data.
    ``keep_alive`` holds what must live as long as the engine (the ``HfDeepSpeedConfig``).
    """

    def __init__(
        self, cfg: TrainingConfig, *, data: RunData, ranks: Ranks, sampler: Sampler, checkpoints: CheckpointManager,
        engine: Any, lr_scheduler: Any, ref_train: torch.Tensor | None = None, ref_eval: torch.Tensor | None = None,
        resume_tag: str | None = None, progress: bool = True, stop: StopSignals | None = None, keep_alive: Any = None,
        h_mean: float | None = None,
    ):
        self.cfg = cfg
        self.h_mean = h_mean
        self.output_dir = Path(cfg.output_dir)
        self.progress = progress
        self.stop = stop if stop is not None else StopSignals()
        self.precision = resolve_precision(cfg.train.precision)
        self.tokenizer, self.pad_id = data.tokenizer, data.pad_id
        self.train_data, self.eval_data = data.train, data.eval
        self.dist, self.sampler, self.checkpoints, self.resume_tag = ranks, sampler, checkpoints, resume_tag
        self.engine, self.lr_scheduler, self.keep_alive = engine, lr_scheduler, keep_alive
        self.ref_train, self.ref_eval = ref_train, ref_eval

    @classmethod
    def from_config(cls, cfg: TrainingConfig, *, progress: bool = True, stop: StopSignals | None = None) -> Trainer:
        """Load and build everything a run of ``cfg`` needs, in the order of the module docstring."""
        if os.environ.get("LOCAL_RANK", "0") == "0":
            startup.remove_run_temporaries(cfg)
        data = load_run_data(cfg, progress)  # 1. everything that can be wrong with the input
        # 2. Processes, sampler, checkpoint to resume from, reference log-probs.
        ranks = init_distributed(timedelta(minutes=cfg.train.dist_timeout_minutes))
        sampler = Sampler(
            len(data.train), cfg.train.micro_batch_prompts, ranks.world, cfg.train.grad_accum_steps, cfg.train.seed
        )
        startup.check_sizes(cfg, data, sampler, ranks.world)
        checkpoints = CheckpointManager(Path(cfg.output_dir) / "checkpoints", keep=cfg.checkpoint.keep, ranks=ranks)
        resume_tag = startup.choose_checkpoint(cfg, checkpoints, ranks, data)
        ds_config = build_deepspeed_config(cfg, ranks.world)
        refs = [None, None]
        if cfg.needs_reference:
            refs = [ensure_reference(cfg, split, ds_config, ranks, data.pad_id, progress) if split is not None else None
                    for split in (data.train, data.eval)]
        torch.manual_seed(cfg.train.seed)  # 3. the policy engine
        precision = resolve_precision(cfg.train.precision)
        objective = startup.run_objective(cfg, data, ranks)
        engine, lr_scheduler, keep_alive = startup.build_policy_engine(
            cfg, objective, ds_config, precision, total_steps(cfg.train, sampler)
        )
        offloaded = startup.offload_summary(engine)
        if offloaded:
            startup.say(ranks, f"ZeRO-3 offload active: {offloaded}")
        return cls(cfg, data=data, ranks=ranks, sampler=sampler, checkpoints=checkpoints, engine=engine,
                   lr_scheduler=lr_scheduler, ref_train=refs[0], ref_eval=refs[1], resume_tag=resume_tag,
                   progress=progress, stop=stop, keep_alive=keep_alive, h_mean=objective.h_mean)

    @property
    def settings(self) -> dict[str, Any]:
        """The run's configuration as recorded with its metrics (W&B) and export: ``cfg.to_dict()``, plus
        ``robust.h_mean``, the c of ``robust.h_scale: dataset`` computed from data.train, when there is one."""
        settings = self.cfg.to_dict()
        if self.h_mean is not None:
            settings["robust"]["h_mean"] = self.h_mean
        return settings

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

    def _resume(self) -> dict[str, Any]:
        """Client state of the checkpoint to resume from, or a fresh start's."""
        fresh = {"step": 0, "consumed_prompts": 0, "skipped_steps": 0, "consecutive_skips": 0}
        tag = self.resume_tag
        if tag is None:
            return fresh
        state = self.checkpoints.load(self.engine, tag)
        check_resumable(tag, state["config"], self.cfg.to_dict())
        if state["consumed_prompts"] % self.sampler.prompts_per_step:
            raise TrainingError(
                f"checkpoint {tag} consumed {state['consumed_prompts']} prompts, not a multiple of this run's "
                f"{self.sampler.prompts_per_step} prompts per step (world size changed?)"
            )
        state["step"] = state["consumed_prompts"] // self.sampler.prompts_per_step
        self._say(f"resumed from {self.checkpoints.directory / tag} at step {state['step']}")
        return state

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
        acc = StepAccumulator(self.engine.device)
        self.engine.train()
        for indices in self.sampler.step_indices(step, self.dist.rank):
            batch = self._device_batch(collate(self.train_data, indices, pad_id=self.pad_id, ref_logps=self.ref_train))
            out: StepOutput = self.engine(**batch)
            # The value is global, so every rank scales alike: a non-finite value gives NaN gradients, and
            # DeepSpeed's overflow check discards the whole accumulated step on all ranks. A factor of 1 or
            # NaN rather than a branch, so that the host does not wait for the device.
            keep = torch.where(torch.isfinite(out.value), 1.0, math.nan).to(out.loss.dtype)
            self.engine.backward(out.loss * keep)
            self.engine.step()
            acc.add(out, batch["attention_mask"].sum(), self._stats(out, batch))
        metrics, stop = acc.reduce(self.stop_signal is not None)
        applied = bool(self.engine.was_step_applied()) and math.isfinite(metrics["loss"])
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
        acc = StepAccumulator(self.engine.device)
        self.engine.eval()
        for lo in range(0, len(data) - micro * world + 1, micro * world):
            indices = list(range(lo + self.dist.rank * micro, lo + (self.dist.rank + 1) * micro))
            batch = self._device_batch(collate(data, indices, pad_id=self.pad_id, ref_logps=self.ref_eval))
            out = self.engine(**batch)
            acc.add(out, batch["attention_mask"].sum(), self._stats(out, batch))
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
        writer = MetricsWriter(self.output_dir, self.cfg.logging, self.settings, step) if self.dist.main else None
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
                "consecutive_skips": in_a_row, "config": self.cfg.to_dict(),
                "data": data_hashes(self.train_data, self.eval_data)}

    def trained_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The causal LM's weights as trained so far, gathered from the ZeRO-3 partitions onto rank 0 (None on
        the other ranks; every rank must call it), LoRA merged into the base weights: what ``export`` writes,
        kept in memory."""
        from dora_engine.training.export import gathered_state_dict, merge_lora

        state = gathered_state_dict(self.engine)
        if state is not None and self.cfg.lora.enabled:
            state = merge_lora(state, self.cfg.lora.alpha, self.cfg.lora.r)
        return state

    def close(self) -> None:
        """Release the engine, its ZeRO-3 hooks and partitions, so that one process can build and run further
        trainers after this one (``benchmarks/bench_quality.py`` runs many); the trainer is unusable after."""
        engine, self.engine, self.lr_scheduler, self.keep_alive = self.engine, None, None, None
        engine.destroy()
        forget_zero3_module(engine.module)
        del engine  # the last reference: the collector can now free the model and the optimizer
        release_memory()

    def export(self) -> Path:
        """Gather the ZeRO-3 weights and write ``<output_dir>/final`` (every rank must call this)."""
        from dora_engine.training.export import write_export

        destination = self.output_dir / EXPORT_FOLDER
        state = self.trained_state_dict()
        if state is not None:
            model_config = self.engine.module.model.config
            write_export(destination, state, model_config, self.tokenizer, self.settings)
            self._say(f"exported the trained model to {destination}")
        dist.barrier()
        return destination
