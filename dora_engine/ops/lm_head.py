"""The DoRA loss inside a causal LM's forward, so that it works with ZeRO-3 partitioned weights.

Under ZeRO-3 a parameter holds its full value only inside the forward of a module that owns it, and
again during that module's backward: DeepSpeed's hooks gather it there. Reading
``engine.module.lm_head.weight`` from a training loop gives an empty placeholder, so the loss runs
inside the forward of a module DeepSpeed wraps (docs/design.md section 5):

- ``DoRAPolicy(model, objective, loss_path=...)`` (``objective`` a ``dora_engine.losses.RobustObjective``,
  resolved once here) is the root module to hand to ``deepspeed.initialize``
  (``model`` a Hugging Face causal LM, optionally PEFT-wrapped). ``loss_path="logits"``: the model's logits
  → ``dora_loss`` (backward written over the logits); ``"fused_linear"``: the decoder body's hidden states
  → ``dora_loss_linear`` inside the loss head, never holding all logits; ``"auto"`` (default):
  ``fused_linear`` unless the model's logits are not a plain linear layer's output (soft-capping, scaling).
- ``DoRALossHead`` owns the lm_head weight (and bias) and computes as its ``LossHeadSettings`` say.
  ``head(hidden)`` returns logits like the ``nn.Linear`` it replaces (generation, evaluation); with labels
  it returns (S, L), and with scores too the ``DoRAOutput``.
- ``install_loss_head(model)`` swaps a Hugging Face causal LM's output embedding for a ``DoRALossHead``
  holding the very same ``Parameter`` objects. With tied input/output embeddings that parameter is also
  the input embedding's, so both modules own it and ZeRO-3 gathers it for either.

Labels follow the Hugging Face convention (``labels[:, t]`` is token t, ``IGNORE_INDEX`` marks prompt and padding
tokens); the policy aligns them with ``shift_labels``::

    policy = DoRAPolicy(model, RobustObjective(loss="dpo_pl", strategy="dora", lam=1.0))
    engine, *_ = deepspeed.initialize(model=policy, config=ds_config, optimizer=opt)
    out = engine(input_ids, attention_mask, labels, scores=scores, h_tilde=h, ref_logps=ref,
                 process_group=dist.group.WORLD)            # global robust reduction (section 5)
    engine.backward(out.loss)
    engine.step()

``engine(input_ids, attention_mask, labels)`` without scores gives (S, L) per row the same way (e.g. for
the reference log-prob cache, under ``torch.no_grad()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dora_engine.losses import ResolvedObjective, RobustObjective
from dora_engine.ops import (
    DoRAOutput,
    dora_loss,
    dora_loss_linear,
    sequence_logprobs,
    sequence_logprobs_linear,
    shift_labels,
)

LOSS_PATHS = ("auto", "logits", "fused_linear")
DEFAULT_OBJECTIVE = RobustObjective()  # dpo_pl under dora, λ = 1
#: Config attributes of Hugging Face models that transform the lm_head's output, which the fused-linear
#: path (logits = hidden @ Wᵀ + b) would leave out; with the value that means "no transform".
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


@dataclass(frozen=True)
class LossHeadSettings:
    """How a ``DoRALossHead`` computes its loss (arguments of ``dora_loss_linear``)."""

    objective: RobustObjective | ResolvedObjective = DEFAULT_OBJECTIVE
    """The loss and robust strategy."""
    mode: str = "single_pass"
    """``single_pass`` (3 GEMMs) or ``recompute`` (4 GEMMs, least memory)."""
    chunk_bytes: int | None = None
    """Bytes of one chunk of logits; None: the device's ``ops.chunking.DEFAULT_CHUNK_BYTES``."""
    backend: str = "auto"
    """``auto``, ``fused`` or ``reference``."""
    validate: bool = True
    """Check input values on the host; False for data validated at load."""


class DoRALossHead(nn.Module):
    """Output layer owning ``weight`` (V, H) and ``bias`` (V,) or None: logits, (S, L) or the DoRA loss."""

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None = None, settings: LossHeadSettings = LossHeadSettings()
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.settings = settings

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        h_tilde: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | DoRAOutput:
        """hidden (N, T, H) → logits; with labels aligned to hidden (N, T) → (S, L) of
        ``sequence_logprobs_linear``; with scores (B, K) too → ``DoRAOutput`` of ``dora_loss_linear``."""
        if labels is None:
            if scores is not None:
                raise ValueError("scores given without labels")
            return F.linear(hidden, self.weight, self.bias)
        st = self.settings
        if scores is None:
            return sequence_logprobs_linear(
                hidden, self.weight, labels, bias=self.bias, chunk_bytes=st.chunk_bytes, backend=st.backend,
                validate=st.validate,
            )
        return dora_loss_linear(
            hidden, self.weight, labels, bias=self.bias, num_responses=_num_responses(scores), scores=scores,
            h_tilde=h_tilde, ref_logps=ref_logps, objective=st.objective, process_group=process_group, mode=st.mode,
            chunk_bytes=st.chunk_bytes, backend=st.backend, validate=st.validate,
        )


def _num_responses(scores: torch.Tensor) -> int:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a (B, K) tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    return scores.shape[1]


def install_loss_head(model: nn.Module, settings: LossHeadSettings = LossHeadSettings()) -> DoRALossHead:
    """Replace ``model``'s output embedding by a ``DoRALossHead`` sharing its parameters; returns the head.

    Call it before ``deepspeed.initialize``. Tied embeddings stay tied: the head holds the same
    ``Parameter`` object as the input embedding.
    """
    current = model.get_output_embeddings()
    if isinstance(current, DoRALossHead):
        current.settings = settings
        return current
    if current is None or not isinstance(getattr(current, "weight", None), nn.Parameter):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (lm_head) to replace")
    head = DoRALossHead(current.weight, getattr(current, "bias", None), settings)
    model.set_output_embeddings(head)
    return head


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_linear_unsupported(model: nn.Module) -> str | None:
    """Why the fused-linear path cannot compute ``model``'s logits, or None when it can: it needs a linear
    output embedding whose output is the logits, untransformed."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if isinstance(head, DoRALossHead):
        return None
    if not isinstance(head, nn.Linear):
        return f"{type(lm).__name__} has no linear output embedding (lm_head)"
    config = getattr(lm, "config", None)
    for name, identity in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, identity)
        if value is not None and value != identity:
            return f"{type(lm).__name__} transforms its logits ({name} = {value})"
    return None


def resolve_loss_path(model: nn.Module, loss_path: str) -> str:
    """``auto``: ``fused_linear`` where the model allows it (least memory, measured fastest in
    benchmarks/RESULTS.md), else ``logits``. An explicit ``fused_linear`` the model cannot run is an error."""
    if loss_path not in LOSS_PATHS:
        raise ValueError(f"unknown loss_path {loss_path!r}; valid: {', '.join(LOSS_PATHS)}")
    reason = fused_linear_unsupported(model) if loss_path != "logits" else None
    if loss_path == "fused_linear" and reason:
        raise ValueError(f"loss_path 'fused_linear' cannot run here: {reason}; use 'logits'")
    if loss_path == "auto":
        return "logits" if reason else "fused_linear"
    return loss_path


class DoRAPolicy(nn.Module):
    """Root module for DeepSpeed: causal LM and DoRA loss in one forward (see the module docstring).

    ``validate=False`` for callers that validated their data at load: a step then makes no host
    synchronisation for checks.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: RobustObjective | ResolvedObjective = DEFAULT_OBJECTIVE,
        *,
        loss_path: str = "auto",
        mode: str = "single_pass",
        chunk_bytes: int | None = None,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective.resolve()
        self.loss_path = resolve_loss_path(model, loss_path)
        self.backend = backend
        self.validate = validate
        if self.loss_path == "fused_linear":
            install_loss_head(causal_lm(model), LossHeadSettings(self.objective, mode, chunk_bytes, backend, validate))

    @property
    def head(self) -> nn.Module:
        return causal_lm(self.model).get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        scores: torch.Tensor | None = None,
        h_tilde: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> DoRAOutput | tuple[torch.Tensor, torch.Tensor]:
        """``DoRAOutput`` of the N = B·K rows (row n = b·K + k) when ``scores`` (B, K) is given, else (S, L)
        per row. ``labels`` (N, T) in the Hugging Face convention; the other arguments as in ``dora_loss``."""
        aligned = shift_labels(labels)
        if self.loss_path == "fused_linear":
            # get_decoder(): the transformer body, also through a PEFT wrapper (whose base_model is not the body)
            body = causal_lm(self.model).get_decoder()
            hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(hidden, aligned, scores, h_tilde, ref_logps, process_group)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # Nothing reads the logits after the loss: the backward may overwrite them with their gradient.
        inplace = torch.is_grad_enabled()
        if scores is None:
            return sequence_logprobs(
                logits, aligned, backend=self.backend, validate=self.validate, inplace_backward=inplace
            )
        return dora_loss(
            logits, aligned, num_responses=_num_responses(scores), scores=scores, h_tilde=h_tilde,
            ref_logps=ref_logps, objective=self.objective, process_group=process_group, backend=self.backend,
            validate=self.validate, inplace_backward=inplace,
        )
