"""Training metrics: per-step statistics from the op's output, and the sinks they go to.

Names follow TRL where TRL has them: ``loss``, ``rewards/chosen|rejected|margins|accuracies``,
``logps/chosen|rejected``; plus ``robust/weight_max``, ``robust/ess`` (1/Σw² of the strategy's
distribution over the global batch, docs/design.md section 4), ``h_tilde/mean``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``step_time_s``, ``mem_peak`` (bytes) and ``skipped_steps``.

Rewards: β·(S − S_ref) for losses with a reference, β·S/L (SimPO's length-normalised reward) for
those without; chosen/rejected are the best/worst response by score.
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
from dora_engine.losses import chosen_rejected, get_loss
from dora_engine.training.config import LoggingConfig
from dora_engine.training.model import StepOutput


def align_stats(step: StepOutput, batch: dict[str, torch.Tensor], loss: str, params: dict[str, Any]) -> dict:
    """Sums over this rank's prompts of the per-prompt statistics, plus counts (see module doc)."""
    out = step.out
    K = batch["scores"].shape[1]
    S = out.seq_logps.view(-1, K)
    beta = float(params.get("beta", 1.0))
    if get_loss(loss).needs_reference:
        reward = beta * (S - batch["ref_logps"].to(S).view(-1, K))
    else:
        reward = beta * S / out.seq_lens.view(-1, K).clamp(min=1)
    chosen, rejected = chosen_rejected(reward, batch["scores"])
    logps_chosen, logps_rejected = chosen_rejected(S, batch["scores"])
    count = len(chosen)
    w = out.weights.float()
    sums = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "logps/chosen": logps_chosen.sum(),
        "logps/rejected": logps_rejected.sum(),
        "h_tilde/mean": batch["h_tilde"].sum() if "h_tilde" in batch else torch.tensor(float(count)),
    }
    return {"sums": sums, "count": count, "w_sq": (w * w).sum(), "w_max": w.max()}


class StepAccumulator:
    """Collects the micro-steps of one optimizer step and reduces them over ranks in one all-reduce."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.sums: dict[str, float] = {}
        self.count = 0
        self.inv_ess = 0.0
        self.weight_max = 0.0
        self.tokens = 0
        self.micro_steps = 0

    def add(self, step: StepOutput, tokens: int, stats: dict | None) -> None:
        self.losses.append(float(step.value))
        self.tokens += tokens
        self.micro_steps += 1
        if stats is not None:
            for k, v in stats["sums"].items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.count += stats["count"]
            self.inv_ess += float(stats["w_sq"])
            self.weight_max = max(self.weight_max, float(stats["w_max"]))

    def reduce(self, stop_flag: bool) -> tuple[dict[str, float], bool]:
        """Global metrics of the step and whether any rank asked to stop."""
        keys = sorted(self.sums)
        # The loss is already global (every rank holds the same value); the rest is summed over ranks.
        vec = torch.tensor([self.sums[k] for k in keys] + [self.count, self.inv_ess, self.tokens], dtype=torch.float64)
        flags = torch.tensor([self.weight_max, float(stop_flag)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        metrics = {"loss": sum(self.losses) / max(len(self.losses), 1)}
        count = vec[len(keys)].item()
        for i, k in enumerate(keys):
            metrics[k] = vec[i].item() / max(count, 1)
        if keys:
            # Each micro-step's weights sum to 1 over its global batch: ESS = 1 / (Σw² averaged over micro-steps).
            inv_ess_mean = vec[len(keys) + 1].item() / self.micro_steps
            metrics["robust/ess"] = 1.0 / inv_ess_mean if inv_ess_mean > 0 else math.nan
            metrics["robust/weight_max"] = flags[0].item()
        metrics["tokens"] = vec[-1].item()
        return metrics, bool(flags[1].item() > 0)


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
