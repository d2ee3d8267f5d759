"""The module DeepSpeed wraps: the causal LM plus the loss, computed inside ``forward``.

Under ZeRO-3 a parameter is gathered only inside the forward of a module the engine wraps, so the
loss (which reads the logits) must be computed there too (docs/design.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from dora_engine.errors import UserImportError
from dora_engine.hf_loading import load_pretrained
from dora_engine.losses import ResolvedObjective, RobustObjective
from dora_engine.ops import DoRAOutput, NLLOutput
from dora_engine.ops.lm_head import DoRAPolicy
from dora_engine.preference import data_parallel_group
from dora_engine.training.config import LoraConfig, TrainConfig


class StepOutput(NamedTuple):
    """What the wrapped forward returns: the loss to back-propagate and detached statistics.

    For ``sft``: ``loss`` is this rank's share of the global token-mean NLL (scaled so that DeepSpeed's
    gradient averaging gives the gradient of the global mean) and ``value`` the global NLL itself; for
    ``align``: both are the global robust loss. ``out`` is the op's output (align only). For a
    mixture-of-experts model whose config sets ``output_router_logits``, ``aux_loss`` is this rank's router
    load-balancing loss (detached) and ``loss`` also holds ``router_aux_loss_coef · aux_loss``; ``value``
    does not (it stays the same on every rank).
    """

    loss: torch.Tensor
    value: torch.Tensor
    seq_logps: torch.Tensor
    seq_lens: torch.Tensor
    out: DoRAOutput | None
    aux_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class LossPath:
    """How the trainer's modules compute log-probs and loss (docs/design.md section 5.7): ``train.loss_path``,
    ``train.fused_linear_mode``, ``train.chunk_bytes`` and ``train.backend``."""

    loss_path: str = "auto"
    mode: str = "single_pass"
    chunk_bytes: int | None = None
    backend: str = "auto"

    @classmethod
    def of(cls, train: TrainConfig) -> LossPath:
        return cls(train.loss_path, train.fused_linear_mode, train.chunk_bytes, train.backend)


class PolicyLoss(DoRAPolicy):
    """forward(batch) -> StepOutput; ``stage`` selects SFT (NLL) or alignment (``objective``). The op runs
    with ``validate=False``: the data were validated when they were loaded (``training/data.py``)."""

    def __init__(
        self,
        model: nn.Module,
        objective: RobustObjective | ResolvedObjective,
        *,
        stage: str,
        path: LossPath = LossPath(),
    ):
        super().__init__(model, objective, loss_path=path.loss_path, mode=path.mode, chunk_bytes=path.chunk_bytes,
                         backend=path.backend, validate=False)
        self.stage = stage
        self.uses_h_tilde = stage == "align" and self.objective.strategy.needs_h_tilde

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        scores: torch.Tensor | None = None,
        h_tilde: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> StepOutput:
        group = data_parallel_group()
        if self.stage == "sft":
            nll, aux = self.compute(input_ids, attention_mask, labels, process_group=group, nll=True)
            return self._with_router_loss(self._sft(nll, group), aux)
        h = h_tilde if self.uses_h_tilde else None
        out, aux = self.compute(input_ids, attention_mask, labels, scores, h, ref_logps, group)
        return self._with_router_loss(StepOutput(out.loss, out.loss.detach(), out.seq_logps, out.seq_lens, out), aux)

    def _with_router_loss(self, step: StepOutput, aux: torch.Tensor | None) -> StepOutput:
        """``step`` training on its loss + router_aux_loss_coef · aux (DeepSpeed's gradient averaging makes
        that the mean of the ranks' router losses, as data parallelism does for a model's own loss)."""
        if aux is None:
            return step
        return step._replace(loss=step.loss + self.router_aux_loss_coef * aux, aux_loss=aux.detach())

    def _sft(self, nll: NLLOutput, group: Any) -> StepOutput:
        """NLL = −Σ S / Σ L over the global micro-batch (token mean across all ranks), from this rank's summed
        NLL −Σ S (on the fused-linear path with ``single_pass``, its gradient formed in forward)."""
        totals = torch.stack([nll.loss.detach(), nll.seq_lens.sum()])
        world = 1
        if group is not None:
            dist.all_reduce(totals, group=group)
            world = dist.get_world_size(group)
        tokens = totals[1].clamp(min=1)
        return StepOutput(nll.loss * world / tokens, totals[0] / tokens, nll.seq_logps, nll.seq_lens, None)


class ReferenceLogps(DoRAPolicy):
    """forward(batch) -> summed log-probs S (N,) of the frozen reference model (no gradient), through the
    same loss path as the policy."""

    def __init__(self, model: nn.Module, path: LossPath = LossPath()):
        super().__init__(model, loss_path=path.loss_path, mode=path.mode, chunk_bytes=path.chunk_bytes,
                         backend=path.backend, validate=False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids, attention_mask, labels)[0]


def load_tokenizer(path: str, *, trust_remote_code: bool) -> Any:
    """The tokenizer at ``path``, padding with EOS (else UNK) when it has no pad token; ``trust_remote_code``:
    ``dora_engine.hf_loading``."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def model_vocab_size(path: str, *, trust_remote_code: bool) -> int:
    """The vocabulary size of the causal LM at ``path``, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    return load_pretrained(AutoConfig, path, trust_remote_code=trust_remote_code).vocab_size


def load_causal_lm(path: str, dtype: torch.dtype, *, trust_remote_code: bool,
                   gradient_checkpointing: bool = False) -> nn.Module:
    """A Hugging Face causal LM. Under an active ``HfDeepSpeedConfig`` with ZeRO-3 the weights are
    partitioned across ranks as they load, so no rank ever holds the whole model. ``trust_remote_code``:
    ``dora_engine.hf_loading``."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, path, trust_remote_code=trust_remote_code, dtype=dtype)
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
        raise UserImportError("config key 'lora.enabled' needs peft: pip install 'dora-engine[lora]'") from None
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
