"""Training metrics: per-step statistics from the op's output, and the sinks they go to.

Names follow TRL where TRL has them: ``loss``, ``rewards/chosen|rejected|margins|accuracies``,
``logps/chosen|rejected``; plus ``robust/weight_max``, ``robust/ess`` (1/Σw² of the strategy's
distribution over the global batch, docs/design.md section 4), ``h_tilde/mean``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``step_time_s``, ``mem_peak`` (bytes) and ``skipped_steps``; for a mixture-of-experts model
whose config sets ``output_router_logits``, ``aux_loss``: its router load-balancing loss, averaged over ranks
and micro-steps (the trained loss is ``loss`` + router_aux_loss_coef · ``aux_loss``). The preference statistics
(rewards, log-probs, weights) are those of ``dora_engine.preference``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dora_engine.atomic import atomic_write
from dora_engine.errors import UserImportError
from dora_engine.preference import data_parallel_group, preference_stats, weight_moments
from dora_engine.training.config import LoggingConfig
from dora_engine.training.model import StepOutput


def align_stats(step: StepOutput, batch: dict[str, torch.Tensor], loss: str, params: dict[str, Any]) -> dict:
    """Sums over this rank's prompts of the per-prompt statistics (``preference_stats``), the number of
    prompts (``count``, an int), Σw² and max w of the strategy's weights (``w_sq``, ``w_max``); the
    tensors stay on the device."""
    per_prompt = preference_stats(step.out, batch["scores"], batch.get("ref_logps"), loss, params)
    sums = {name: value.sum() for name, value in per_prompt.items()}
    count = batch["scores"].shape[0]
    h_tilde = batch.get("h_tilde")
    sums["h_tilde/mean"] = h_tilde.sum() if h_tilde is not None else torch.full((), float(count),
                                                                                device=batch["scores"].device)
    w_sq, w_max = weight_moments(step.out.weights)
    return {"sums": sums, "count": count, "w_sq": w_sq, "w_max": w_max}


class StepAccumulator:
    """Collects the micro-steps of one optimizer step and reduces them over the data-parallel group.

    The statistics stay float64 tensors on ``device`` (the model's: the group's backend may serve no
    other device type, as NCCL serves only CUDA) while the micro-steps run; ``reduce`` all-reduces them and
    reads them to the host in one transfer, the step's only synchronisation for its metrics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = self._zero()
        self.tokens = self._zero()
        self.inv_ess = self._zero()
        self.weight_max = self._zero()
        self.aux_loss_sum = self._zero()
        self.aux_loss_count = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.micro_steps = 0

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, step: StepOutput, tokens: torch.Tensor, stats: dict | None) -> None:
        """One micro-step: its global loss value, this rank's token count and ``align_stats`` (None for sft)."""
        self.loss_sum = self.loss_sum + step.value.detach().double()
        self.tokens = self.tokens + tokens.double()
        self.micro_steps += 1
        if step.aux_loss is not None:
            self.aux_loss_sum = self.aux_loss_sum + step.aux_loss.double()
            self.aux_loss_count += 1
        if stats is not None:
            for k, v in stats["sums"].items():
                self.sums[k] = self.sums.get(k, self._zero()) + v.double()
            self.count += stats["count"]
            self.inv_ess = self.inv_ess + stats["w_sq"].double()
            self.weight_max = torch.maximum(self.weight_max, stats["w_max"].double())

    def reduced(self, stop_flag: bool) -> torch.Tensor:
        """The step's statistics over the data-parallel group, one float64 vector on the device: the sums of
        ``sorted(self.sums)``, the prompt count, Σw², the tokens and the router losses with their number
        summed over ranks, max w and the stop flag maxed over ranks, then the loss sum (already global: every
        rank holds the same values)."""
        keys = sorted(self.sums)
        count = torch.full((), float(self.count), dtype=torch.float64, device=self.device)
        aux_count = torch.full((), float(self.aux_loss_count), dtype=torch.float64, device=self.device)
        vec = torch.stack([self.sums[k] for k in keys]
                          + [count, self.inv_ess, self.tokens, self.aux_loss_sum, aux_count])
        flags = torch.stack([self.weight_max, torch.full_like(self.weight_max, float(stop_flag))])
        group = data_parallel_group()
        if group is not None:
            dist.all_reduce(vec, group=group)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        return torch.cat([vec, flags, self.loss_sum.view(1)])

    def reduce(self, stop_flag: bool) -> tuple[dict[str, float], bool]:
        """Global metrics of the step (``reduced``, read to the host at once) and whether any rank asked to stop."""
        keys = sorted(self.sums)
        *sums, count, inv_ess, tokens, aux_sum, aux_count, weight_max, stop, loss_sum = self.reduced(stop_flag).tolist()
        metrics = {"loss": loss_sum / max(self.micro_steps, 1)}
        if aux_count:
            metrics["aux_loss"] = aux_sum / aux_count
        for k, total in zip(keys, sums, strict=True):
            metrics[k] = total / max(count, 1)
        if keys:
            # Each micro-step's weights sum to 1 over its global batch: ESS = 1 / (Σw² averaged over micro-steps).
            inv_ess_mean = inv_ess / self.micro_steps
            metrics["robust/ess"] = 1.0 / inv_ess_mean if inv_ess_mean > 0 else math.nan
            metrics["robust/weight_max"] = weight_max
        metrics["tokens"] = tokens
        return metrics, stop > 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsWriter:
    """JSONL always (``<output_dir>/metrics.jsonl``); TensorBoard when installed; W&B when enabled."""

    def __init__(self, output_dir: Path, cfg: LoggingConfig, run_config: dict[str, Any], resume_step: int):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.handle = open(self.path, "a", encoding="utf-8")
        self.tb = self._tensorboard(output_dir / "tensorboard", cfg.tensorboard)
        self.tensorboard_dir = output_dir / "tensorboard" if self.tb is not None else None
        self.wandb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserImportError(
                    "config key 'logging.wandb' needs wandb: pip install 'dora-engine[track]'"
                ) from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, config=run_config, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """Drop records past the resumed step (and any torn last line) so the file has one record per step."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        with atomic_write(self.path) as handle:
            handle.write("".join(line + "\n" for line in kept))

    @staticmethod
    def _tensorboard(directory: Path, mode: str) -> Any:
        if mode == "off":
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode == "on":
                raise UserImportError(
                    "config key 'logging.tensorboard: on' needs tensorboard: pip install 'dora-engine[track]'"
                ) from None
            return None
        return SummaryWriter(str(directory))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in metrics.items()}}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        """Close every sink (safe to call twice)."""
        if self.handle.closed:
            return
        self.handle.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
