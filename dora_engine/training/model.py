"""The module DeepSpeed wraps: the causal LM plus the loss, computed inside ``forward``.

Under ZeRO-3 a parameter is gathered only inside the forward of a module the engine wraps, so the
loss (which reads the logits) must be computed there too (DESIGN.md section 5).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from dora_engine.ops import DoRAOutput, dora_loss, sequence_logprobs
from dora_engine.training.config import LoraConfig, TrainingConfig


class StepOutput(NamedTuple):
    """What the wrapped forward returns: the loss to back-propagate and detached statistics.

    For ``sft``: ``loss`` is this rank's share of the global token-mean NLL (scaled so that DeepSpeed's
    gradient averaging gives the gradient of the global mean) and ``value`` the global NLL itself; for
    ``align``: both are the global robust loss. ``out`` is the op's output (align only).
    """

    loss: torch.Tensor
    value: torch.Tensor
    seq_logps: torch.Tensor
    seq_lens: torch.Tensor
    out: DoRAOutput | None


def process_group() -> Any:
    """The data-parallel group when several ranks train, else None (one process: no communication)."""
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


class PolicyLoss(nn.Module):
    """forward(batch) -> StepOutput; ``stage`` selects SFT (NLL) or alignment (``dora_loss``)."""

    def __init__(self, model: nn.Module, cfg: TrainingConfig, num_responses: int):
        super().__init__()
        self.model = model
        self.stage = cfg.stage
        self.num_responses = num_responses
        self.loss_name = cfg.loss.name
        self.loss_params = cfg.loss_params
        self.strategy = cfg.robust.strategy
        self.lam = cfg.robust.lam
        self.backend = cfg.train.backend
        self.uses_h_tilde = cfg.needs_h_tilde

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        scores: torch.Tensor | None = None,
        h_tilde: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> StepOutput:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        group = process_group()
        if self.stage == "sft":
            return self._sft(logits, labels, group)
        out = dora_loss(
            logits, labels, num_responses=self.num_responses, scores=scores,
            h_tilde=h_tilde if self.uses_h_tilde else None, ref_logps=ref_logps, loss=self.loss_name,
            loss_params=self.loss_params, strategy=self.strategy, lam=self.lam, process_group=group,
            backend=self.backend,
        )
        return StepOutput(out.loss, out.loss.detach(), out.seq_logps, out.seq_lens, out)

    def _sft(self, logits: torch.Tensor, labels: torch.Tensor, group: Any) -> StepOutput:
        """NLL = −Σ S / Σ L over the global micro-batch (token mean across all ranks)."""
        S, L = sequence_logprobs(logits, labels, backend=self.backend)
        totals = torch.stack([S.detach().sum(), L.sum()])
        world = 1
        if group is not None:
            dist.all_reduce(totals, group=group)
            world = dist.get_world_size(group)
        tokens = totals[1].clamp(min=1)
        return StepOutput(-S.sum() * world / tokens, -totals[0] / tokens, S.detach(), L.detach(), None)


class ReferenceLogps(nn.Module):
    """forward(batch) -> summed log-probs S (N,) of the frozen reference model (no gradient)."""

    def __init__(self, model: nn.Module, backend: str):
        super().__init__()
        self.model = model
        self.backend = backend

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return sequence_logprobs(logits, labels, backend=self.backend)[0]


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype, *, gradient_checkpointing: bool = False) -> nn.Module:
    """A Hugging Face causal LM. Under an active ``HfDeepSpeedConfig`` with ZeRO-3 the weights are
    partitioned across ranks as they load, so no rank ever holds the whole model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters through ``peft`` (only the adapters train)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise RuntimeError("config key 'lora.enabled' needs peft: pip install 'dora-engine[lora]'") from None
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
