"""TRL's ``DPOTrainer`` with its loss computed by the DoRA op (docs/design.md section 9).

``DoRADPOTrainer`` keeps everything of TRL's trainer (datasets and their preparation, the reference
model or precomputed reference log-probs, PEFT, DeepSpeed/FSDP, evaluation, logging) and replaces the loss:
each prompt's chosen and rejected completions become K = 2 rows of ``dora_engine.ops.dora_loss``, the
chosen one scored above the rejected one, and the batch objective is any loss of
``dora_engine.losses.LOSSES`` under any robust strategy, with h̃ read from a dataset column::

    from dora_engine.integrations.trl import DoRADPOConfig, DoRADPOTrainer

    args = DoRADPOConfig(output_dir="out", dora_loss="dpo", dora_strategy="dora", dora_lam=1.0, beta=0.1)
    trainer = DoRADPOTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()   # dataset: prompt / chosen / rejected (+ h_tilde) columns, TRL's formats

``loss="dpo", strategy="erm"`` is TRL's ``loss_type="sigmoid"``; ``robust_dpo`` with ``eps`` is its
``robust`` with ``label_smoothing``, ``exo`` its ``exo_pair``, and ``ipo`` with
``{"length_normalize": True}`` its ``ipo``. With several processes the robust reduction spans the prompts
of every rank (section 5.5).

``dora_loss_path`` chooses where the loss reads the model's output, as the engine's ``train.loss_path``
(``dora_engine.ops.lm_head``): on ``fused_linear`` (``auto``'s choice where the model's logits are its
lm_head's output) the model's forward runs its decoder and the loss head's ``dora_loss_linear``, so the
logits are never held; on ``logits`` the op's backward is written over the model's logits.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from trl import DPOConfig, DPOTrainer

from dora_engine.errors import UserValueError
from dora_engine.integrations.scale import dataset_objective
from dora_engine.losses import (
    TRAINING_H_SCALE,
    TRAINING_LAM,
    ObjectiveError,
    ResolvedObjective,
    RobustObjective,
    get_loss,
)
from dora_engine.ops import OP_BACKENDS, DoRAOutput, dora_loss, shift_labels
from dora_engine.ops.lm_head import LOSS_PATHS, DoRAPolicy, causal_lm
from dora_engine.preference import data_parallel_group, preference_stats, weight_stats
from dora_engine.rows import IGNORE_INDEX, completion_labels, response_major_order

__all__ = ["DoRADPOConfig", "DoRADPOTrainer"]

# TRL loss options that the DoRA loss replaces: a value other than this default is refused, so that no
# setting is silently ignored.
_REPLACED_OPTIONS = {
    "loss_type": (["sigmoid"], "choose the loss with `dora_loss`"),
    "loss_weights": (None, "one loss is computed, `dora_loss`"),
    "label_smoothing": (0.0, "set ε with `dora_loss_params={'eps': ...}` (robust_dpo, exo)"),
    "ld_alpha": (None, "the log-probs are the full sums of the completion tokens"),
    "f_divergence_type": ("reverse_kl", "the losses use the log-ratio ρ = S − S_ref"),
    "use_weighting": (False, "weigh prompts with a robust strategy (`dora_strategy`) and h̃"),
}
#: The config field of each ``RobustObjective`` field.
_OBJECTIVE_FIELDS = {"loss": "dora_loss", "loss_params": "dora_loss_params", "strategy": "dora_strategy",
                     "lam": "dora_lam", "h_scale": "dora_h_scale", "h_mean": "dora_h_mean"}
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "h_tilde"}


@dataclass
class DoRADPOConfig(DPOConfig):
    r"""
    Configuration class for the [`DoRADPOTrainer`]: TRL's [`~trl.DPOConfig`] with the loss of dora-engine.

    The loss is a preference loss of `dora_engine.losses` on each prompt's chosen and rejected completions
    (K = 2 responses, the chosen one ranked first), and the training objective is a robust strategy over the
    prompts of the batch (docs/design.md section 4). TRL's own loss options (`loss_type`, `loss_weights`,
    `label_smoothing`, `ld_alpha`, `f_divergence_type`, `use_weighting`) must keep their defaults.

    Parameters:
        dora_loss (`str`, *optional*, defaults to `"dpo"`):
            Preference loss: `"dpo"`, `"rdpo"`, `"ipo"`, `"robust_dpo"`, `"exo"`, `"simpo"`, or a listwise loss
            of `dora_engine.losses.LOSSES` (they apply to K = 2 as well).
        dora_loss_params (`dict[str, Any]`, *optional*):
            Overrides of the loss's default parameters, e.g. `{"eps": 0.1}` for `"robust_dpo"` or
            `{"length_normalize": True}` for TRL's length-normalised `"ipo"`.
        beta (`float`, *optional*):
            β of a loss that has one. `None` keeps the loss's own default (0.1 for `"dpo"`, 2.0 for `"simpo"`).
            Setting both `beta` and `dora_loss_params["beta"]` is an error.
        dora_strategy (`str`, *optional*, defaults to `"dora"`):
            Robust strategy over the prompts of a batch: `"erm"` (the mean), `"reweight"`, `"dro"`, `"dora"` or
            `"drdpo"`. `"reweight"` and `"dora"` need the h̃ column.
        dora_lam (`float`, *optional*, defaults to `1.0`):
            λ > 0 of `"dro"`, `"dora"` and `"drdpo"`.
        dora_h_scale (`str`, *optional*, defaults to `"none"`):
            Scale of h̃ before `"reweight"` and `"dora"` (docs/design.md section 4.3): `"none"` (h̃ as given),
            `"dataset"` (divided by its mean over the training dataset, so that λ means the same on every
            dataset) or `"batch"` (divided by the mean over the global batch).
        dora_h_mean (`float`, *optional*):
            The c of `"dataset"`, e.g. from the calibration report; `None`: the mean of the training dataset's
            h̃ column, taken when the trainer is built.
        h_tilde_column (`str`, *optional*, defaults to `"h_tilde"`):
            Dataset column with each prompt's calibration weight h̃ > 0 (`dora-engine calibrate` writes it).
        dora_backend (`str`, *optional*, defaults to `"auto"`):
            Backend of the op: `"auto"` (the fused C++/CUDA op, falling back to PyTorch when it cannot be built),
            `"fused"` or `"reference"`.
        dora_loss_path (`str`, *optional*, defaults to `"auto"`):
            `"fused_linear"`: the decoder's hidden states → `dora_loss_linear` in the output layer, never holding
            all logits (the logits' token statistics `entropy`, `mean_token_accuracy` and `logits/*` are then not
            logged); `"logits"`: the model's logits → `dora_loss`; `"auto"`: `"fused_linear"` unless the model's
            logits are more than its lm_head's output (a known config name, or measured on the first step, as
            the engine's `train.loss_path`) or a prompt-learning PEFT model prepends virtual tokens.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["dora_loss_params"]  # JSON on the command line

    dora_loss: str = field(
        default="dpo",
        metadata={
            "help": "Preference loss: 'dpo', 'rdpo', 'ipo', 'robust_dpo', 'exo', 'simpo', or a listwise loss of "
            "`dora_engine.losses.LOSSES` (they apply to K = 2 as well)."
        },
    )
    dora_loss_params: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Overrides of the loss's default parameters, e.g. {'eps': 0.1} for 'robust_dpo' or "
            "{'length_normalize': True} for TRL's length-normalised 'ipo'."
        },
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "β of a loss that has one. None keeps the loss's own default (0.1 for 'dpo', 2.0 for "
            "'simpo'). Setting both `beta` and `dora_loss_params['beta']` is an error."
        },
    )
    dora_strategy: str = field(
        default="dora",
        metadata={
            "help": "Robust strategy over the prompts of a batch: 'erm' (the mean), 'reweight', 'dro', 'dora' or "
            "'drdpo'. 'reweight' and 'dora' need the h̃ column."
        },
    )
    dora_lam: float = field(default=TRAINING_LAM, metadata={"help": "λ > 0 of 'dro', 'dora' and 'drdpo'."})
    dora_h_scale: str = field(
        default=TRAINING_H_SCALE,
        metadata={
            "help": "Scale of h̃ before 'reweight' and 'dora': 'none' (as given), 'dataset' (divided by its mean over "
            "the training dataset) or 'batch' (divided by the mean over the global batch)."
        },
    )
    dora_h_mean: float | None = field(
        default=None,
        metadata={"help": "The c of 'dataset'; None: the mean of the training dataset's h̃ column."},
    )
    h_tilde_column: str = field(
        default="h_tilde",
        metadata={"help": "Dataset column with each prompt's calibration weight h̃ > 0 (`dora-engine calibrate`)."},
    )
    dora_backend: str = field(
        default="auto",
        metadata={
            "help": "Backend of the op: 'auto' (the fused C++/CUDA op, falling back to PyTorch when it cannot be "
            "built), 'fused' or 'reference'."
        },
    )
    dora_loss_path: str = field(
        default="auto",
        metadata={
            "help": "'fused_linear': the decoder's hidden states → `dora_loss_linear` in the output layer, never "
            "holding all logits (the logits' token statistics entropy, mean_token_accuracy and logits/* are then "
            "not logged); 'logits': the model's logits → `dora_loss`; 'auto': 'fused_linear' unless the model's "
            "logits are more than its lm_head's output (a known config name, or measured on the first step, as the "
            "engine's `train.loss_path`) or a prompt-learning PEFT model prepends virtual tokens."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, (default, instead) in _REPLACED_OPTIONS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"DoRADPOConfig: `{name}` = {getattr(self, name)!r} is not used by the DoRA loss ({instead}); "
                    f"leave it at {default!r}"
                )
        if self.dora_backend not in OP_BACKENDS:
            raise ValueError(f"DoRADPOConfig: `dora_backend` must be one of {OP_BACKENDS}, got {self.dora_backend!r}")
        if self.dora_loss_path not in LOSS_PATHS:
            raise ValueError(
                f"DoRADPOConfig: `dora_loss_path` must be one of {LOSS_PATHS}, got {self.dora_loss_path!r}"
            )
        objective = self.robust_objective()
        if objective.h_scale == "dataset" and objective.h_mean is None:  # the trainer takes c from its data
            objective = replace(objective, h_scale="none")
        self._resolved(objective, None)

    def objective(self, train_dataset: Any = None) -> ResolvedObjective:
        """`robust_objective()` resolved by the registry; under `dora_h_scale="dataset"` without `dora_h_mean`
        its c is the mean of `train_dataset`'s h̃ column (`h_tilde_column`), as the trainer takes it."""
        return self._resolved(self.robust_objective(), train_dataset)

    def _resolved(self, objective: RobustObjective, train_dataset: Any) -> ResolvedObjective:
        """``objective`` resolved (``dataset_objective``), an error naming the config field at fault."""
        try:
            return dataset_objective(objective, train_dataset, self.h_tilde_column)
        except ObjectiveError as err:
            raise ValueError(f"DoRADPOConfig: `{_OBJECTIVE_FIELDS[err.field]}`: {err}") from None

    def robust_objective(self) -> RobustObjective:
        """The objective of the fields, not yet resolved: `dora_loss`, its parameters (the loss's defaults,
        then `beta`, then `dora_loss_params`), `dora_strategy`, `dora_lam`, `dora_h_scale` and `dora_h_mean`."""
        params = dict(self.dora_loss_params or {})
        if self.beta is not None:
            try:
                has_beta = "beta" in get_loss(self.dora_loss).defaults
            except ValueError as err:
                raise ValueError(f"DoRADPOConfig: `dora_loss`: {err}") from None
            if not has_beta:
                raise ValueError(f"DoRADPOConfig: `beta` is set but loss {self.dora_loss!r} has no β")
            if "beta" in params:
                raise ValueError("DoRADPOConfig: β is set twice, in `beta` and in `dora_loss_params`")
            params["beta"] = self.beta
        return RobustObjective(self.dora_loss, params, self.dora_strategy, self.dora_lam, self.dora_h_scale,
                               self.dora_h_mean)


@dataclass
class _HTildeCollator:
    """The trainer's collator, plus the (B,) tensor ``h_tilde`` from each example's h̃ column."""

    collator: Any
    column: str
    required: bool

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        values = [example.get(self.column) for example in examples]
        if all(v is not None for v in values):
            batch["h_tilde"] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        elif self.required:
            raise ValueError(
                f"the strategy needs h̃ but an example has no {self.column!r} value "
                "(run `dora-engine calibrate`, set `h_tilde_column`, or use dora_strategy 'erm' / 'dro')"
            )
        return batch


def _prompt_learning(model: nn.Module) -> bool:
    """Whether ``model`` is a prompt-learning PEFT model (its forward prepends virtual tokens)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _loss_in_forward(lm: nn.Module, policy: DoRAPolicy) -> None:
    """Let ``lm(input_ids=…, attention_mask=…, dora_loss_inputs=(labels, scores, h_tilde, ref_logps,
    process_group))`` return ``policy.compute``'s (``DoRAOutput``, router loss): the fused-linear loss runs
    inside the causal LM's own forward, so whatever wraps the model (PEFT, DDP, DeepSpeed, FSDP) sees one
    forward of it, with its parameters gathered there (docs/design.md section 5.7). Without
    ``dora_loss_inputs`` the forward is the one ``lm`` had (the signature it shows stays the model's)."""
    previous = lm.forward

    @functools.wraps(type(lm).forward)
    def forward(self: nn.Module, *args: Any, dora_loss_inputs: tuple | None = None, **kwargs: Any) -> Any:
        if dora_loss_inputs is None:
            return previous(*args, **kwargs)
        return policy.compute(kwargs["input_ids"], kwargs.get("attention_mask"), *dora_loss_inputs)

    lm.forward = types.MethodType(forward, lm)


class DoRADPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` whose loss is ``dora_engine.ops.dora_loss`` (see the module docstring).

    Takes the arguments of ``DPOTrainer``, with ``args`` a ``DoRADPOConfig``. Logs TRL's metrics
    (``rewards/*``, ``logps/*``, ``num_tokens``, and on the logits path ``logits/*``, ``entropy``,
    ``mean_token_accuracy``) plus ``robust/ess``, ``robust/weight_max`` and ``h_tilde/mean``.
    ``dora_policy.loss_path`` is the loss path taken (``DoRADPOConfig.dora_loss_path``).
    """

    _tag_names = ["trl", "dpo", "dora-engine"]
    _name = "DoRA-DPO"

    def __init__(self, model: Any, ref_model: Any = None, args: DoRADPOConfig | None = None, *rest: Any,
                 **kwargs: Any) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DoRADPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-DoRA-DPO")
        if not isinstance(args, DoRADPOConfig):
            raise TypeError(f"DoRADPOTrainer needs args of type DoRADPOConfig, got {type(args).__name__}")
        super().__init__(model, ref_model, args, *rest, **kwargs)
        if self._is_vision_dataset:
            raise ValueError("DoRADPOTrainer supports text datasets only")
        self.dora_objective = args.objective(self.train_dataset)  # with the c of dora_h_scale 'dataset'

        self.beta = float(self.dora_objective.params.get("beta", 1.0))  # TRL's name for the reward scale
        self._needs_reference = self.dora_objective.loss.needs_reference
        self._uses_h_tilde = self.dora_objective.strategy.needs_h_tilde
        columns = getattr(self.train_dataset, "column_names", None)  # None for some streaming datasets
        if self._uses_h_tilde and columns is not None and args.h_tilde_column not in columns:
            raise ValueError(
                f"dora_strategy {args.dora_strategy!r} needs h̃ but the training dataset has no "
                f"{args.h_tilde_column!r} column (run `dora-engine calibrate`, set `h_tilde_column`, or use "
                "dora_strategy 'erm' / 'dro')"
            )
        self.data_collator = _HTildeCollator(self.data_collator, args.h_tilde_column, self._uses_h_tilde)
        loss_path = args.dora_loss_path
        if _prompt_learning(self.model):
            if loss_path == "fused_linear":
                raise UserValueError(
                    "DoRADPOConfig: `dora_loss_path` 'fused_linear' cannot run here: a prompt-learning PEFT model "
                    "prepends virtual tokens; use 'logits' or 'auto'"
                )
            loss_path = "logits"
        # The engine's rule: the path resolved here, checked by the first fused-linear step (inside the forward)
        self.dora_policy = DoRAPolicy(self.model, self.dora_objective, loss_path=loss_path, backend=args.dora_backend)
        if self.dora_policy.loss_path == "fused_linear":
            _loss_in_forward(causal_lm(self.model), self.dora_policy)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.h_tilde_column not in self._signature_columns:
            self._signature_columns.append(self.args.h_tilde_column)

    def _reference_logps(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Reference log-probs (B, 2) of the chosen and rejected completions: precomputed, or from the
        reference model (or the PEFT model with its adapter disabled) through TRL's own method."""
        if self.precompute_ref_logps:
            chosen, rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            chosen, rejected = self.compute_ref_log_probs(reference, inputs)
        return torch.stack([chosen, rejected], dim=1)

    def op_rows(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """TRL's batch in the op's row layout (``dora_engine.rows``): its rows [chosen_0 … chosen_{B−1},
        rejected_0 …] reordered to row n = b·2 + k (k = 0 chosen, 1 rejected). Returns the model's inputs, the
        Hugging Face labels (the completion tokens) and the permutation applied."""
        order = response_major_order(inputs["input_ids"].shape[0], 2, inputs["input_ids"].device)
        model_kwargs = {k: v[order] for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = completion_labels(model_kwargs["input_ids"], inputs["completion_mask"][order])
        return model_kwargs, labels, order

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        """The DoRA loss on TRL's batch, in the op's row layout (``op_rows``), on ``dora_policy.loss_path``."""
        mode = "train" if self.model.training else "eval"
        args: DoRADPOConfig = self.args
        B = inputs["input_ids"].shape[0] // 2
        model_kwargs, labels, order = self.op_rows(inputs)
        device = labels.device
        aligned = shift_labels(labels)
        ref_logps = self._reference_logps(inputs).reshape(-1).to(device) if self._needs_reference else None
        scores = torch.tensor([1.0, 0.0], device=device).expand(B, 2)  # the chosen ranks first
        h_tilde = inputs.get("h_tilde")
        h = h_tilde if self._uses_h_tilde else None
        group = data_parallel_group()

        logits = outputs = None
        if self.dora_policy.loss_path == "fused_linear":
            request = (labels, scores, h, ref_logps, group)
            out, aux = model(input_ids=model_kwargs["input_ids"], attention_mask=model_kwargs["attention_mask"],
                             dora_loss_inputs=request)
        else:
            if self.aux_loss_enabled:
                model_kwargs["output_router_logits"] = True
            outputs = model(**model_kwargs)
            aux = outputs.aux_loss if self.aux_loss_enabled else None
            logits = outputs.logits
            if logits.shape[1] != labels.shape[1]:  # prompt-learning PEFT prepends virtual tokens
                logits = logits[:, -labels.shape[1] :]  # (a slice's backward allocates its base's whole shape)
            # Nothing reads the logits after the loss: a backward may write their gradient over them.
            out = dora_loss(
                logits, aligned, num_responses=2, scores=scores, h_tilde=h, ref_logps=ref_logps,
                objective=self.dora_objective, process_group=group, backend=args.dora_backend,
                inplace_backward=torch.is_grad_enabled() and not return_outputs,
            )
        loss = out.loss
        if aux is not None:
            loss = loss + self.router_aux_loss_coef * aux
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux).mean().item())
        self._log_step(mode, inputs, out, logits, aligned, scores, ref_logps, h_tilde)

        if return_outputs:
            if outputs is None:  # the fused-linear loss held no logits: one more forward for them, as TRL does
                with torch.no_grad():
                    outputs = model(**model_kwargs)
            inverse = torch.argsort(order)
            outputs["logits"] = outputs.logits[inverse]  # back to TRL's row order
            return loss, outputs
        return loss

    @torch.no_grad()
    def _log_step(
        self, mode: str, inputs: dict[str, Any], out: DoRAOutput, logits: torch.Tensor | None,
        aligned: torch.Tensor, scores: torch.Tensor, ref_logps: torch.Tensor | None, h_tilde: torch.Tensor | None,
    ) -> None:
        """TRL's metrics of the step (averaged over ranks), then the strategy's; the token statistics of the
        logits only when there are logits (not on the fused-linear path)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        params = self.dora_objective.params
        for name, value in preference_stats(out, scores, ref_logps, self.args.dora_loss, params).items():
            metrics[name].append(gather(value).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if logits is not None:
            self._log_token_stats(metrics, logits, aligned)

        # out.weights is this rank's share of the distribution over the global batch (it sums to 1 over ranks)
        weights = out.weights if data_parallel_group() is None else self.accelerator.gather(out.weights)
        for name, value in weight_stats(weights).items():
            metrics[name].append(value)
        if h_tilde is not None:
            metrics["h_tilde/mean"].append(gather(h_tilde).float().mean().item())

    def _log_token_stats(self, metrics: dict[str, list], logits: torch.Tensor, aligned: torch.Tensor) -> None:
        """TRL's ``entropy``, ``mean_token_accuracy`` (chosen rows) and ``logits/*`` over the scored positions,
        averaged over ranks."""
        gather = self.accelerator.gather_for_metrics
        # One row at a time (no second N·T·V buffer)
        totals = torch.zeros(6, dtype=torch.float64, device=logits.device)  # entropy, top-1, logit sums, counts
        for n in range(logits.shape[0]):
            scored = aligned[n] != IGNORE_INDEX
            z = logits[n][scored].float()
            logp = torch.log_softmax(z, dim=-1)
            k = n % 2  # 0 chosen, 1 rejected
            totals[0] += -(logp.exp() * logp).sum()
            if k == 0:
                totals[1] += (z.argmax(-1) == aligned[n][scored]).sum()
            totals[2 + k] += z.mean(-1).sum()
            totals[4 + k] += scored.sum()
        totals = gather(totals[None]).sum(0)
        tokens = totals[4] + totals[5]
        metrics["entropy"].append((totals[0] / tokens).item() if tokens > 0 else 0.0)
        metrics["mean_token_accuracy"].append((totals[1] / totals[4]).item() if totals[4] > 0 else 0.0)
        metrics["logits/chosen"].append((totals[2] / totals[4]).item() if totals[4] > 0 else 0.0)
        metrics["logits/rejected"].append((totals[3] / totals[5]).item() if totals[5] > 0 else 0.0)
