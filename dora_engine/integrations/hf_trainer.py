"""The DoRA loss with ``transformers.Trainer`` or a plain PyTorch loop (docs/design.md section 9).

- ``ListwiseCollator`` turns examples of B prompts × K responses into the op's batch: the rows of
  ``dora_engine.rows`` (N = B·K right-padded rows, row n = b·K + k, prompt then response then EOS, Hugging
  Face ``labels``), ``scores`` (B, K), and ``h_tilde`` (B,) and cached ``ref_logps`` (N,) where the examples
  have them; text examples are tokenised by ``RowTokenizer``, as the engine's are.
- ``reference_logps(model, batch)`` gives the reference model's summed log-probs S (N,) of a batch: compute
  them once, store them with the examples (``"ref_logps"``: K numbers) and the collator hands them back.
- ``listwise_loss(model, batch, objective)`` is the ``DoRAOutput`` of ``dora_loss`` on a batch; for a
  mixture-of-experts model whose config sets ``output_router_logits`` its loss adds the router
  load-balancing loss, ``router_aux_loss_coef · aux_loss``, as the engine's ``DoRAPolicy`` does.
- ``ListwiseTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` is ``listwise_loss``::

      trainer = ListwiseTrainer(model=model, args=TrainingArguments("out"),
                                train_dataset=records, processing_class=tokenizer,
                                objective=RobustObjective(loss="dpo_pl", strategy="dora", lam=1.0))
      trainer.train()

An example is either a record of the dataset schema (section 3: ``prompt`` as text or chat messages,
``responses`` with ``text`` and ``score``, optional ``h_tilde``), tokenised by the collator's tokenizer
(its chat template when it has one, as the engine does), or already tokenised: ``prompt_ids``,
``response_ids`` (K token lists, EOS included), ``scores`` (K numbers). Either may carry ``ref_logps``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from dora_engine.data.schema import RecordError
from dora_engine.integrations.scale import dataset_objective
from dora_engine.losses import ResolvedObjective, RobustObjective
from dora_engine.ops import DoRAOutput, dora_loss, sequence_logprobs, shift_labels
from dora_engine.ops.lm_head import router_loss_coefficient
from dora_engine.preference import data_parallel_group, preference_stats, weight_stats
from dora_engine.rows import Row, RowTokenizer, alignment_problem, keep_first, keep_last, pad_rows, scorable_rows

__all__ = ["ListwiseCollator", "ListwiseTrainer", "RobustObjective", "listwise_loss", "reference_logps"]

DEFAULT_OBJECTIVE = RobustObjective()  # dpo_pl under dora, λ = 1
# Example keys the collator reads: the columns a Trainer must not drop.
EXAMPLE_KEYS = ("prompt", "responses", "prompt_ids", "response_ids", "scores", "h_tilde", "ref_logps")


@dataclass
class ListwiseCollator:
    """Examples of K responses per prompt → the op's batch (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer; needed for examples given as text.
        max_prompt_tokens: keep the last tokens of a longer prompt (None: all).
        max_response_tokens: keep the first tokens of a longer response, EOS counted (None: all).
        chat_template: use the tokenizer's chat template for the prompt; None: when the tokenizer has one.
        pad_token_id: padding token; None: the tokenizer's pad token, else its EOS, else 0.
    """

    tokenizer: Any = None
    max_prompt_tokens: int | None = None
    max_response_tokens: int | None = None
    chat_template: bool | None = None
    pad_token_id: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("ListwiseCollator: no examples")
        rows, scores = [], []
        for i, example in enumerate(examples):
            example_rows, example_scores = self._rows(i, example)
            K = len(scores[0]) if scores else len(example_scores)
            problem = alignment_problem(f"example {i}", example_scores, None, K=K, k_from="this batch",
                                        needs_h_tilde=False)
            if problem:
                raise RecordError(problem)
            rows.extend(example_rows)
            scores.append(example_scores)
        K = len(scores[0])
        if K < 2:
            raise ValueError(f"example 0 has {K} response; the losses need K >= 2")
        batch = pad_rows(rows, self._pad_id())
        batch["scores"] = torch.tensor(scores, dtype=torch.float32)
        for key, shape in (("h_tilde", ()), ("ref_logps", (K,))):
            values = [example.get(key) for example in examples]
            present = [v is not None for v in values]
            if all(present):
                tensor = torch.tensor(values, dtype=torch.float64 if key == "ref_logps" else torch.float32)
                if tuple(tensor.shape[1:]) != shape:
                    raise ValueError(f"{key!r} must be {'a number' if not shape else f'{K} numbers'} per example")
                batch[key] = tensor.reshape(-1)
            elif any(present):
                missing = present.index(False)
                raise ValueError(f"example {missing} has no {key!r} but other examples of the batch do")
        return batch

    def _pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if value is not None:
                return int(value)
        return 0

    def _rows(self, i: int, example: Mapping[str, Any]) -> tuple[list[Row], list[float | None]]:
        """The rows of example ``i`` and its scores (None where a response has none)."""
        where = f"example {i}"
        if "prompt_ids" in example:
            responses = list(example["response_ids"])
            scores = example.get("scores")
            if scores is None or len(scores) != len(responses):
                raise ValueError(f"{where}: 'scores' must give one number per response")
            prompt = keep_last(list(example["prompt_ids"]), self.max_prompt_tokens)
            ids = [keep_first(list(r), self.max_response_tokens) for r in responses]
            rows = scorable_rows(where, prompt, ids, [f"response_ids[{k}]" for k in range(len(ids))])
            return rows, [float(s) for s in scores]
        if self.tokenizer is None:
            raise ValueError(f"{where} is text (no 'prompt_ids'): give ListwiseCollator a tokenizer")
        if "prompt" not in example or "responses" not in example:
            raise ValueError(f"{where} needs 'prompt' and 'responses' (or 'prompt_ids' and 'response_ids')")
        tokenizer = RowTokenizer(self.tokenizer, chat_template=self.chat_template,
                                 max_prompt_tokens=self.max_prompt_tokens, max_response_tokens=self.max_response_tokens)
        responses = example["responses"]
        rows = tokenizer.rows(where, example["prompt"], [r["text"] for r in responses], range(len(responses)))
        scores = [r.get("score") for r in responses]
        return rows, [None if s is None else float(s) for s in scores]


def _forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)


def _logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return _forward(model, batch).logits


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (DistributedDataParallel, DeepSpeed, FSDP: their ``module``),
    whose config says whether it trains with a router loss."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


@torch.no_grad()
def reference_logps(model: nn.Module, batch: Mapping[str, torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """The summed log-probs S (N,) of each row's response tokens under ``model`` (no gradient): the
    ``ref_logps`` of a batch of ``ListwiseCollator``, to compute once and store with the examples."""
    S, _ = sequence_logprobs(_logits(model, batch), shift_labels(batch["labels"]), backend=backend)
    return S


def listwise_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    objective: RobustObjective | ResolvedObjective = DEFAULT_OBJECTIVE,
    *,
    ref_logps: torch.Tensor | None = None,
    process_group: Any = None,
    backend: str = "auto",
) -> DoRAOutput:
    """``dora_loss`` of ``model`` on a ``ListwiseCollator`` batch: the model's logits with the batch's labels
    aligned by ``shift_labels``, its scores, h̃ (used by the strategies that need it) and reference log-probs
    (``ref_logps``, else the batch's). ``process_group``: reduce over the prompts of every rank. A model
    trained with a router loss (``ops.lm_head.router_loss_coefficient``) adds ``router_aux_loss_coef`` ·
    its ``aux_loss`` to the loss, as ``DoRAPolicy`` does (docs/design.md section 5)."""
    out, aux = _objective_and_router_loss(model, batch, objective, ref_logps, process_group, backend)
    return _with_router_loss(model, out, aux)


def _objective_and_router_loss(
    model: nn.Module, batch: Mapping[str, torch.Tensor], objective: RobustObjective | ResolvedObjective,
    ref_logps: torch.Tensor | None, process_group: Any, backend: str,
) -> tuple[DoRAOutput, torch.Tensor | None]:
    """(``listwise_loss`` without the router loss, the model's router loss ``aux_loss`` or None): what
    ``DoRAPolicy.compute`` returns on its logits path."""
    objective = objective.resolve()
    scores = batch["scores"]
    ref = ref_logps if ref_logps is not None else batch.get("ref_logps")
    h = batch.get("h_tilde") if objective.strategy.needs_h_tilde else None
    output = _forward(model, batch)
    aux = output.aux_loss if router_loss_coefficient(_unwrapped(model)) is not None else None
    out = dora_loss(
        output.logits, shift_labels(batch["labels"]), num_responses=scores.shape[1], scores=scores,
        h_tilde=h, ref_logps=ref, objective=objective, process_group=process_group, backend=backend,
    )
    return out, aux


def _with_router_loss(model: nn.Module, out: DoRAOutput, aux: torch.Tensor | None) -> DoRAOutput:
    """``out`` with ``router_aux_loss_coef`` · ``aux`` added to its loss (unchanged when ``aux`` is None)."""
    if aux is None:
        return out
    return out._replace(loss=out.loss + router_loss_coefficient(_unwrapped(model)) * aux)


class ListwiseTrainer(transformers.Trainer):
    """``transformers.Trainer`` training with ``listwise_loss`` (see the module docstring).

    Args (keyword, besides ``Trainer``'s):
        objective: the loss, its parameters, the strategy, λ and the scale of h̃; under
            ``h_scale="dataset"`` without ``h_mean``, c is the mean of the training dataset's ``h_tilde``
            (docs/design.md section 4.3).
        ref_model: the reference model, for losses that need one when the examples carry no ``ref_logps``
            (moved to the training device; for DeepSpeed or FSDP runs cache ``ref_logps`` instead).
        backend: the op's backend.

    ``data_collator`` defaults to ``ListwiseCollator(processing_class)``. The logged loss is the batch
    objective (+ ``router_aux_loss_coef`` · ``aux_loss`` for a model trained with a router loss, as
    ``listwise_loss``); ``rewards/*``, ``logps/*``, ``robust/ess``, ``robust/weight_max``, ``h_tilde/mean``
    and the router loss ``aux_loss`` are logged beside it. With several processes the strategy reduces over
    every rank's prompts.
    """

    # The loss is a mean over prompts: gradient accumulation averages micro-steps (docs/design.md section 5.5)
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, objective: RobustObjective | ResolvedObjective = DEFAULT_OBJECTIVE,
                 ref_model: nn.Module | None = None, backend: str = "auto", **kwargs: Any) -> None:
        if kwargs.get("data_collator") is None and len(args) < 3:
            kwargs["data_collator"] = ListwiseCollator(kwargs.get("processing_class"))
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the same for transformers versions without loss_is_scaled_for_ga
        # RobustObjective(h_scale="dataset") without h_mean: c is the mean h̃ of the training dataset
        self.objective = dataset_objective(objective, self.train_dataset, "h_tilde") \
            if isinstance(objective, RobustObjective) else objective.resolve()
        self.backend = backend
        self.ref_model = None
        if ref_model is not None:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("ListwiseTrainer: with DeepSpeed or FSDP, cache ref_logps in the data instead")
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self._stats: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(EXAMPLE_KEYS)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        ref = inputs.get("ref_logps")
        if ref is None and self.objective.loss.needs_reference:
            if self.ref_model is None:
                raise ValueError(
                    f"loss {self.objective.loss.name!r} needs reference log-probs: give the examples 'ref_logps' "
                    "(reference_logps) or the trainer a ref_model"
                )
            ref = reference_logps(self.ref_model, inputs, backend=self.backend)
        objective, aux = _objective_and_router_loss(model, inputs, self.objective, ref, data_parallel_group(),
                                                    self.backend)
        out = _with_router_loss(model, objective, aux)
        self._record(out, inputs, ref, aux)
        return (out.loss, out) if return_outputs else out.loss

    @torch.no_grad()
    def _record(self, out: DoRAOutput, inputs: dict[str, Any], ref: torch.Tensor | None,
                aux: torch.Tensor | None) -> None:
        stats = self._stats["train" if self.model.training else "eval"]
        gather = self.accelerator.gather
        if aux is not None:
            stats.setdefault("aux_loss", []).append(gather(aux.detach().reshape(1)).mean().item())
        objective = self.objective
        for name, value in preference_stats(out, inputs["scores"], ref, objective.loss.name, objective.params).items():
            stats.setdefault(name, []).append(gather(value).mean().item())
        weights = out.weights if data_parallel_group() is None else gather(out.weights)
        for name, value in weight_stats(weights).items():
            stats.setdefault(name, []).append(value)
        if "h_tilde" in inputs:
            stats.setdefault("h_tilde/mean", []).append(gather(inputs["h_tilde"]).float().mean().item())

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._stats[mode].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self._stats[mode] = {}
        super().log(logs, *args, **kwargs)
