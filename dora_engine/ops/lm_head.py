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
  Known config names decide at once (``LOGIT_TRANSFORMS``); otherwise the first forward compares the
  model's own logits with the loss head's on a few tokens (``fused_linear_mismatch``) and ``auto`` falls
  back to ``logits`` when they differ beyond rounding, while an explicit ``fused_linear`` is refused.
- A mixture-of-experts model whose config sets ``output_router_logits`` trains with its router
  load-balancing loss on either path: ``loss + router_aux_loss_coef · aux_loss`` (``compute`` returns
  ``aux_loss`` apart).
- ``DoRALossHead`` owns the lm_head weight (and bias) and computes as its ``LossHeadSettings`` say.
  ``head(hidden)`` returns logits like the ``nn.Linear`` it replaces (generation, evaluation); with labels
  it returns (S, L), with ``nll=True`` too the ``NLLOutput`` of ``nll_linear`` (SFT), and with scores the
  ``DoRAOutput``.
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
the reference log-prob cache, under ``torch.no_grad()``), and with ``nll=True`` the summed token NLL
(``NLLOutput``: SFT, formed in one pass on the fused-linear path with ``mode="single_pass"``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dora_engine.errors import UserValueError
from dora_engine.losses import ResolvedObjective, RobustObjective
from dora_engine.ops import (
    DoRAOutput,
    NLLOutput,
    dora_loss,
    dora_loss_linear,
    nll_linear,
    sequence_logprobs,
    sequence_logprobs_linear,
    shift_labels,
)
from dora_engine.ops.distributed import data_parallel_group

LOSS_PATHS = ("auto", "logits", "fused_linear")
DEFAULT_OBJECTIVE = RobustObjective()  # dpo_pl under dora, λ = 1
#: Config attributes of Hugging Face models that transform the lm_head's output, which the fused-linear
#: path (logits = hidden @ Wᵀ + b) would leave out; with the value that means "no transform".
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
#: Tokens of one row on which the first forward compares the two paths' logits (``fused_linear_mismatch``).
CHECK_TOKENS = 8
#: Rounding the comparison allows: this many machine epsilons of the logits' dtype, relative to the largest
#: logit. The two paths run the same operations, so a plain linear head agrees to the last bit or nearly.
ROUNDING_EPSILONS = 4
#: The signature (first parameters) of transformers' Switch-style router loss that the fused-linear path calls.
ROUTER_LOSS_PARAMETERS = ["gate_logits", "num_experts", "top_k", "attention_mask"]


@dataclass(frozen=True)
class LossHeadSettings:
    """How a ``DoRALossHead`` computes its loss (arguments of ``dora_loss_linear``)."""

    objective: RobustObjective | ResolvedObjective = DEFAULT_OBJECTIVE
    """The loss and robust strategy."""
    mode: str = "single_pass"
    """``single_pass`` (3 GEMMs) or ``recompute`` (4 GEMMs, least memory), for the loss and the NLL."""
    chunk_bytes: int | None = None
    """Bytes of one chunk of logits; None: ``ops.chunking.default_chunk_bytes``."""
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
        nll: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | NLLOutput | DoRAOutput:
        """hidden (N, T, H) → logits; with labels aligned to hidden (N, T) → (S, L) of
        ``sequence_logprobs_linear``, or with ``nll`` the ``NLLOutput`` of ``nll_linear``; with scores (B, K)
        too → ``DoRAOutput`` of ``dora_loss_linear``."""
        if labels is None:
            if scores is not None or nll:
                raise ValueError(f"{'scores' if scores is not None else 'nll'} given without labels")
            return F.linear(hidden, self.weight, self.bias)
        st = self.settings
        if _nll_without_scores(nll, scores):
            return nll_linear(
                hidden, self.weight, labels, bias=self.bias, mode=st.mode, chunk_bytes=st.chunk_bytes,
                backend=st.backend, validate=st.validate,
            )
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


def _nll_without_scores(nll: bool, scores: torch.Tensor | None) -> bool:
    """Whether the NLL is asked for; asking for it with scores is an error (the NLL has none)."""
    if nll and scores is not None:
        raise ValueError("nll and scores given together: the NLL has no scores")
    return nll


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


def model_configs(lm: nn.Module) -> list[Any]:
    """The config of the causal LM ``lm`` and, for a multimodal wrapper (``*ForConditionalGeneration``), its
    text model's (``get_text_config()``), which holds the settings of the language model's head."""
    config = getattr(lm, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def router_loss_coefficient(model: nn.Module) -> float | None:
    """``router_aux_loss_coef`` of a mixture-of-experts model whose config sets ``output_router_logits``
    (the model then returns its router load-balancing loss as ``aux_loss``), else None."""
    for config in model_configs(causal_lm(model)):
        if getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", None) is not None:
            return float(config.router_aux_loss_coef)
    return None


def router_loss_function(model: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The router loss as the causal LM's forward computes it, ``f(router_logits, attention_mask=mask)`` on
    its body's router logits: transformers' ``load_balancing_loss_func`` of the model's own modeling module
    with the model's ``num_experts`` and ``num_experts_per_tok``. None when the model has no such function."""
    lm = causal_lm(model)
    loss_func = getattr(sys.modules.get(type(lm).__module__), "load_balancing_loss_func", None)
    num_experts, top_k = getattr(lm, "num_experts", None), getattr(lm, "num_experts_per_tok", None)
    if not callable(loss_func) or num_experts is None or top_k is None:
        return None
    if list(inspect.signature(loss_func).parameters)[:4] != ROUTER_LOSS_PARAMETERS:
        return None
    return functools.partial(loss_func, num_experts=num_experts, top_k=top_k)


def fused_linear_unsupported(model: nn.Module) -> str | None:
    """Why the fused-linear path cannot compute ``model``'s loss, or None when nothing known says so. It needs
    a linear output embedding whose output is the logits, untransformed (judged here by the names in
    ``LOGIT_TRANSFORMS``, in the model's config and its text model's), and for a model trained with a router
    loss, ``router_loss_function``. The first forward measures the rest (``fused_linear_mismatch``)."""
    lm = causal_lm(model)
    name = type(lm).__name__
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear | DoRALossHead):
        return f"{name} has no linear output embedding (lm_head)"
    for config in model_configs(lm):
        for key, identity in LOGIT_TRANSFORMS.items():
            value = getattr(config, key, identity)
            if value is not None and value != identity:
                return f"{name} transforms its logits ({key} = {value})"
    if router_loss_coefficient(lm) is not None and router_loss_function(lm) is None:
        return f"{name} adds a router loss (output_router_logits) that only its own forward computes"
    return None


def resolve_loss_path(model: nn.Module, loss_path: str) -> str:
    """``auto``: ``fused_linear`` where the model allows it (least memory, measured fastest in
    benchmarks/RESULTS.md), else ``logits``. An explicit ``fused_linear`` the model cannot run is an error.
    Judged by ``fused_linear_unsupported``; ``DoRAPolicy`` measures the rest on its first forward."""
    if loss_path not in LOSS_PATHS:
        raise ValueError(f"unknown loss_path {loss_path!r}; valid: {', '.join(LOSS_PATHS)}")
    reason = fused_linear_unsupported(model) if loss_path != "logits" else None
    if loss_path == "fused_linear" and reason:
        raise UserValueError(f"loss_path 'fused_linear' cannot run here: {reason}; use 'logits' or 'auto'")
    if loss_path == "auto":
        return "logits" if reason else "fused_linear"
    return loss_path


def check_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(1, ≤ CHECK_TOKENS) ids: the first real tokens (attention mask 1) of the row with the most of them."""
    if attention_mask is None:
        return input_ids[:1, :CHECK_TOKENS]
    row = int(attention_mask.sum(dim=1).argmax())
    real = input_ids[row][attention_mask[row].bool()]
    return (real if real.numel() else input_ids[row])[:CHECK_TOKENS].unsqueeze(0)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout, no router jitter) inside the block; each module's mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def relative_difference(own: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """max |own − other| / max |own| as a float64 scalar on ``other``'s device; +inf when ``own`` is missing,
    the shapes differ or a value is not finite."""
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=other.device)
    if own is None or own.shape != other.shape:
        return inf
    own64, other64 = own.detach().double(), other.detach().double()
    scale = own64.abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    difference = (own64 - other64).abs().max() / scale
    return torch.where(torch.isfinite(difference), difference, inf)


def fused_linear_mismatch(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> str | None:
    """Why the fused-linear path does not compute ``model``'s own loss, with the measured difference; None
    when it does (docs/design.md section 5.7).

    On ``check_tokens`` of the batch, without gradient and in eval mode, it compares the model's logits
    with its output embedding applied to its decoder body's hidden states (what the fused-linear path
    computes) and, for a model trained with a router loss, the model's ``aux_loss`` with
    ``router_loss_function`` on the body's router logits. A difference is relative to the largest magnitude
    and may be ``ROUNDING_EPSILONS`` machine epsilons of its dtype. With ``process_group`` the largest
    difference over its ranks decides, so that every rank takes the same path though each sees its own
    tokens: the call is then collective.
    """
    lm = causal_lm(model)
    ids = check_tokens(input_ids, attention_mask)
    router = router_loss_function(lm) if router_loss_coefficient(lm) is not None else None
    outputs = {"output_router_logits": True} if router is not None else {}
    with torch.no_grad(), evaluating(model):
        own = model(input_ids=ids, use_cache=False, **outputs)
        body = lm.get_decoder()(input_ids=ids, **outputs)
        via_head = lm.get_output_embeddings()(body.last_hidden_state)
        measured = [relative_difference(own.logits, via_head)]
        dtypes = [torch.promote_types(own.logits.dtype, via_head.dtype)]
        if router is not None:
            aux = router(body.router_logits, attention_mask=None)
            measured.append(relative_difference(getattr(own, "aux_loss", None), aux))
            dtypes.append(aux.dtype)
    differences = torch.stack(measured)
    if process_group is not None:
        dist.all_reduce(differences, op=dist.ReduceOp.MAX, group=process_group)
    name = type(lm).__name__
    what = ["its logits are not its lm_head's output on its decoder's hidden states (a logit transform)",
            "its router loss is not load_balancing_loss_func on its decoder's router logits"]
    for difference, dtype, problem in zip(differences.tolist(), dtypes, what, strict=False):
        allowed = ROUNDING_EPSILONS * torch.finfo(dtype).eps
        if not difference <= allowed:
            return (f"{name}: {problem}; measured relative difference {difference:.3g}, rounding in "
                    f"{str(dtype).removeprefix('torch.')} allows {allowed:.1g}")
    return None


class DoRAPolicy(nn.Module):
    """Root module for DeepSpeed: causal LM and DoRA loss in one forward (see the module docstring).

    ``validate=False`` for callers that validated their data at load: a step then makes no host
    synchronisation for checks. ``loss_path`` is the path taken; ``requested_loss_path`` the one asked for.
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
        self.requested_loss_path = loss_path
        self.loss_path = resolve_loss_path(model, loss_path)
        self.router_aux_loss_coef = router_loss_coefficient(model)
        self.router_loss = router_loss_function(model) if self.router_aux_loss_coef is not None else None
        self.checked = self.loss_path != "fused_linear"  # the logits path is the model's own: nothing to check
        self.backend = backend
        self.validate = validate
        if self.loss_path == "fused_linear":
            install_loss_head(causal_lm(model), LossHeadSettings(self.objective, mode, chunk_bytes, backend, validate))

    @property
    def head(self) -> nn.Module:
        return causal_lm(self.model).get_output_embeddings()

    def check_fused_linear(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        """Measure once that the fused-linear path computes the model's own loss (``fused_linear_mismatch``
        over ``process_group``, else ``data_parallel_group()``); when it does not, ``auto`` takes ``logits``
        with one warning saying why, and an explicit ``fused_linear`` is refused (``UserValueError``)."""
        group = process_group if process_group is not None else data_parallel_group()
        reason = fused_linear_mismatch(self.model, input_ids, attention_mask, group)
        if reason is not None and self.requested_loss_path == "fused_linear":
            raise UserValueError(f"loss_path 'fused_linear' cannot run here: {reason}; use 'logits' or 'auto'")
        if reason is not None:
            warnings.warn(f"dora_engine: loss_path 'auto' takes 'logits': {reason}", RuntimeWarning, stacklevel=3)
            self.loss_path = "logits"
        self.checked = True

    def compute(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        scores: torch.Tensor | None = None,
        h_tilde: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        process_group: dist.ProcessGroup | None = None,
        nll: bool = False,
    ) -> tuple[DoRAOutput | NLLOutput | tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """(the op's result, the router loss): the result as ``forward`` returns it but without the router
        loss, and the model's router load-balancing loss ``aux_loss`` (None unless its config sets
        ``output_router_logits``). The first call on the fused-linear path runs ``check_fused_linear``."""
        nll = _nll_without_scores(nll, scores)
        if not self.checked:
            self.check_fused_linear(input_ids, attention_mask, process_group)
        aligned = shift_labels(labels)
        if self.loss_path == "fused_linear":
            outputs = {"output_router_logits": True} if self.router_loss is not None else {}
            # get_decoder(): the transformer body, also through a PEFT wrapper (whose base_model is not the body)
            body = causal_lm(self.model).get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **outputs)
            aux = self.router_loss(body.router_logits, attention_mask=attention_mask) if outputs else None
            return self.head(body.last_hidden_state, aligned, scores, h_tilde, ref_logps, process_group, nll), aux
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        aux = getattr(output, "aux_loss", None) if self.router_aux_loss_coef is not None else None
        logits = output.logits
        # Nothing reads the logits after the loss: the backward may overwrite them with their gradient.
        inplace = torch.is_grad_enabled()
        if scores is None:
            logprobs = sequence_logprobs(
                logits, aligned, backend=self.backend, validate=self.validate, inplace_backward=inplace
            )
            return NLLOutput.of(*logprobs) if nll else logprobs, aux
        return dora_loss(
            logits, aligned, num_responses=_num_responses(scores), scores=scores, h_tilde=h_tilde,
            ref_logps=ref_logps, objective=self.objective, process_group=process_group, backend=self.backend,
            validate=self.validate, inplace_backward=inplace,
        ), aux

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        scores: torch.Tensor | None = None,
        h_tilde: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        process_group: dist.ProcessGroup | None = None,
        nll: bool = False,
    ) -> DoRAOutput | NLLOutput | tuple[torch.Tensor, torch.Tensor]:
        """``DoRAOutput`` of the N = B·K rows (row n = b·K + k) when ``scores`` (B, K) is given, else (S, L)
        per row, or with ``nll`` the ``NLLOutput`` (the summed token NLL −Σ S, e.g. for SFT). ``labels`` (N, T)
        in the Hugging Face convention; the other arguments as in ``dora_loss``. With a router loss the
        ``DoRAOutput``'s loss is the objective + ``router_aux_loss_coef`` · aux_loss (``compute`` gives the
        router loss apart, e.g. for a loss built on (S, L) or the NLL, to which it is not added). The first
        forward on the fused-linear path is collective when a process group is initialised
        (``check_fused_linear``)."""
        result, aux = self.compute(input_ids, attention_mask, labels, scores, h_tilde, ref_logps, process_group, nll)
        if scores is None or aux is None:
            return result
        return result._replace(loss=result.loss + self.router_aux_loss_coef * aux)
