"""Training configuration (docs/design.md section 6): dataclasses, YAML loading and ``key=value`` overrides.

Top-level keys: ``stage``, ``model``, ``data``, ``loss``, ``robust``, ``train``, ``lora``, ``deepspeed``,
``logging``, ``checkpoint``, ``output_dir``. Every unknown key is an error that names it; loss names,
parameters and defaults come from the registry in ``dora_engine.losses``. Each field's ``metadata["help"]``
documents its key: ``python -m dora_engine.training.config_docs`` writes them into launch/README.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dora_engine.errors import UserError
from dora_engine.generation import EXPORT_FOLDER
from dora_engine.hf_loading import refuse_remote_code
from dora_engine.losses import (
    H_SCALES,
    TRAINING_H_SCALE,
    TRAINING_LAM,
    ObjectiveError,
    ResolvedObjective,
    RobustObjective,
    get_loss,
    get_strategy,
    resolve_params,
)
from dora_engine.ops import FUSED_LINEAR_MODES, OP_BACKENDS
from dora_engine.ops.chunking import DEFAULT_CHUNK_BYTES, MIN_DEFAULT_ROWS
from dora_engine.ops.lm_head import LOSS_PATHS

DATA_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".arrow", ".csv")
T = TypeVar("T")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a `datasets` hub id (org/name) for data.train


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key at fault."""


@dataclass
class ModelConfig:
    path: str = field(
        default="",
        metadata={"help": "Required. The Hugging Face model folder (or a hub id already in the local cache): the "
                          "policy, and the reference unless `model.reference` is set."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder; null: `model.path`."},
    )
    reference: str | None = field(
        default=None,
        metadata={"help": "Frozen reference model for the reference log-probs; null: `model.path`."},
    )
    chat_template: str = field(
        default="auto",
        metadata={"help": "`auto`: the tokenizer's chat template for prompts when it has one (a string prompt "
                          "becomes one user turn); `none`: plain text."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "`true` runs the Python code a model folder ships (its `auto_map`) to load it, with your "
                          "permissions: only for a folder you trust; `false` refuses such a folder in one line "
                          "(docs/design.md section 7.6)."},
    )


@dataclass
class DataConfig:
    train: list[str] = field(
        default_factory=list,
        metadata={"help": "Required. JSONL files in the docs/design.md section 3 schema, or what Hugging Face "
                          "`datasets` loads: `.parquet`, `.arrow`, `.csv` files, a folder (`save_to_disk`, or data "
                          "files), a hub id `org/name`."},
    )
    eval: list[str] = field(
        default_factory=list,
        metadata={"help": "Evaluation data, in any form `data.train` takes; `[]`: no evaluation."},
    )
    target_source: str = field(
        default="chosen",
        metadata={"help": "The golden source: the responses `sft` trains on (`\"*\"`: every response, whatever its "
                          "source)."},
    )
    num_responses: int | None = field(
        default=None,
        metadata={"help": "K; every record must have it (a batch has a fixed K); null: the first record's K."},
    )
    max_prompt_tokens: int = field(
        default=256,
        metadata={"help": "Prompts keep their last this many tokens."},
    )
    max_response_tokens: int = field(
        default=256,
        metadata={"help": "Responses keep their first this many tokens."},
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where reference log-probs are cached; null: `<output_dir>/ref_cache`."},
    )
    allow_empty_responses: bool = field(
        default=False,
        metadata={"help": "Keep responses whose text is empty or blank (they train as the EOS token alone); by "
                          "default such a record is an error naming it."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Tokenised data (memory-mapped Arrow), shared by every rank and later run with the same "
                          "key (docs/design.md section 3.2); null: `$DORA_ENGINE_CACHE/tokenised`, else "
                          "`~/.cache/dora_engine/tokenised`."},
    )
    num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes that tokenise; null: 1 below 20,000 records, else min(8, CPUs)."},
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "For `datasets` sources: which column holds a schema field (`id`, `prompt`, `responses`, "
                          "`h_tilde`, `meta`, `responses.text`, `responses.source`, `responses.score`), as "
                          "`field: column`."},
    )
    format: str = field(
        default="schema",
        metadata={"help": "How `data.train` / `data.eval` rows are read: `schema` (docs/design.md section 3 records, "
                          "with `data.columns` for `datasets` sources), or a public layout converted row by row as "
                          "`data convert --format` does: `trl` (prompt/chosen/rejected), `hh`, `tldr`, `authors`; "
                          "part of the tokenised cache's key."},
    )


@dataclass
class LossConfig:
    name: str = field(
        default="dpo_pl",
        metadata={"help": "Any loss of docs/design.md section 4 (the registry in `dora_engine/losses.py`)."},
    )
    params: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Overrides of the loss's parameter defaults (e.g. `{length_normalize: true}` for `ipo`: "
                          "TRL's per-token IPO)."},
    )


@dataclass
class RobustConfig:
    strategy: str = field(
        default="dora",
        metadata={"help": "`erm`, `reweight`, `dro`, `dora` or `drdpo` (docs/design.md section 4.3)."},
    )
    lam: float = field(
        default=TRAINING_LAM,
        metadata={"help": "λ of the strategy (β′ of `drdpo`); `erm` and `reweight` ignore it. The default goes "
                          "with `h_scale: dataset` (benchmarks/RESULTS.md)."},
    )
    h_scale: str = field(
        default=TRAINING_H_SCALE,
        metadata={"help": "Scale of h̃ before `reweight` and `dora` (docs/design.md section 4.3): `none` (h̃ as "
                          "given, the paper's), `dataset` (h̃ divided by its mean over all records of `data.train`, "
                          "computed at start-up and used for `data.eval` too, so that λ means the same on every "
                          "dataset) or `batch` (divided by the mean over the global batch of each micro-step). "
                          "Strategies without h̃ ignore it."},
    )


@dataclass
class TrainConfig:
    micro_batch_prompts: int = field(
        default=1,
        metadata={"help": "Prompts (each with K responses) per rank per micro-step."},
    )
    grad_accum_steps: int = field(
        default=1,
        metadata={"help": "Micro-steps per optimizer step; each micro-step is one batch of Algorithm 1."},
    )
    lr: float = field(
        default=5e-7,
        metadata={"help": "AdamW learning rate (the peak of the schedule)."},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW weight decay."},
    )
    schedule: str = field(
        default="cosine",
        metadata={"help": "`constant`, `linear` or `cosine` to 0, after the linear warmup."},
    )
    warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps of linear warmup."},
    )
    epochs: int = field(
        default=1,
        metadata={"help": "Passes over `data.train`; `train.max_steps` wins when set."},
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps; overrides `train.epochs` when set."},
    )
    seed: int = field(
        default=42,
        metadata={"help": "Data order: epoch e visits `randperm(n, seed + e)`."},
    )
    precision: str = field(
        default="auto",
        metadata={"help": "`auto`: bf16 on GPUs that compute in it natively (compute capability 8.0 on), fp32 on "
                          "CPU and on GPUs that only emulate bf16 (T4, V100); or `fp32`, `bf16`, `fp16`."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Hugging Face activation checkpointing."},
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Gradient clipping (DeepSpeed `gradient_clipping`)."},
    )
    backend: str = field(
        default="auto",
        metadata={"help": "Op backend: `auto` (fused; the reference, with one warning, only when the extension "
                          "cannot be built or has no kernels for the model's device), `fused`, `reference`."},
    )
    loss_path: str = field(
        default="auto",
        metadata={"help": "`fused_linear`: hidden states → `dora_loss_linear` in the output layer, never holding all "
                          "logits; `logits`: model logits → `dora_loss`, its backward written over the logits; "
                          "`auto`: `fused_linear` unless the model's logits are more than its lm_head's output "
                          "(soft-capping, logit scaling: a known config name, or measured on the first forward, "
                          "docs/design.md section 5.7), then `logits` with a warning; a forced `fused_linear` on "
                          "such a model is an error. Figures: benchmarks/RESULTS.md, \"Training throughput\"."},
    )
    fused_linear_mode: str = field(
        default="single_pass",
        metadata={"help": "Fused-linear schedule of both stages (alignment's loss, SFT's NLL): `single_pass`: 3 "
                          "GEMMs per chunk of whole prompts, the gradients formed in forward; `recompute`: 4 GEMMs, "
                          "least memory. On the fused backend only tokens with a label take logits."},
    )
    chunk_bytes: int | None = field(
        default=None,
        metadata={"help": "Bytes of one chunk of logits on the fused-linear path; null: "
                          f"{DEFAULT_CHUNK_BYTES['cuda'] >> 20} MiB on a GPU, {DEFAULT_CHUNK_BYTES['cpu'] >> 20} MiB "
                          f"on CPU, and at least {MIN_DEFAULT_ROWS} rows of logits."},
    )
    max_consecutive_skips: int = field(
        default=5,
        metadata={"help": "Non-finite steps in a row before the run stops (with a checkpoint)."},
    )
    eval_every: int = field(
        default=0,
        metadata={"help": "Optimizer steps between evaluations on `data.eval` (0: once at the end)."},
    )
    dist_timeout_minutes: float = field(
        default=60.0,
        metadata={"help": "How long a collective waits for the other ranks before the run fails (rank 0 writes the "
                          "export while the others wait; the ranks hash a checkpoint's files); DeepSpeed's default "
                          "is 10."},
    )


@dataclass
class LoraConfig:
    enabled: bool = field(
        default=False,
        metadata={"help": "LoRA adapters via `peft`; the export merges them."},
    )
    r: int = field(
        default=8,
        metadata={"help": "LoRA rank."},
    )
    alpha: int = field(
        default=16,
        metadata={"help": "LoRA scaling α."},
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapters' input, in [0, 1)."},
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Names of the modules that get adapters."},
    )


@dataclass
class LoggingConfig:
    every: int = field(
        default=1,
        metadata={"help": "Optimizer steps between metric records."},
    )
    tensorboard: str = field(
        default="auto",
        metadata={"help": "`auto` (when installed), `on`, `off` (YAML's bare `on` / `off` are read as booleans and "
                          "accepted)."},
    )
    wandb: bool = field(
        default=False,
        metadata={"help": "Log to Weights & Biases."},
    )
    wandb_project: str = field(
        default="dora-engine",
        metadata={"help": "Weights & Biases project."},
    )
    run_name: str | None = field(
        default=None,
        metadata={"help": "Weights & Biases run name; null: the one wandb picks."},
    )


@dataclass
class CheckpointConfig:
    every: int = field(
        default=0,
        metadata={"help": "Optimizer steps between checkpoints, and one at the end (0: only on SIGTERM and fault "
                          "stops)."},
    )
    keep: int = field(
        default=2,
        metadata={"help": "Complete checkpoints kept on disk."},
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "`auto` (the newest complete checkpoint that verifies; a fresh start when there is none) "
                          "or a tag; null: a fresh start."},
    )
    export: bool = field(
        default=True,
        metadata={"help": f"Write the Hugging Face model to `<output_dir>/{EXPORT_FOLDER}` at the end."},
    )
    allow_data_change: bool = field(
        default=False,
        metadata={"help": "Resume on `data.train` / `data.eval` whose files or content changed since the "
                          "checkpoint (with a warning); by default such a resume is refused, naming what changed."},
    )


@dataclass
class TrainingConfig:
    stage: str = field(
        default="align",
        metadata={"help": "`sft` (NLL of the target-source responses, token mean over the global batch) or "
                          "`align`."},
    )
    model: ModelConfig = field(
        default_factory=ModelConfig,
        metadata={"help": "The policy, its tokenizer and the reference model."},
    )
    data: DataConfig = field(
        default_factory=DataConfig,
        metadata={"help": "Training and evaluation records, their tokenisation and caches."},
    )
    loss: LossConfig = field(
        default_factory=LossConfig,
        metadata={"help": "The per-prompt preference loss ℓ."},
    )
    robust: RobustConfig = field(
        default_factory=RobustConfig,
        metadata={"help": "The robust strategy over the batch."},
    )
    train: TrainConfig = field(
        default_factory=TrainConfig,
        metadata={"help": "Batching, optimizer, schedule, precision and the loss op."},
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig,
        metadata={"help": "LoRA adapters."},
    )
    deepspeed: str | dict[str, Any] | None = field(
        default=None,
        metadata={"help": "A DeepSpeed JSON path or an inline mapping; batch sizes, accumulation, clipping, "
                          "precision and scheduler come from this config and must not be set there; null: "
                          "`launch/zero3.json`'s settings (in one process with a gradient bucket of 5e6 elements: a "
                          "rank alone reduces nothing)."},
    )
    logging: LoggingConfig = field(
        default_factory=LoggingConfig,
        metadata={"help": "Metric records, TensorBoard and Weights & Biases."},
    )
    checkpoint: CheckpointConfig = field(
        default_factory=CheckpointConfig,
        metadata={"help": "Checkpoints, resuming and the final export."},
    )
    output_dir: str = field(
        default="runs/dora",
        metadata={"help": "Metrics, checkpoints, export."},
    )

    @property
    def h_scale(self) -> str:
        """The scale of h̃ the objective applies: ``robust.h_scale`` where the align strategy reads h̃, else
        ``none`` (the key is accepted and has no effect)."""
        return self.robust.h_scale if self.needs_h_tilde else "none"

    def objective(self, h_mean: float | None = None) -> ResolvedObjective:
        """The training objective of ``loss`` and ``robust``, resolved; ``h_mean``: the mean h̃ of data.train,
        given exactly when ``h_scale`` is ``dataset`` (``validate`` has checked the rest)."""
        return RobustObjective(self.loss.name, self.loss.params, self.robust.strategy, self.robust.lam,
                               self.h_scale, h_mean).resolve()

    @property
    def loss_params(self) -> dict[str, Any]:
        """The loss's parameters with the registry's defaults filled in."""
        return resolve_params(self.loss.name, self.loss.params)

    @property
    def needs_reference(self) -> bool:
        return self.stage == "align" and get_loss(self.loss.name).needs_reference

    @property
    def needs_h_tilde(self) -> bool:
        return self.stage == "align" and get_strategy(self.robust.strategy).needs_h_tilde

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STAGES = ("sft", "align")
#: The config key of each ``RobustObjective`` field.
OBJECTIVE_KEYS = {"loss": "loss.name", "loss_params": "loss.params", "strategy": "robust.strategy", "lam": "robust.lam"}
ON_OFF_KEYS = ("logging.tensorboard",)  # string keys whose values include on/off
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints accepted for floats, a str for list[str])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key {key!r}: unexpected value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 5e-7 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) and key in ON_OFF_KEYS:
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"config key {key!r}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key {where!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key {full!r}; valid keys under {where}: {', '.join(sorted(names))}")
    values = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**values)


# --------------------------------------------------------------------------------------------------
# Semantic checks
# --------------------------------------------------------------------------------------------------


def check_key_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """``ConfigError`` naming ``key`` unless ``value`` is one of ``choices`` (also used by iterate's config)."""
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    """``ConfigError`` naming ``key`` unless ``value`` is finite and > 0 (≥ 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        raise ConfigError(f"config key {key!r} must be {'≥ 0' if allow_zero else '> 0'}, got {value!r}")


MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")
_TRUE = ("1", "on", "yes", "true")


def _offline() -> bool:
    """Hugging Face's offline mode (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE) is set."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the Hugging Face hub endpoint cannot be reached (one TCP connection, ``timeout_s``), or None."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{endpoint} cannot be reached ({err.strerror or type(err).__name__})"


def _in_hub_cache(repo_id: str, filenames: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for name in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except ValueError:  # not a valid repo id
            return False
    return False


def check_model_location(key: str, location: str | None, files: tuple[str, ...]) -> None:
    """A local folder must exist and hold ``files`` (one of them); a hub id (``org/name``) must be in the
    local Hugging Face cache, or the hub must be reachable and offline mode off, so that loading never
    waits on a network that is not there."""
    if not location:
        return
    path = Path(location).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in files):
            what = "is empty" if not any(path.iterdir()) else f"has none of {', '.join(files)}"
            kind = "model" if files == MODEL_FILES else "tokenizer"
            raise ConfigError(f"config key {key!r}: folder {location} {what}; it is not a Hugging Face {kind} folder")
        return
    if path.exists():
        raise ConfigError(f"config key {key!r}: {location} is a file, not a model folder")
    local = location.startswith(("/", ".", "~")) or location.count("/") > 1 or os.sep != "/" and os.sep in location
    if local:
        raise ConfigError(f"config key {key!r}: folder not found: {location}")
    if _in_hub_cache(location, files):
        return
    if _offline():
        raise ConfigError(
            f"config key {key!r}: {location!r} is neither a local folder nor in the Hugging Face cache, and "
            "offline mode is on (HF_HUB_OFFLINE); download it first or give a folder"
        )
    unreachable = _hub_unreachable()
    if unreachable:
        raise ConfigError(
            f"config key {key!r}: {location!r} is neither a local folder nor in the Hugging Face cache, and "
            f"{unreachable}; download it first or give a folder"
        )


def check_output_folder(key: str, location: str) -> None:
    """``location`` is a folder, or can be made: its nearest existing parent is a writable folder."""
    path = Path(location).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"config key {key!r}: {location} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"config key {key!r}: cannot make {location}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"config key {key!r}: cannot write in {existing} (permission denied)")


def validate(cfg: TrainingConfig) -> TrainingConfig:
    """Checks that need more than types; each failure names its key."""
    check_key_choice("stage", cfg.stage, STAGES)
    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required (a Hugging Face model directory)")
    check_model_location("model.path", cfg.model.path, MODEL_FILES)
    tokenizer_key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    check_model_location(tokenizer_key, cfg.model.tokenizer or cfg.model.path, TOKENIZER_FILES)
    check_model_location("model.reference", cfg.model.reference, MODEL_FILES)
    for location in {cfg.model.path, cfg.model.tokenizer or cfg.model.path, cfg.model.reference or cfg.model.path}:
        refuse_remote_code(location, cfg.model.trust_remote_code)
    check_key_choice("model.chat_template", cfg.model.chat_template, ("auto", "none"))
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is required (one or more JSONL files)")
    for i, path in enumerate(cfg.data.train + cfg.data.eval):
        kind, idx = ("train", i) if i < len(cfg.data.train) else ("eval", i - len(cfg.data.train))
        if not Path(path).exists() and (Path(path).suffix in DATA_SUFFIXES or not HUB_ID.match(str(path))):
            raise ConfigError(f"config key 'data.{kind}[{idx}]': file not found: {path}")
    if cfg.data.num_responses is not None and cfg.data.num_responses < 2:
        raise ConfigError(f"config key 'data.num_responses' must be ≥ 2, got {cfg.data.num_responses}")
    check_positive("data.max_prompt_tokens", cfg.data.max_prompt_tokens)
    check_positive("data.max_response_tokens", cfg.data.max_response_tokens)
    check_key_choice("robust.h_scale", cfg.robust.h_scale, H_SCALES)
    try:
        RobustObjective(cfg.loss.name, cfg.loss.params, cfg.robust.strategy, cfg.robust.lam).resolve()
    except ObjectiveError as err:
        raise ConfigError(f"config key {OBJECTIVE_KEYS[err.field]!r}: {err}") from None
    t = cfg.train
    check_positive("train.micro_batch_prompts", t.micro_batch_prompts)
    check_positive("train.grad_accum_steps", t.grad_accum_steps)
    check_positive("train.lr", t.lr)
    check_positive("train.weight_decay", t.weight_decay, allow_zero=True)
    check_key_choice("train.schedule", t.schedule, SCHEDULES)
    check_positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    check_positive("train.epochs", t.epochs)
    if t.max_steps is not None:
        check_positive("train.max_steps", t.max_steps)
    check_key_choice("train.precision", t.precision, PRECISIONS)
    check_positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True)
    check_key_choice("train.backend", t.backend, OP_BACKENDS)
    check_key_choice("train.loss_path", t.loss_path, LOSS_PATHS)
    check_key_choice("train.fused_linear_mode", t.fused_linear_mode, FUSED_LINEAR_MODES)
    if t.chunk_bytes is not None:
        check_positive("train.chunk_bytes", t.chunk_bytes)
    check_positive("train.max_consecutive_skips", t.max_consecutive_skips)
    check_positive("train.eval_every", t.eval_every, allow_zero=True)
    check_positive("train.dist_timeout_minutes", t.dist_timeout_minutes)
    if cfg.lora.enabled:
        check_positive("lora.r", cfg.lora.r)
        check_positive("lora.alpha", cfg.lora.alpha)
        if not 0 <= cfg.lora.dropout < 1:
            raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    check_positive("logging.every", cfg.logging.every)
    check_key_choice("logging.tensorboard", cfg.logging.tensorboard, ("auto", "on", "off"))
    check_positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    check_positive("checkpoint.keep", cfg.checkpoint.keep)
    if isinstance(cfg.deepspeed, str) and not Path(cfg.deepspeed).is_file():
        raise ConfigError(f"config key 'deepspeed': file not found: {cfg.deepspeed}")
    if not cfg.output_dir:
        raise ConfigError("config key 'output_dir' must not be empty")
    check_output_folder("output_dir", cfg.output_dir)
    if cfg.data.ref_cache_dir:
        check_output_folder("data.ref_cache_dir", cfg.data.ref_cache_dir)
    if cfg.data.cache_dir:
        check_output_folder("data.cache_dir", cfg.data.cache_dir)
    if cfg.data.num_proc is not None:
        check_positive("data.num_proc", cfg.data.num_proc)
    from dora_engine.data.converters import ROW_CONVERTERS
    from dora_engine.data.hf import check_columns

    check_key_choice("data.format", cfg.data.format, ("schema", *ROW_CONVERTERS))
    if cfg.data.columns and cfg.data.format != "schema":
        raise ConfigError(f"config key 'data.columns' applies to data.format schema, not {cfg.data.format!r}")
    try:
        check_columns(cfg.data.columns, "config key 'data.columns'")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong, in a few words on one line (a YAML error's text spans several lines with a caret)."""
    problem = getattr(err, "problem", None) or str(err)
    return " ".join(str(problem).split())


def apply_override(data: dict[str, Any], assignment: str, config_class: type = TrainingConfig) -> None:
    """Apply one ``dotted.key=value`` override (the value is parsed as YAML) to a raw config dict of
    ``config_class``."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must have the form key=value (e.g. train.lr=1e-5)")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    cls: Any = config_class
    node = data
    for depth, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if names is not None and part not in names:
            where = ".".join(parts[:depth]) or "the config"
            raise ConfigError(
                f"unknown config key {dotted!r} in override; valid keys under {where}: {', '.join(sorted(names))}"
            )
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                problem = _yaml_problem(err)
                raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({problem})") from None
            return
        hint = typing.get_type_hints(cls)[part] if names is not None else dict
        cls = hint if dataclasses.is_dataclass(hint) else dict
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: config key {'.'.join(parts[: depth + 1])!r} is not a mapping")
        node = child


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """Read a YAML config, apply ``key=value`` overrides, build and validate it.

    Relative paths of files named in the config (data, model, deepspeed) stay relative to the working
    directory, as on the command line.
    """
    return validate(read_config(TrainingConfig, path, overrides))


def read_config(
    config_class: type[T], path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """A YAML config read into the dataclass ``config_class``, ``key=value`` overrides applied: every key
    known and every value of its field's type, each failure one ``ConfigError`` naming the key. The checks
    that need more than types are the caller's (``validate`` for a ``TrainingConfig``)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must contain a mapping at the top level")
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment, config_class)
    return _build(config_class, data)
