"""The DoRA loss as the model's output layer, so that it works with ZeRO-3 partitioned lm_head weights.

Under ZeRO-3 a parameter holds its full value only inside the forward of a module that owns it, and
again during that module's backward: DeepSpeed's hooks gather it there. Reading
``engine.module.lm_head.weight`` from the training loop gives an empty placeholder. So the fused-linear
loss (DESIGN.md section 5) runs inside the forward of the module that owns the weight:

- ``DoRALossHead`` owns the lm_head weight (and bias) directly. ``head(hidden)`` returns logits like the
  ``nn.Linear`` it replaces (generation, evaluation); ``head(hidden, labels, num_responses=…, scores=…)``
  returns the ``DoRAOutput`` of ``dora_loss_linear`` and ``head(hidden, labels)`` the (S, L) of
  ``sequence_logprobs_linear``, never holding the full logits.
- ``install_loss_head(model)`` swaps a Hugging Face causal LM's output embedding for a ``DoRALossHead``
  holding the very same ``Parameter`` objects. With tied input/output embeddings that parameter is also
  the input embedding's, so both modules own it and ZeRO-3 gathers it for either (and sums both
  gradients into it).
- ``DoRAPolicy(model)`` is the root module to hand to ``deepspeed.initialize`` (``model`` a Hugging Face
  causal LM, optionally PEFT-wrapped): its forward runs the decoder body and the loss head in one root
  forward, so DeepSpeed's per-step parameter tracing sees the usual order of sub-module calls.

What a trainer calls (labels in the Hugging Face convention, ``labels[:, t]`` is token t and
``-100`` marks prompt and padding tokens; the shift to "logits at t predict token t + 1" happens here)::

    policy = DoRAPolicy(model, mode="single_pass")          # before deepspeed.initialize
    engine, *_ = deepspeed.initialize(model=policy, config=ds_config, optimizer=opt)
    out = engine(input_ids, attention_mask, labels, num_responses=K, scores=scores, h_tilde=h,
                 ref_logps=ref, loss="dpo_pl", strategy="dora", lam=1.0,
                 process_group=dist.group.WORLD)            # global robust reduction (section 5)
    engine.backward(out.loss)
    engine.step()

``engine(input_ids, attention_mask, labels)`` without loss arguments gives (S, L) per row the same way
(e.g. for the reference log-prob cache, under ``torch.no_grad()``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dora_engine.ops import DoRAOutput, dora_loss_linear, sequence_logprobs_linear


class DoRALossHead(nn.Module):
    """Output layer owning ``weight`` (V, H) and ``bias`` (V,) or None; logits or the DoRA loss."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None = None,
        *,
        mode: str = "single_pass",
        chunk_bytes: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self.backend = backend

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor | None = None, **loss_kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | DoRAOutput:
        """hidden (N, T, H) and aligned labels (N, T) → ``dora_loss_linear`` with ``loss_kwargs``.

        Without ``loss_kwargs``: (S, L) of ``sequence_logprobs_linear``. Without labels: the logits.
        """
        if labels is None:
            if loss_kwargs:
                raise TypeError(f"loss arguments {sorted(loss_kwargs)} given without labels")
            return F.linear(hidden, self.weight, self.bias)
        if not loss_kwargs:
            return sequence_logprobs_linear(
                hidden, self.weight, labels, bias=self.bias, chunk_bytes=self.chunk_bytes, backend=self.backend
            )
        return dora_loss_linear(
            hidden, self.weight, labels, bias=self.bias, chunk_bytes=self.chunk_bytes, mode=self.mode,
            backend=self.backend, **loss_kwargs,
        )


def install_loss_head(model: nn.Module, **head_options: Any) -> DoRALossHead:
    """Replace ``model``'s output embedding by a ``DoRALossHead`` sharing its parameters; returns the head.

    Call it before ``deepspeed.initialize``. Tied embeddings stay tied: the head holds the same
    ``Parameter`` object as the input embedding.
    """
    current = model.get_output_embeddings()
    if isinstance(current, DoRALossHead):
        return current
    if current is None or not isinstance(getattr(current, "weight", None), nn.Parameter):
        raise ValueError(f"{type(model).__name__} has no linear output embedding (lm_head) to replace")
    head = DoRALossHead(current.weight, getattr(current, "bias", None), **head_options)
    model.set_output_embeddings(head)
    return head


class DoRAPolicy(nn.Module):
    """Root module for DeepSpeed: causal-LM body and DoRA loss head in one forward (see module docstring)."""

    def __init__(self, model: nn.Module, **head_options: Any) -> None:
        super().__init__()
        self.model = model
        install_loss_head(model, **head_options)

    @property
    def head(self) -> DoRALossHead:
        return self.model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        **loss_kwargs: Any,
    ) -> DoRAOutput | tuple[torch.Tensor, torch.Tensor]:
        """``DoRAOutput`` of the N = B·K rows with ``loss_kwargs`` (as in ``dora_loss``), else (S, L).

        ``labels`` unshifted (``labels[:, t]`` is token t, -100 ignored).
        """
        # get_decoder(): the transformer body, also through a PEFT wrapper (whose base_model is not the body)
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Hidden states at t predict token t + 1.
        return self.head(hidden[:, :-1], labels[:, 1:].contiguous(), **loss_kwargs)
