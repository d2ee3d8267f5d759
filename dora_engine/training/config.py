"""Training configuration (docs/design.md section 6): dataclasses, YAML loading and ``key=value`` overrides.

Top-level keys: ``stage``, ``model``, ``data``, ``loss``, ``robust``, ``train``, ``lora``, ``deepspeed``,
``logging``, ``checkpoint``, ``output_dir``. Every unknown key is an error that names it; loss names,
parameters and defaults come from the registry in ``dora_engine.losses``.
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
from typing import Any

import yaml

from dora_engine.errors import UserError
from dora_engine.losses import ObjectiveError, ResolvedObjective, RobustObjective, get_loss, get_strategy
from dora_engine.ops import FUSED_LINEAR_MODES, OP_BACKENDS
from dora_engine.ops.lm_head import LOSS_PATHS

DATA_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".arrow", ".csv")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a `datasets` hub id (org/name) for data.train


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key at fault."""


@dataclass
class ModelConfig:
    path: str = ""  # Hugging Face model directory (or hub name already in the local cache)
    tokenizer: str | None = None  # defaults to ``path``
    reference: str | None = None  # frozen reference model for ref log-probs; defaults to ``path``
    chat_template: str = "auto"  # auto: the tokenizer's template for chat prompts when it has one; none: plain text


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # JSONL files (section 3 schema), or what `datasets` loads
    eval: list[str] = field(default_factory=list)
    target_source: str = "chosen"  # the golden source: the responses SFT trains on ("*": every response)
    num_responses: int | None = None  # K; None: the K of the first record (every record must match)
    max_prompt_tokens: int = 256  # prompts keep their last tokens
    max_response_tokens: int = 256  # responses keep their first tokens
    ref_cache_dir: str | None = None  # default <output_dir>/ref_cache
    allow_empty_responses: bool = False  # keep responses whose text is empty or blank (trained as EOS alone)
    cache_dir: str | None = None  # tokenised data (memory-mapped Arrow); default $DORA_ENGINE_CACHE/tokenised or
    # ~/.cache/dora_engine/tokenised
    num_proc: int | None = None  # tokenising processes; None: 1 below 20k records, else min(8, CPUs)
    columns: dict[str, str] = field(default_factory=dict)  # schema field -> column, for data `datasets` loads


@dataclass
class LossConfig:
    name: str = "dpo_pl"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RobustConfig:
    strategy: str = "dora"
    lam: float = 1.0


@dataclass
class TrainConfig:
    micro_batch_prompts: int = 1  # prompts per rank per micro-step
    grad_accum_steps: int = 1
    lr: float = 5e-7
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    seed: int = 42
    precision: str = "auto"  # auto (bf16 on a GPU with native bf16, else fp32) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    backend: str = "auto"  # op backend: auto | fused | reference
    loss_path: str = "auto"  # logits | fused_linear (hidden states -> dora_loss_linear) | auto: fused_linear if it can
    fused_linear_mode: str = "single_pass"  # single_pass (3 GEMMs) | recompute (4 GEMMs, least memory)
    chunk_bytes: int | None = None  # fused_linear: bytes of one chunk of logits (None: DEFAULT_CHUNK_BYTES)
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run stops
    eval_every: int = 0  # optimizer steps between evaluations on data.eval (0: at the end only)
    dist_timeout_minutes: float = 60.0  # how long a collective waits for the other ranks (e.g. while one exports)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LoggingConfig:
    every: int = 1  # optimizer steps between metric records
    tensorboard: str = "auto"  # auto (when installed) | on | off (YAML's bare on/off, read as booleans, are accepted)
    wandb: bool = False
    wandb_project: str = "dora-engine"
    run_name: str | None = None


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between checkpoints (0: only at the end and on SIGTERM)
    keep: int = 2  # checkpoints kept on disk
    resume: str | None = None  # None | auto | a checkpoint tag
    export: bool = True  # Hugging Face export to <output_dir>/final at the end
    allow_data_change: bool = False  # resume on data.train / data.eval whose files or content changed


@dataclass
class TrainingConfig:
    stage: str = "align"  # sft | align
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: str | dict[str, Any] | None = None  # JSON path or dict; None: launch/zero3.json's settings
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/dora"

    @property
    def objective(self) -> ResolvedObjective:
        """The training objective of ``loss`` and ``robust``, resolved (``validate`` has checked it)."""
        return RobustObjective(self.loss.name, self.loss.params, self.robust.strategy, self.robust.lam).resolve()

    @property
    def loss_params(self) -> dict[str, Any]:
        """The loss's parameters with the registry's defaults filled in."""
        return dict(self.objective.params)

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


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
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


def _check_model_location(key: str, location: str | None, files: tuple[str, ...]) -> None:
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


def _check_output_folder(key: str, location: str) -> None:
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
    _choice("stage", cfg.stage, STAGES)
    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required (a Hugging Face model directory)")
    _check_model_location("model.path", cfg.model.path, MODEL_FILES)
    tokenizer_key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    _check_model_location(tokenizer_key, cfg.model.tokenizer or cfg.model.path, TOKENIZER_FILES)
    _check_model_location("model.reference", cfg.model.reference, MODEL_FILES)
    _choice("model.chat_template", cfg.model.chat_template, ("auto", "none"))
    if not cfg.data.train:
        raise ConfigError("config key 'data.train' is required (one or more JSONL files)")
    for i, path in enumerate(cfg.data.train + cfg.data.eval):
        kind, idx = ("train", i) if i < len(cfg.data.train) else ("eval", i - len(cfg.data.train))
        if not Path(path).exists() and (Path(path).suffix in DATA_SUFFIXES or not HUB_ID.match(str(path))):
            raise ConfigError(f"config key 'data.{kind}[{idx}]': file not found: {path}")
    if cfg.data.num_responses is not None and cfg.data.num_responses < 2:
        raise ConfigError(f"config key 'data.num_responses' must be ≥ 2, got {cfg.data.num_responses}")
    _positive("data.max_prompt_tokens", cfg.data.max_prompt_tokens)
    _positive("data.max_response_tokens", cfg.data.max_response_tokens)
    try:
        RobustObjective(cfg.loss.name, cfg.loss.params, cfg.robust.strategy, cfg.robust.lam).resolve()
    except ObjectiveError as err:
        raise ConfigError(f"config key {OBJECTIVE_KEYS[err.field]!r}: {err}") from None
    t = cfg.train
    _positive("train.micro_batch_prompts", t.micro_batch_prompts)
    _positive("train.grad_accum_steps", t.grad_accum_steps)
    _positive("train.lr", t.lr)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _choice("train.schedule", t.schedule, SCHEDULES)
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive("train.epochs", t.epochs)
    if t.max_steps is not None:
        _positive("train.max_steps", t.max_steps)
    _choice("train.precision", t.precision, PRECISIONS)
    _positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True)
    _choice("train.backend", t.backend, OP_BACKENDS)
    _choice("train.loss_path", t.loss_path, LOSS_PATHS)
    _choice("train.fused_linear_mode", t.fused_linear_mode, FUSED_LINEAR_MODES)
    if t.chunk_bytes is not None:
        _positive("train.chunk_bytes", t.chunk_bytes)
    _positive("train.max_consecutive_skips", t.max_consecutive_skips)
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.dist_timeout_minutes", t.dist_timeout_minutes)
    if cfg.lora.enabled:
        _positive("lora.r", cfg.lora.r)
        _positive("lora.alpha", cfg.lora.alpha)
        if not 0 <= cfg.lora.dropout < 1:
            raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    _positive("logging.every", cfg.logging.every)
    _choice("logging.tensorboard", cfg.logging.tensorboard, ("auto", "on", "off"))
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep", cfg.checkpoint.keep)
    if isinstance(cfg.deepspeed, str) and not Path(cfg.deepspeed).is_file():
        raise ConfigError(f"config key 'deepspeed': file not found: {cfg.deepspeed}")
    if not cfg.output_dir:
        raise ConfigError("config key 'output_dir' must not be empty")
    _check_output_folder("output_dir", cfg.output_dir)
    if cfg.data.ref_cache_dir:
        _check_output_folder("data.ref_cache_dir", cfg.data.ref_cache_dir)
    if cfg.data.cache_dir:
        _check_output_folder("data.cache_dir", cfg.data.cache_dir)
    if cfg.data.num_proc is not None:
        _positive("data.num_proc", cfg.data.num_proc)
    from dora_engine.data.hf import check_columns

    try:
        check_columns(cfg.data.columns, "config key 'data.columns'")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (the value is parsed as YAML) to a raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must have the form key=value (e.g. train.lr=1e-5)")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    cls: Any = TrainingConfig
    node = data
    for depth, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        if names is not None and part not in names:
            where = ".".join(parts[:depth]) or "the config"
            raise ConfigError(
                f"unknown config key {dotted!r} in override; valid keys under {where}: {', '.join(sorted(names))}"
            )
        if depth == len(parts) - 1:
            node[part] = yaml.safe_load(raw)
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
        apply_override(data, assignment)
    return validate(_build(TrainingConfig, data))
