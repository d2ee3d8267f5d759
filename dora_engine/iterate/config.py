"""The configuration of ``dora-engine iterate`` (docs/design.md section 10): dataclasses, YAML loading with
``key=value`` overrides (``dora_engine.training.config.read_config``: unknown keys and wrong types are one
line naming the key) and ``validate``, whose every failure names its key. Each field's ``metadata["help"]``
documents its key: ``python -m dora_engine.iterate.config_docs`` writes them into launch/README.md.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dora_engine.calibration.classifier import ClassifierSettings
from dora_engine.calibration.pipeline import BETA_CHOICES
from dora_engine.calibration.schemes import SCHEMES
from dora_engine.data.weights import CALIBRATION_RATIO_POWER, check_ratio_power
from dora_engine.errors import UserValueError
from dora_engine.generation import GENERATION_BACKENDS
from dora_engine.losses import H_SCALES, TRAINING_H_SCALE, TRAINING_LAM, ObjectiveError, RobustObjective
from dora_engine.ops import OP_BACKENDS
from dora_engine.training.config import (
    MODEL_FILES,
    PRECISIONS,
    SCHEDULES,
    ConfigError,
    check_key_choice,
    check_model_location,
    check_output_folder,
    check_positive,
    read_config,
)

SYNTH = "synth"
"""``data.train`` / ``data.eval``: the synthetic mixture (``dora_engine.data.synth``) instead of a file."""
TINY = "tiny"
"""``start.model``: a random tiny Llama over the synthetic data's vocabulary instead of a model folder."""
REFERENCES = ("previous", "start")
ORACLE = "oracle"
REWARD_MODEL = "reward-model:"


@dataclass
class IterateDataConfig:
    train: str = field(
        default=SYNTH,
        metadata={"help": "The training prompts with their responses (golden and other sources, scored or not): a "
                          "JSONL file in the docs/design.md section 3 schema, or `synth`: the synthetic mixture "
                          "(`data.synth_*`, prompts from the *train* half of its prompt texts)."},
    )
    eval: str = field(
        default=SYNTH,
        metadata={"help": "Held-out prompts, each with a `data.target_source` response (the golden one the win rate "
                          "compares with): a JSONL file, or `synth` (the *eval* half of the synthetic prompt texts, "
                          "which training never sees)."},
    )
    target_source: str = field(
        default="golden",
        metadata={"help": "The golden source: kept in every round's data, the target of calibration, the reference "
                          "of the win rate."},
    )
    synth_prompts: int = field(
        default=128,
        metadata={"help": "`synth`: training prompts."},
    )
    synth_eval_prompts: int = field(
        default=112,
        metadata={"help": "`synth`: held-out prompts."},
    )
    synth_k: int = field(
        default=4,
        metadata={"help": "`synth`: responses per training prompt before any generation."},
    )
    synth_golden_fraction: float = field(
        default=0.5,
        metadata={"help": "`synth`: the share of training prompts with one golden response (the others have shifted "
                          "responses only)."},
    )
    synth_seed: int = field(
        default=0,
        metadata={"help": "`synth`: the data's seed (held-out prompts: this + 20000)."},
    )
    max_prompt_tokens: int = field(
        default=32,
        metadata={"help": "Prompts keep their last this many tokens in training."},
    )
    max_response_tokens: int = field(
        default=64,
        metadata={"help": "Responses keep their first this many tokens in training."},
    )


@dataclass
class StartConfig:
    model: str = field(
        default=TINY,
        metadata={"help": "The start policy of every chain: a local Hugging Face causal-LM folder (an SFT model), or "
                          "`tiny`: a random tiny Llama over the synthetic vocabulary (`start.hidden`, `start.layers`, "
                          "`start.heads`; needs `data.train: synth`)."},
    )
    hidden: int = field(default=64, metadata={"help": "`tiny`: hidden size."})
    layers: int = field(default=2, metadata={"help": "`tiny`: layers."})
    heads: int = field(default=4, metadata={"help": "`tiny`: attention heads (they divide `start.hidden`)."})
    sft_epochs: int = field(
        default=20,
        metadata={"help": "Epochs of SFT of `start.model` on the training data's `start.sft_source` responses "
                          "before round 1; 0: `start.model` is the start policy as it is."},
    )
    sft_lr: float = field(default=1e-2, metadata={"help": "SFT learning rate (cosine schedule, 2 warmup steps)."})
    sft_batch_rows: int = field(
        default=32,
        metadata={"help": "SFT rows (one trained response with its prompt) per optimizer step."},
    )
    sft_source: str = field(
        default="*",
        metadata={"help": "The responses SFT trains on: a source, or `\"*\"`: every response (the mixture)."},
    )


@dataclass
class GenerateConfig:
    n: int = field(
        default=2,
        metadata={"help": "Responses sampled per training prompt from the chain's current policy in each round "
                          "(source `<name>-round<r>`), as `data augment` samples them."},
    )
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (> 0)."})
    top_k: int = field(default=0, metadata={"help": "Top-k filter; 0: off."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p filter in (0, 1]; 1: off."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Repetition penalty (the paper's 1.1)."})
    max_new_tokens: int = field(default=48, metadata={"help": "New tokens per response."})
    backend: str = field(
        default="transformers",
        metadata={"help": "`transformers` (CPU or GPU) or `vllm` (`pip install 'dora-engine[generate]'`); the "
                          "evaluation's generations too."},
    )
    batch_size: int = field(default=64, metadata={"help": "Prompts per `generate` call (transformers)."})


@dataclass
class ScoreConfig:
    reward: str = field(
        default=ORACLE,
        metadata={"help": "What scores the generated responses (and any unscored response of `data.train`): "
                          "`oracle` (the synthetic data's known reward) or `reward-model:PATH` (a local folder of a "
                          "single-logit sequence classifier, as `data score`)."},
    )
    all_responses: bool = field(
        default=False,
        metadata={"help": "`true`: `score.reward` scores the training data's responses too, replacing their scores, "
                          "so that every response of a round is on one scale (for `data.train` scored elsewhere, "
                          "e.g. human labels 1/0); `false`: only responses without a score are scored."},
    )
    previous_rounds: int = field(
        default=0,
        metadata={"help": "Earlier rounds whose generated responses a round's data keeps beside its own (each "
                          "under its round's source); 0: only the round's own. The training data's responses are "
                          "always kept."},
    )


@dataclass
class CalibrateConfig:
    backbone: str = field(
        default="tfidf-pair",
        metadata={"help": "Classifier backbone of `dora-engine calibrate` (docs/design.md section 4.5); "
                          "`tfidf-pair` reads the prompt too."},
    )
    folds: int = field(default=5, metadata={"help": "Cross-fitting folds (≥ 2)."})
    scheme: str = field(default="per_source", metadata={"help": "`per_source`, `pooled` or `multiclass`."})
    beta: str = field(default="uniform", metadata={"help": "β of h̃: `uniform` or `source_fraction`."})
    ratio_power: float = field(
        default=CALIBRATION_RATIO_POWER,
        metadata={"help": "τ ≥ 0, the power of each density ratio in h̃, as `calibrate --ratio-power` (docs/design.md "
                          "section 4.5): 1 is the paper's h̃, smaller flattens it towards uniform."},
    )
    min_examples: int = field(
        default=8,
        metadata={"help": "Responses of each source that every fold's training data needs."},
    )


@dataclass
class AlignConfig:
    loss: str = field(default="dpo_pl", metadata={"help": "Any loss of docs/design.md section 4."})
    loss_params: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Overrides of the loss's parameter defaults."},
    )
    lam: float = field(default=TRAINING_LAM, metadata={"help": "λ of the strategies that take one."})
    h_scale: str = field(
        default=TRAINING_H_SCALE,
        metadata={"help": "Scale of h̃ before `reweight` and `dora`, as `robust.h_scale`: `none`, `dataset` (h̃ over "
                          "its mean on the round's data, so that λ means the same in every round while h̃'s "
                          "distribution moves) or `batch`."},
    )
    reference: str = field(
        default="previous",
        metadata={"help": "The reference model of round r: `previous` (the policy round r starts from, as iterative "
                          "DPO does) or `start` (the start policy in every round)."},
    )
    lr: float = field(default=1e-4, metadata={"help": "Learning rate (cosine schedule)."})
    epochs: int = field(default=2, metadata={"help": "Epochs per round."})
    micro_batch_prompts: int = field(default=8, metadata={"help": "Prompts per optimizer step."})
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of linear warmup."})
    schedule: str = field(default="cosine", metadata={"help": "`constant`, `linear` or `cosine`."})
    precision: str = field(
        default="fp32",
        metadata={"help": "`auto`, `fp32`, `bf16` or `fp16` (`train.precision`), of the start's SFT too."},
    )
    backend: str = field(default="auto", metadata={"help": "Op backend (`train.backend`), of the SFT too."})
    checkpoint_every: int = field(
        default=0,
        metadata={"help": "Optimizer steps between checkpoints of an alignment (and of the SFT), so that a killed "
                          "one resumes from its last checkpoint; 0: none (it starts again; a SIGTERM still saves "
                          "one)."},
    )


@dataclass
class EvaluateConfig:
    reward: str = field(
        default=ORACLE,
        metadata={"help": "What judges the held-out generations: `oracle` or `reward-model:PATH` (a local folder)."},
    )
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature; 0: greedy."})
    top_k: int = field(default=50, metadata={"help": "Top-k filter; 0: off."})
    top_p: float = field(default=0.9, metadata={"help": "Top-p filter in (0, 1]."})
    max_new_tokens: int = field(default=48, metadata={"help": "New tokens per response."})
    batch_size: int = field(default=64, metadata={"help": "Prompts per `generate` call (transformers)."})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples of the held-out prompts."})


@dataclass
class IterateConfig:
    name: str = field(
        default="",
        metadata={"help": "The run's name: round r's responses have source `<name>-round<r>`; \"\": the name of "
                          "`output_dir`."},
    )
    rounds: int = field(default=3, metadata={"help": "Iterations R (may change on resume)."})
    strategies: list[str] = field(
        default_factory=lambda: ["erm", "dora"],
        metadata={"help": "One chain per strategy, each from the same start policy (may change on resume)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seeds the tiny model, training order, sampling, calibration folds and bootstrap."},
    )
    threads: int = field(
        default=0,
        metadata={"help": "Torch's intra-op threads in this process; 0: torch's default (one per core). A tiny "
                          "model runs fastest on 1. May change on resume (later steps may then differ in the last "
                          "digits)."},
    )
    data: IterateDataConfig = field(
        default_factory=IterateDataConfig, metadata={"help": "Training and held-out prompts."},
    )
    start: StartConfig = field(default_factory=StartConfig, metadata={"help": "The start policy."})
    generate: GenerateConfig = field(
        default_factory=GenerateConfig, metadata={"help": "Step 1: responses of the current policy."},
    )
    score: ScoreConfig = field(
        default_factory=ScoreConfig, metadata={"help": "Step 2: their scores, and the round's data."},
    )
    calibrate: CalibrateConfig = field(
        default_factory=CalibrateConfig,
        metadata={"help": "Step 3: h̃ from golden-vs-source classifiers, cross-fitted (strategies that use h̃)."},
    )
    align: AlignConfig = field(default_factory=AlignConfig, metadata={"help": "Step 4: alignment."})
    evaluate: EvaluateConfig = field(
        default_factory=EvaluateConfig, metadata={"help": "Step 5: held-out generations, judged."},
    )
    output_dir: str = field(
        default="runs/iterate",
        metadata={"help": "The run's folder: a folder per round, the final table and plot."},
    )

    @property
    def run_name(self) -> str:
        return self.name or Path(os.path.abspath(self.output_dir)).name

    def source(self, round_: int) -> str:
        """The source label of round ``round_``'s generated responses."""
        return f"{self.run_name}-round{round_}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RESUMABLE_KEYS = ("rounds", "strategies", "threads")
"""Keys that may change when a run is resumed: every step already done stays valid."""


def _reward(key: str, spec: str) -> None:
    if spec == ORACLE:
        return
    if not spec.startswith(REWARD_MODEL) or not spec[len(REWARD_MODEL):]:
        raise ConfigError(f"config key {key!r} must be {ORACLE!r} or 'reward-model:PATH', got {spec!r}")
    path = spec[len(REWARD_MODEL):]
    check_model_location(key, path, MODEL_FILES)
    if not Path(path).is_dir():  # its content hash keys the steps it scores
        raise ConfigError(f"config key {key!r}: the reward model must be a local folder, got {path!r}")


def _records_file(key: str, value: str) -> None:
    if value != SYNTH and not Path(value).is_file():
        raise ConfigError(f"config key {key!r}: file not found: {value} (or `{SYNTH}`: the synthetic mixture)")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"config key {key!r} must be ≥ {low}, got {value}")


def _top_p(key: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ConfigError(f"config key {key!r} must lie in (0, 1], got {value}")


def validate(cfg: IterateConfig) -> IterateConfig:
    """Checks that need more than types; each failure names its key."""
    if not cfg.run_name.strip() or any(c.isspace() for c in cfg.run_name):
        raise ConfigError(f"config key 'name' must be a name without spaces (the sources' prefix), got {cfg.name!r}")
    _at_least("rounds", cfg.rounds, 1)
    _at_least("threads", cfg.threads, 0)
    if not cfg.strategies:
        raise ConfigError("config key 'strategies' must name at least one strategy")
    if len(set(cfg.strategies)) < len(cfg.strategies):
        raise ConfigError(f"config key 'strategies' names a strategy twice: {cfg.strategies}")
    for strategy in cfg.strategies:
        try:
            RobustObjective(cfg.align.loss, cfg.align.loss_params, strategy, cfg.align.lam).resolve()
        except ObjectiveError as err:
            key = {"loss": "align.loss", "loss_params": "align.loss_params", "strategy": "strategies",
                   "lam": "align.lam"}[err.field]
            raise ConfigError(f"config key {key!r}: {err}") from None
    d = cfg.data
    _records_file("data.train", d.train)
    _records_file("data.eval", d.eval)
    if not d.target_source:
        raise ConfigError("config key 'data.target_source' must not be empty")
    for key in ("synth_prompts", "synth_eval_prompts", "max_prompt_tokens", "max_response_tokens"):
        _at_least(f"data.{key}", getattr(d, key), 1)
    _at_least("data.synth_k", d.synth_k, 2)
    if not 0 <= d.synth_golden_fraction <= 1:
        raise ConfigError(f"config key 'data.synth_golden_fraction' must lie in [0, 1], got {d.synth_golden_fraction}")
    s = cfg.start
    if s.model == TINY:
        if d.train != SYNTH:
            raise ConfigError("config key 'start.model': `tiny` (a random Llama over the synthetic vocabulary) needs "
                              "data.train: synth; give a model folder for other data")
        for key in ("hidden", "layers", "heads"):
            _at_least(f"start.{key}", getattr(s, key), 1)
        if s.hidden % s.heads:
            raise ConfigError(f"config key 'start.heads' must divide start.hidden ({s.hidden}), got {s.heads}")
    else:
        check_model_location("start.model", s.model, MODEL_FILES)
        if not Path(s.model).is_dir():  # its content hash keys every step after it
            raise ConfigError(f"config key 'start.model' must be a local model folder or `{TINY}`, got {s.model!r}")
    _at_least("start.sft_epochs", s.sft_epochs, 0)
    check_positive("start.sft_lr", s.sft_lr)
    _at_least("start.sft_batch_rows", s.sft_batch_rows, 1)
    if not s.sft_source:
        raise ConfigError("config key 'start.sft_source' must be a source or \"*\"")
    g = cfg.generate
    _at_least("generate.n", g.n, 1)
    check_positive("generate.temperature", g.temperature)  # sampled responses: greedy would give n copies
    _at_least("generate.top_k", g.top_k, 0)
    _top_p("generate.top_p", g.top_p)
    check_positive("generate.repetition_penalty", g.repetition_penalty)
    _at_least("generate.max_new_tokens", g.max_new_tokens, 1)
    check_key_choice("generate.backend", g.backend, GENERATION_BACKENDS)
    _at_least("generate.batch_size", g.batch_size, 1)
    _reward("score.reward", cfg.score.reward)
    _at_least("score.previous_rounds", cfg.score.previous_rounds, 0)
    c = cfg.calibrate
    _at_least("calibrate.folds", c.folds, 2)
    check_key_choice("calibrate.scheme", c.scheme, SCHEMES)
    check_key_choice("calibrate.beta", c.beta, BETA_CHOICES)
    try:
        check_ratio_power(c.ratio_power, "config key 'calibrate.ratio_power'")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _at_least("calibrate.min_examples", c.min_examples, 1)
    try:
        ClassifierSettings(backbone=c.backbone, folds=c.folds)
    except UserValueError as err:
        raise ConfigError(f"config key 'calibrate.backbone': {err}") from None
    a = cfg.align
    check_key_choice("align.h_scale", a.h_scale, H_SCALES)
    check_key_choice("align.reference", a.reference, REFERENCES)
    check_positive("align.lr", a.lr)
    _at_least("align.epochs", a.epochs, 1)
    _at_least("align.micro_batch_prompts", a.micro_batch_prompts, 1)
    _at_least("align.warmup_steps", a.warmup_steps, 0)
    check_key_choice("align.schedule", a.schedule, SCHEDULES)
    check_key_choice("align.precision", a.precision, PRECISIONS)
    check_key_choice("align.backend", a.backend, OP_BACKENDS)
    _at_least("align.checkpoint_every", a.checkpoint_every, 0)
    e = cfg.evaluate
    _reward("evaluate.reward", e.reward)
    check_positive("evaluate.temperature", e.temperature, allow_zero=True)
    _at_least("evaluate.top_k", e.top_k, 0)
    _top_p("evaluate.top_p", e.top_p)
    _at_least("evaluate.max_new_tokens", e.max_new_tokens, 1)
    _at_least("evaluate.batch_size", e.batch_size, 1)
    _at_least("evaluate.n_boot", e.n_boot, 100)
    if not cfg.output_dir:
        raise ConfigError("config key 'output_dir' must not be empty")
    check_output_folder("output_dir", cfg.output_dir)
    return cfg


def load_iterate_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> IterateConfig:
    """Read a YAML config, apply ``key=value`` overrides, build and validate it (relative paths stay relative
    to the working directory)."""
    return validate(read_config(IterateConfig, path, overrides))
