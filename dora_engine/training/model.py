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
        self.fused_linear = cfg.train.loss_path == "fused_linear"
        if self.fused_linear:
            from dora_engine.ops.lm_head import install_loss_head

            install_loss_head(_causal_lm(model), backend=self.backend)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        scores: torch.Tensor | None = None,
        h_tilde: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> StepOutput:
        group = process_group()
        if self.fused_linear:
            # Decoder body, then the loss head (a module of its own, so ZeRO-3 gathers its weight):
            # the logits are never materialised.
            lm = _causal_lm(self.model)
            hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            head = lm.get_output_embeddings()
            if self.stage == "sft":
                return self._sft(*head(hidden, labels), group)
            out = head(hidden, labels, **self._loss_kwargs(scores, h_tilde, ref_logps, group))
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            if self.stage == "sft":
                return self._sft(*sequence_logprobs(logits, labels, backend=self.backend), group)
            kwargs = self._loss_kwargs(scores, h_tilde, ref_logps, group)
            out = dora_loss(logits, labels, backend=self.backend, **kwargs)
        return StepOutput(out.loss, out.loss.detach(), out.seq_logps, out.seq_lens, out)

    def _loss_kwargs(self, scores: Any, h_tilde: Any, ref_logps: Any, group: Any) -> dict[str, Any]:
        return dict(
            num_responses=self.num_responses, scores=scores, h_tilde=h_tilde if self.uses_h_tilde else None,
            ref_logps=ref_logps, loss=self.loss_name, loss_params=self.loss_params, strategy=self.strategy,
            lam=self.lam, process_group=group,
        )

    def _sft(self, S: torch.Tensor, L: torch.Tensor, group: Any) -> StepOutput:
        """NLL = −Σ S / Σ L over the global micro-batch (token mean across all ranks)."""
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


def _causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
