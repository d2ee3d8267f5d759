"""Quality benchmark: does DoRA beat ERM, reweighting and DRO? Paired differences over seeds, through the engine.

Every run trains as ``dora-engine train`` does, in this process: the run's data are written as JSONL in
the data schema, the model as a Hugging Face directory, and ``Trainer.from_config`` loads them (tokenising
into a cache, checking token ids), makes the process group of one (gloo on CPU; one per process, kept for
its runs), takes the reference log-probs from the reference cache or one pass of the SFT model (once per
data file, shared by the seed's runs), builds the DeepSpeed ZeRO-3 engine around ``PolicyLoss`` with the
run's optimizer and schedule, and ``Trainer.run`` trains (``Trainer.train_step``: sampler, collator, loss
registry, gradient clipping, non-finite steps skipped). The trained weights come back in memory
(``Trainer.trained_state_dict``) for the evaluation; the SFT run also exports, and its export is every
alignment run's model and reference. Runs are fp32 on every device.

Per seed:

* Data (``dora_engine.data.synth``, K = 4): ``train_prompts`` prompts from the *train* half of the prompt
  texts; half of them have one golden response among shifted ones (verbose / off_topic / repetitive), the
  other half shifted responses only, whose best-scored response is verbose or repetitive text.
  Evaluation: ``eval_prompts`` prompts from the *eval* half, whose texts training never sees.
* h̃: phase 1 through ``dora_engine.calibration.fit`` / ``score`` with the prompt-aware ``tfidf-pair``
  backbone, cross-fitted on 5 folds (the quickstart's calibration).
* SFT of a tiny random Llama on every response of the mixture (the start of every run and the reference).
* Settings: ``paper`` (scores = the oracle reward, label noise 0% and 40%: that fraction of prompts gets
  its scores permuted), ``length-bias`` (scores from a reward model with a verbosity bias, oracle + 1 per 40
  words; the evaluation keeps the oracle), ``all-golden`` (a control: every response golden, h̃ from the
  seed's classifiers applied to it; DoRA must not hurt there).
* Runs: every loss (dpo_pl, rrhf, lire; registry defaults) under every strategy (erm, reweight, dro,
  dora at ``lam`` with h̃ scaled as ``h_scale`` says: ``robust.h_scale``), from the same SFT start with the
  same data order. ``--lams`` adds dora runs at each λ (the sensitivity curve, ``quality_lambda.png``:
  dora − erm against λ, ∞ being reweighting), under each h̃ scale option of ``--h-scales``; the report then
  has a table per option and λ for choosing the defaults (worst cell, mean over the mixture settings).
  ``--ratio-power`` sets h̃'s τ (``calibrate --ratio-power``) of every run, ``--ratio-powers`` adds dora runs on
  h̃ at each τ (at ``--lams``' λ, default the config's λ), a curve per τ in the tables.
* Evaluation: one sampled response per evaluation prompt (the paper's decoding: temperature 0.8, top-k 50,
  top-p 0.9; the same sampling seeds for every run), the oracle reward of each (primary metric) and its win
  points against the prompt's golden response (ties half; secondary).

Report: per loss and setting, each strategy's mean over seeds, and the paired differences dora − erm,
dora − reweight, dora − dro: per seed, and their mean with a percentile-bootstrap 95% interval over seeds
(``dora_engine.eval.paired``). Hyper-parameters are ``BenchConfig``'s defaults, chosen on tuning seeds
100-105 (h̃'s scale and λ on 100-102, τ on 100-105; benchmarks/RESULTS.md) and then run once on the
reported seeds 20-29, fresh for the current defaults (10-19 reported the earlier ones). ``--quick`` is the
CI-sized smoke run; it adds a sanity run trained on reversed preferences, which must end below its SFT start.

    python benchmarks/bench_quality.py --jobs 2         # the full grid (seeds 20-29)
    python benchmarks/bench_quality.py --quick          # a smoke run (under a minute)
    python benchmarks/bench_quality.py --seeds 100 101 102 --strategies erm reweight dora \
        --lams 0.25 0.5 1 2 4 --h-scales none dataset --jobs 3 --output-dir runs/tuning   # the λ sweep
    python benchmarks/bench_quality.py --seeds 100 101 102 103 104 105 --strategies erm dora \
        --ratio-powers 0.25 0.5 1 --ratio-power 1 --jobs 2 --output-dir runs/tuning_tau  # the τ sweep
    python benchmarks/bench_quality.py --combine a/quality_results.json b/quality_results.json  # one report
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dora_engine.atomic import atomic_path, atomic_write
from dora_engine.data.schema import Record, Response, write_records
from dora_engine.data.summary import mean_h_tilde_by_target
from dora_engine.data.synth import GOLDEN_SOURCE, build_synth_tokenizer, synth_records
from dora_engine.data.weights import CALIBRATION_RATIO_POWER, PAPER_RATIO_POWER, check_ratio_power
from dora_engine.eval.comparison import Comparison
from dora_engine.eval.judges import OracleScorer, RewardJudge
from dora_engine.eval.paired import Interval, paired_interval, score_against_golden
from dora_engine.eval.winrate import golden_response
from dora_engine.generation import EVALUATION_SAMPLING, derived_seed, sample_texts
from dora_engine.losses import H_SCALES, TRAINING_H_SCALE, TRAINING_LAM
from dora_engine.training.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    RobustConfig,
    TrainConfig,
    TrainingConfig,
)
from dora_engine.training.data import ALL_SOURCES
from dora_engine.training.engine import Trainer
from dora_engine.training.process_group import close_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_pool import run_seeds  # noqa: E402 (a benchmarks module beside this one)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dora_engine.calibration.pipeline import Calibration

METRICS = ("reward", "win_rate")
REVERSED = "reversed"  # the --quick sanity run's strategy label: erm on negated scores


@dataclass(frozen=True)
class Setting:
    """One data condition of the grid."""

    name: str
    label_noise: float = 0.0
    length_bias: float = 0.0
    all_golden: bool = False


SETTINGS = (
    Setting("paper, noise 0%"),
    Setting("paper, noise 40%", label_noise=0.4),
    Setting("length-bias", length_bias=1.0),
    Setting("all-golden", all_golden=True),
)


@dataclass(frozen=True)
class BenchConfig:
    # 0-9: seed 0's training data is the quickstart's; 10-19 reported earlier defaults (RESULTS.md)
    seeds: tuple[int, ...] = tuple(range(20, 30))
    settings: tuple[str, ...] = tuple(s.name for s in SETTINGS)
    losses: tuple[str, ...] = ("dpo_pl", "rrhf", "lire")
    strategies: tuple[str, ...] = ("erm", "reweight", "dro", "dora")
    lam: float = TRAINING_LAM  # λ of dro and dora
    h_scale: str = TRAINING_H_SCALE  # robust.h_scale of every run
    ratio_power: float = CALIBRATION_RATIO_POWER  # τ of h̃ (calibrate --ratio-power) of every run
    lam_sweep: tuple[float, ...] = ()  # extra dora runs at these λ (the sensitivity curve; ∞ is reweight)
    scale_sweep: tuple[str, ...] = ()  # ... under each of these h_scale options (default: h_scale only)
    power_sweep: tuple[float, ...] = ()  # ... with h̃ at each of these τ (default: ratio_power only)
    train_prompts: int = 256
    golden_fraction: float = 0.5
    eval_prompts: int = 224
    k: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    max_prompt_tokens: int = 32
    max_response_tokens: int = 64
    sft_epochs: int = 20
    sft_lr: float = 1e-2
    sft_batch: int = 64
    align_epochs: int = 2
    align_lr: float = 1e-4
    align_batch_prompts: int = 8
    calibration_backbone: str = "tfidf-pair"  # reads the prompt: an off-topic answer is told apart
    calibration_folds: int = 5
    max_new_tokens: int = 48
    temperature: float = 0.8  # the paper's decoding (with top-k 50, top-p 0.9); 0: greedy
    backend: str = "auto"
    reversed_check: bool = False


QUICK = {
    "seeds": (0,), "settings": ("paper, noise 0%",), "losses": ("dpo_pl",), "strategies": ("erm", "dora"),
    "train_prompts": 64, "eval_prompts": 32, "sft_epochs": 4, "align_epochs": 2, "align_lr": 5e-4,
    "max_new_tokens": 24, "reversed_check": True, "calibration_folds": 2,
}


@dataclass(frozen=True)
class Variant:
    """The objective of one alignment run: a strategy with its λ and h̃ scale (``robust.*``), on h̃ computed
    with the ratio power τ (``calibrate --ratio-power``)."""

    strategy: str
    lam: float
    h_scale: str
    ratio_power: float


def sweep_label(h_scale: str, lam: float, ratio_power: float | None) -> str:
    """The run label of a sweep point; τ is named when the sweep varies it (``ratio_power`` not None)."""
    power = "" if ratio_power is None else f" τ={ratio_power:g}"
    return f"dora[{h_scale}] λ={lam:g}{power}"


def sweep_curves(config: BenchConfig) -> list[tuple[str, float]]:
    """(h_scale, τ) of every sensitivity curve: ``scale_sweep`` × ``power_sweep`` (each defaulting to the
    config's own option)."""
    return [(h_scale, power) for h_scale in config.scale_sweep or (config.h_scale,)
            for power in config.power_sweep or (config.ratio_power,)]


def sweep_lams(config: BenchConfig) -> tuple[float, ...]:
    """The λ of the sweep's dora runs: ``lam_sweep``; the config's λ for a τ sweep without one; none else."""
    return config.lam_sweep or ((config.lam,) if config.power_sweep else ())


def variants(config: BenchConfig) -> list[tuple[str, Variant]]:
    """(label, variant) of every alignment run per setting and loss: each of ``strategies`` at ``lam``,
    ``h_scale`` and ``ratio_power`` (labelled by its name), then dora at every λ of ``lam_sweep`` (default:
    ``lam``) on every curve of ``sweep_curves``, except the point that is the plain ``dora`` run already."""
    plan = [(name, Variant(name, config.lam, config.h_scale, config.ratio_power)) for name in config.strategies]
    main_dora = Variant("dora", config.lam, config.h_scale, config.ratio_power) if "dora" in config.strategies \
        else None
    for h_scale, power in sweep_curves(config):
        for lam in sweep_lams(config):
            variant = Variant("dora", lam, h_scale, power)
            if variant != main_dora:
                plan.append((sweep_label(h_scale, lam, power if config.power_sweep else None), variant))
    return plan


def curve_labels(config: BenchConfig, h_scale: str, ratio_power: float) -> list[tuple[float, str]]:
    """(λ, run label) of dora's sensitivity curve under ``h_scale`` and τ, by increasing λ (∞: ``reweight``,
    on the curve of the config's τ, which reweighting runs at)."""
    power = ratio_power if config.power_sweep else None
    points = {lam: sweep_label(h_scale, lam, power) for lam in sweep_lams(config)}
    if "dora" in config.strategies and h_scale == config.h_scale and ratio_power == config.ratio_power:
        points[config.lam] = "dora"
    curve = sorted(points.items())
    if "reweight" in config.strategies and ratio_power == config.ratio_power:
        curve.append((math.inf, "reweight"))
    return curve


# ---------------------------------------------------------------- data and models


def setting_by_name(name: str) -> Setting:
    for setting in SETTINGS:
        if setting.name == name:
            return setting
    raise ValueError(f"unknown setting {name!r}; valid: {[s.name for s in SETTINGS]}")


def training_records(config: BenchConfig, seed: int, setting: Setting) -> list[Record]:
    """The seed's training prompts under ``setting`` (the paper settings and length-bias share their texts)."""
    if setting.all_golden:
        return synth_records(config.train_prompts, k=config.k, golden_per_prompt=config.k, seed=seed + 10_000,
                             split="train")
    return synth_records(config.train_prompts, k=config.k, golden_fraction=config.golden_fraction,
                         label_noise=setting.label_noise, length_bias=setting.length_bias, seed=seed, split="train")


def eval_records(config: BenchConfig, seed: int) -> list[Record]:
    """The seed's evaluation prompts, from the *eval* half of the prompt texts, each with its golden response."""
    return synth_records(config.eval_prompts, k=2, golden_per_prompt=1, seed=seed + 20_000, split="eval")


def reversed_preferences(records: list[Record]) -> list[Record]:
    """The same records with negated scores: the worst response becomes the preferred one."""
    return [replace(r, responses=[Response(x.text, x.source, -x.score) for x in r.responses]) for r in records]


@dataclass(frozen=True)
class RunPaths:
    """Where one run reads its model and data and writes its output. The tokenised data and the reference
    log-probs go to caches that the seed's runs share: keyed by data, tokenizer and model, they are made
    once per data file and reused by every later run on it, as for a user's runs."""

    model: str = ""
    data: str = ""
    output_dir: str = "runs/bench_quality"
    tokenised: str | None = None
    ref_cache: str | None = None

    @classmethod
    def under(cls, root: Path, model: Path, data: Path, run: str) -> RunPaths:
        return cls(str(model), str(data), str(root / "runs" / run), str(root / "tokenised"), str(root / "ref_cache"))


def run_config(
    config: BenchConfig, stage: str, seed: int, loss: str = "dpo_pl", variant: Variant | None = None, *,
    paths: RunPaths = RunPaths(),
) -> TrainingConfig:
    """The engine configuration of one SFT or alignment run, reading and writing where ``paths`` say. fp32 on
    every device (``auto`` would be bf16 on recent GPUs), so that the figures do not depend on the machine."""
    sft = stage == "sft"
    variant = variant or Variant("erm", config.lam, config.h_scale, config.ratio_power)
    return TrainingConfig(
        stage=stage,
        model=ModelConfig(path=paths.model),
        data=DataConfig(train=[paths.data] if paths.data else [], target_source=ALL_SOURCES,
                        max_prompt_tokens=config.max_prompt_tokens, max_response_tokens=config.max_response_tokens,
                        cache_dir=paths.tokenised, ref_cache_dir=paths.ref_cache),
        loss=LossConfig(name=loss),
        robust=RobustConfig(strategy=variant.strategy, lam=variant.lam, h_scale=variant.h_scale),
        train=TrainConfig(
            micro_batch_prompts=config.sft_batch if sft else config.align_batch_prompts,
            lr=config.sft_lr if sft else config.align_lr, schedule="cosine", warmup_steps=2 if sft else 0,
            epochs=config.sft_epochs if sft else config.align_epochs, seed=seed, backend=config.backend,
            precision="fp32",
        ),
        logging=LoggingConfig(tensorboard="off"),
        checkpoint=CheckpointConfig(export=sft),  # the SFT export is the alignment runs' model and reference
        output_dir=paths.output_dir,
    )


def tiny_llama(tokenizer: PreTrainedTokenizerBase, config: BenchConfig, seed: int) -> PreTrainedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=2 * config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    ))


# ---------------------------------------------------------------- phases


def fit_h_tilde(records: list[Record], config: BenchConfig, seed: int, workdir: Path) -> Calibration:
    """Phase 1 through the calibration API, cross-fitted; returns the fitted calibration."""
    from dora_engine.calibration.classifier import ClassifierSettings
    from dora_engine.calibration.pipeline import fit

    settings = ClassifierSettings(backbone=config.calibration_backbone, seed=seed, folds=config.calibration_folds,
                                  device="cpu")
    return fit(records, target=GOLDEN_SOURCE, output_dir=workdir / "calibration", settings=settings, min_examples=4)


def trained_weights(cfg: TrainingConfig) -> dict[str, torch.Tensor]:
    """Train ``cfg`` as ``dora-engine train`` does, in this process: ``Trainer.from_config`` (data, the
    process group of one, reference log-probs from the cache or one pass, the DeepSpeed ZeRO-3 engine) and
    ``Trainer.run``; returns the trained weights, gathered in memory. A SIGINT or SIGTERM stops the trainer
    after its current step, and then the whole benchmark."""
    trainer = Trainer.from_config(cfg, progress=False)
    try:
        code = trainer.run()
        if trainer.stop_signal is not None:  # the trainer took a SIGINT or SIGTERM meant for the bench
            raise KeyboardInterrupt(f"stopped on {trainer.stop_signal}")
        if code != 0:
            raise RuntimeError(f"the {cfg.stage} run in {cfg.output_dir} ended with exit code {code}")
        state = trainer.trained_state_dict()
        assert state is not None  # rank 0 of a world of one
        return state
    finally:
        trainer.close()


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[Record], config: BenchConfig, seed: int
) -> dict[str, list[float]]:
    """Per evaluation prompt: the oracle reward of one sampled response and its win points against golden."""
    decoding = replace(EVALUATION_SAMPLING, max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    model.eval()
    outputs = sample_texts(model, tokenizer, [r.prompt for r in records], decoding,
                           [derived_seed(seed, r.id) for r in records], batch_size=len(records),
                           progress=False)
    comparisons = [Comparison(r.id, r.prompt_text(), texts[0], golden_response(r, GOLDEN_SOURCE))
                   for r, texts in zip(records, outputs, strict=True)]
    scores = score_against_golden("policy", comparisons, RewardJudge(OracleScorer()))
    return {"reward": scores.rewards, "win_rate": scores.win_points}


# ---------------------------------------------------------------- one seed


@dataclass
class RunResult:
    seed: int
    setting: str
    loss: str
    strategy: str  # the run's label (``variants``): a strategy's name, or a sweep point such as "dora[none] λ=2"
    reward: float
    win_rate: float
    seconds: float
    lam: float = 1.0
    h_scale: str = "none"
    ratio_power: float = PAPER_RATIO_POWER
    per_prompt: dict[str, list[float]] = field(repr=False, default_factory=dict)


@dataclass
class SeedResult:
    seed: int
    sft: dict[str, float]
    mean_h_tilde: dict[str, float]
    runs: list[RunResult]
    seconds: float
    sft_per_prompt: dict[str, list[float]] = field(repr=False, default_factory=dict)


def run_seed(config: BenchConfig, seed: int, workdir: Path) -> SeedResult:
    """SFT, h̃ and every run of the grid for one seed; every run trains through the engine's ``Trainer``
    (``trained_weights``) from files in a folder of its own under ``workdir``."""
    from dora_engine.calibration.pipeline import score
    from dora_engine.generation import EXPORT_FOLDER

    started = time.perf_counter()
    tokenizer = build_synth_tokenizer()
    settings = [setting_by_name(name) for name in config.settings]
    held_out = eval_records(config, seed)
    clean = training_records(config, seed, SETTINGS[0])
    with tempfile.TemporaryDirectory(prefix=f"seed{seed}_", dir=workdir) as tmp:
        root = Path(tmp)
        calibration = fit_h_tilde(clean, config, seed, root)
        powers = list(dict.fromkeys([config.ratio_power, *config.power_sweep]))
        data_by_setting: dict[tuple[str, float], list[Record]] = {}
        for power in powers:
            h_clean = [r.h_tilde for r in score(clean, calibration, ratio_power=power)]
            for setting in settings:
                records = training_records(config, seed, setting)
                h = h_clean if not setting.all_golden else \
                    [r.h_tilde for r in score(records, calibration, ratio_power=power)]
                data_by_setting[setting.name, power] = [replace(r, h_tilde=v) for r, v in zip(records, h, strict=True)]
        by_target = mean_h_tilde_by_target(score(clean, calibration, ratio_power=config.ratio_power), GOLDEN_SOURCE)
        mean_h = {"with_golden": by_target["with_target"][0], "without_golden": by_target["without_target"][0]}
        if "all-golden" in config.settings:
            mean_h["all_golden"] = statistics.fmean(r.h_tilde for r in
                                                    data_by_setting["all-golden", config.ratio_power])

        model = tiny_llama(tokenizer, config, seed)  # the SFT start; below, the weights of each evaluated run
        model.save_pretrained(root / "init")
        tokenizer.save_pretrained(root / "init")
        sft_paths = RunPaths.under(root, root / "init", data_file(root, "sft", clean), "sft")
        model.load_state_dict(trained_weights(run_config(config, "sft", seed, paths=sft_paths)))
        sft_model = Path(sft_paths.output_dir) / EXPORT_FOLDER
        sft_scores = evaluate(model, tokenizer, held_out, config, seed)

        runs: list[RunResult] = []
        plan = [(s, loss, label, variant) for s in settings for loss in config.losses
                for label, variant in variants(config)]
        if config.reversed_check:
            plan.append((settings[0], config.losses[0], REVERSED,
                         Variant("erm", config.lam, config.h_scale, config.ratio_power)))
        files: dict[tuple[str, float, bool], Path] = {}
        for number, (setting, loss, label, variant) in enumerate(plan):
            run_started = time.perf_counter()
            key = (setting.name, variant.ratio_power, label == REVERSED)
            if key not in files:
                records = data_by_setting[key[:2]]
                files[key] = data_file(root, f"data{len(files)}", reversed_preferences(records) if key[2] else records)
            paths = RunPaths.under(root, sft_model, files[key], f"run{number:03d}")
            model.load_state_dict(trained_weights(run_config(config, "align", seed, loss, variant, paths=paths)))
            scores = evaluate(model, tokenizer, held_out, config, seed)
            runs.append(RunResult(seed, setting.name, loss, label, statistics.fmean(scores["reward"]),
                                  statistics.fmean(scores["win_rate"]), time.perf_counter() - run_started,
                                  variant.lam, variant.h_scale, variant.ratio_power, scores))
    sft = {m: statistics.fmean(sft_scores[m]) for m in METRICS}
    return SeedResult(seed, sft, mean_h, runs, time.perf_counter() - started, sft_scores)


def data_file(root: Path, name: str, records: list[Record]) -> Path:
    """``records`` written as ``<root>/<name>.jsonl`` in the data schema, for a run to read."""
    path = root / f"{name}.jsonl"
    write_records(path, records)
    return path


def _worker(args: tuple[BenchConfig, int, str, int]) -> SeedResult:
    config, seed, workdir, threads = args
    torch.set_num_threads(threads)
    try:
        return run_seed(config, seed, Path(workdir))
    finally:
        close_distributed()  # the next seed of this worker makes a new one


# ---------------------------------------------------------------- reporting


def _values(
    seeds: Sequence[SeedResult], metric: str, strategy: str, setting: str | None = None, loss: str | None = None
) -> dict[int, float]:
    """Seed -> ``metric`` of the run with this strategy (and setting and loss, when given)."""
    return {s.seed: getattr(r, metric) for s in seeds for r in s.runs
            if r.strategy == strategy and setting in (None, r.setting) and loss in (None, r.loss)}


def differences(
    seeds: Sequence[SeedResult], metric: str, setting: str, loss: str, other: str, label: str = "dora"
) -> tuple[dict[int, float], Interval | None]:
    """Run ``label`` − run ``other`` per seed and the mean with its bootstrap interval over seeds."""
    dora = _values(seeds, metric, setting=setting, loss=loss, strategy=label)
    base = _values(seeds, metric, setting=setting, loss=loss, strategy=other)
    common = sorted(set(dora) & set(base))
    if not common:
        return {}, None
    per_seed = {s: dora[s] - base[s] for s in common}
    return per_seed, paired_interval([base[s] for s in common], [dora[s] for s in common])


def _mean_sd(values: Sequence[float], scale: float, digits: int) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def markdown_tables(config: BenchConfig, seeds: Sequence[SeedResult]) -> str:
    others = [s for s in ("erm", "reweight", "dro") if s in config.strategies and "dora" in config.strategies]
    lines = sweep_tables(config, seeds) if config.lam_sweep or config.power_sweep else []
    tables = (("reward", "Mean oracle reward of the generations (primary)", 1.0, 3),
              ("win_rate", "Win rate against the golden responses, ties half (%)", 100.0, 1))
    for metric, title, scale, digits in tables:
        sft = [s.sft[metric] for s in seeds]
        lines += [
            f"### {title}",
            "",
            f"Seeds {[s.seed for s in seeds]}; mean ± sd over seeds, and paired differences with a bootstrap 95% "
            f"interval over seeds (**bold**: the interval excludes zero). SFT start: {_mean_sd(sft, scale, digits)}.",
            "",
            "| setting | loss | " + " | ".join(config.strategies) + " | " +
            " | ".join(f"dora − {o}" for o in others) + " |",
            "| --- | --- | " + " | ".join("---" for _ in [*config.strategies, *others]) + " |",
        ]
        for setting in config.settings:
            for loss in config.losses:
                cells = [_mean_sd(list(_values(seeds, metric, setting=setting, loss=loss, strategy=s).values()),
                                  scale, digits) for s in config.strategies]
                for other in others:
                    _, interval = differences(seeds, metric, setting, loss, other)
                    if interval is None:
                        cells.append("–")
                    elif interval.n < 2:  # one seed: no interval to speak of
                        cells.append(f"{scale * interval.mean:+.{digits}f}")
                    else:
                        text = interval.format(scale, digits)
                        cells.append(f"**{text}**" if interval.excludes_zero() else text)
                lines.append(f"| {setting} | {loss} | " + " | ".join(cells) + " |")
        lines.append("")
    if others:
        lines += ["### dora − erm per seed (mean oracle reward)", "",
                  "| setting | loss | " + " | ".join(str(s.seed) for s in seeds) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
        for setting in config.settings:
            for loss in config.losses:
                per_seed, _ = differences(seeds, "reward", setting, loss, "erm")
                lines.append(f"| {setting} | {loss} | " + " | ".join(
                    f"{per_seed[s.seed]:+.3f}" if s.seed in per_seed else "–" for s in seeds) + " |")
        lines.append("")
    h = [s.mean_h_tilde for s in seeds]
    lines.append("Mean h̃ over seeds: training prompts with a golden response "
                 f"{statistics.fmean(x['with_golden'] for x in h):.3f}, without one "
                 f"{statistics.fmean(x['without_golden'] for x in h):.3f}"
                 + (f", all-golden control {statistics.fmean(x['all_golden'] for x in h):.3f}"
                    if all("all_golden" in x for x in h) else "") + ".")
    return "\n".join(lines) + "\n"


def sweep_tables(config: BenchConfig, seeds: Sequence[SeedResult]) -> list[str]:
    """The λ sweep: per h̃ scale option and λ, the paired difference (dora − erm) in mean reward of every
    setting × loss cell, and a summary row per candidate for choosing the defaults (the worst cell, the mean
    over the mixture cells, how many cells lie below zero and how many mixture cells' intervals exclude zero
    above it)."""
    if "erm" not in config.strategies:
        return []
    cells = [(setting, loss) for setting in config.settings for loss in config.losses]
    mixture = [(setting, loss) for setting, loss in cells if setting != "all-golden"]
    lines = ["### λ sweep: dora − erm in mean oracle reward, per h̃ scale, ratio power τ and λ", "",
             f"Seeds {[s.seed for s in seeds]}; paired mean with a bootstrap 95% interval over seeds (**bold**: the "
             "interval excludes zero); λ = ∞ is reweighting.", "",
             "| h_scale | τ | λ | " + " | ".join(f"{setting}: {loss}" for setting, loss in cells) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in cells) + " |"]
    summary = ["", "| h_scale | τ | λ | worst cell | mean over mixture cells | cells below 0 | intervals below 0 | "
               "mixture intervals above 0 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h_scale, power in sweep_curves(config):
        for lam, label in curve_labels(config, h_scale, power):
            intervals = {cell: differences(seeds, "reward", *cell, "erm", label)[1] for cell in cells}
            if any(i is None for i in intervals.values()):
                continue
            texts = [i.format(1.0, 3) if i.n > 1 else f"{i.mean:+.3f}" for i in intervals.values()]
            texts = [f"**{t}**" if i.n > 1 and i.excludes_zero() else t
                     for t, i in zip(texts, intervals.values(), strict=True)]
            name = "∞" if math.isinf(lam) else f"{lam:g}"
            lines.append(f"| {h_scale} | {power:g} | {name} | " + " | ".join(texts) + " |")
            means = [i.mean for i in intervals.values()]
            mixture_mean = statistics.fmean(intervals[c].mean for c in mixture)
            summary.append(
                f"| {h_scale} | {power:g} | {name} | {min(means):+.3f} | {mixture_mean:+.3f}"
                f" | {sum(m < 0 for m in means)} | {sum(i.n > 1 and i.hi < 0 for i in intervals.values())} | "
                f"{sum(intervals[c].n > 1 and intervals[c].lo > 0 for c in mixture)} |")
    return [*lines, *summary, ""]


def plot_lambda(config: BenchConfig, seeds: Sequence[SeedResult], path: Path) -> None:
    """The sensitivity curve: per setting, dora − erm in mean reward against λ (log scale; ∞ = reweight), a
    line per loss and curve (h̃ scale option and τ), with the bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = sweep_curves(config)
    lams = sweep_lams(config)
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, len(config.settings), figsize=(4.2 * len(config.settings), 3.8), squeeze=False,
                             sharey=True)
    for ax, setting in zip(axes[0], config.settings, strict=True):
        for color, loss in zip(("C0", "C1", "C2", "C3", "C4"), config.losses, strict=False):
            for style, (h_scale, power) in zip(itertools.cycle(styles), curves):
                xs, means, errs = [], [], [[], []]
                for lam, label in curve_labels(config, h_scale, power):
                    _, interval = differences(seeds, "reward", setting, loss, "erm", label)
                    if interval is None:
                        continue
                    xs.append(math.log2(lam) if math.isfinite(lam) else math.log2(max(lams)) + 1.5)
                    means.append(interval.mean)
                    errs[0].append(interval.mean - interval.lo)
                    errs[1].append(interval.hi - interval.mean)
                ax.errorbar(xs, means, yerr=errs, color=color, linestyle=style, marker="o", markersize=3,
                            capsize=2, label=f"{loss}, {h_scale}, τ={power:g}")
        ticks = [*sorted({*lams, config.lam})]
        ax.set_xticks([math.log2(t) for t in ticks] + [math.log2(max(lams)) + 1.5],
                      [f"{t:g}" for t in ticks] + ["∞"])
        ax.axhline(0, color="grey", linewidth=1)
        ax.set_title(setting)
        ax.set_xlabel("λ")
    axes[0][0].set_ylabel("dora − erm, mean oracle reward")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot(config: BenchConfig, seeds: Sequence[SeedResult], path: Path) -> None:
    """Per setting, the paired difference dora − erm in mean reward per loss, with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [s for s in ("erm", "reweight", "dro") if s in config.strategies and "dora" in config.strategies]
    fig, axes = plt.subplots(1, len(config.settings), figsize=(4 * len(config.settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], config.settings, strict=True):
        width = 0.8 / max(1, len(others))
        for j, other in enumerate(others):
            xs, means, errs = [], [], [[], []]
            for i, loss in enumerate(config.losses):
                _, interval = differences(seeds, "reward", setting, loss, other)
                if interval is None:
                    continue
                xs.append(i + (j - (len(others) - 1) / 2) * width)
                means.append(interval.mean)
                errs[0].append(interval.mean - interval.lo)
                errs[1].append(interval.hi - interval.mean)
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=f"dora − {other}")
        ax.axhline(0, color="grey", linewidth=1)
        ax.set_xticks(range(len(config.losses)), config.losses)
        ax.set_title(setting)
        ax.set_ylabel("Δ mean oracle reward")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one seed, dpo_pl, erm vs dora, tiny data, and the reversed-preference check")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 20-29)")
    parser.add_argument("--settings", nargs="+", choices=[s.name for s in SETTINGS], help="only these settings")
    parser.add_argument("--losses", nargs="+", help="only these losses (default dpo_pl rrhf lire)")
    parser.add_argument("--strategies", nargs="+", help="only these strategies (default erm reweight dro dora)")
    parser.add_argument("--h-scale", choices=H_SCALES, help="robust.h_scale of every run (default: BenchConfig's)")
    parser.add_argument("--lams", type=float, nargs="+",
                        help="the λ sweep: extra dora runs at these λ (the sensitivity curve, quality_lambda.png)")
    parser.add_argument("--h-scales", nargs="+", choices=H_SCALES,
                        help="run the λ sweep under each of these h̃ scale options (default: --h-scale's)")
    parser.add_argument("--ratio-power", type=float, help="τ of every run's h̃ (calibrate --ratio-power; default: "
                        "BenchConfig's)")
    parser.add_argument("--ratio-powers", type=float, nargs="+",
                        help="extra dora runs on h̃ at each of these τ (at --lams' λ, default the config's λ)")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="train nothing: the tables and figures of earlier runs' quality_results.json files "
                             "together (the same seeds and settings; their runs are joined per seed)")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON, markdown and PNG go")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a BenchConfig field (numbers only), e.g. --set align_lr=5e-4; for tuning on "
                             "other seeds than the reported ones")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per process (default 1: fastest for these tiny models)")
    return parser.parse_args(argv)


def compact(value: object) -> object:
    """``value`` with every float rounded to 5 decimals (the per-prompt values make the file large)."""
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [compact(v) for v in value]
    return value


def load_results(path: Path) -> tuple[BenchConfig, list[SeedResult]]:
    """A ``quality_results.json`` back as the config and seed results it was written from."""
    report = json.loads(path.read_text())
    fields = {"ratio_power": PAPER_RATIO_POWER, **report["config"]}  # a file from before τ: the paper's h̃
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    seeds = [SeedResult(**{**s, "runs": [RunResult(**r) for r in s["runs"]]}) for s in report["seeds"]]
    return config, seeds


def objective_of(run: RunResult) -> dict[str, object]:
    """What a run's result depends on besides its data: λ for dro, h̃ (its scale and τ) for reweight, all
    three for dora and the sweep's points, nothing for erm."""
    uses = {"erm": (), REVERSED: (), "dro": ("lam",), "reweight": ("h_scale", "ratio_power")}.get(
        run.strategy, ("lam", "h_scale", "ratio_power"))
    return {name: getattr(run, name) for name in uses}


def union(a: tuple, b: tuple) -> tuple:
    """The items of ``a`` then those of ``b`` not in ``a``."""
    return tuple(dict.fromkeys([*a, *b]))


def combine(paths: Sequence[Path]) -> tuple[BenchConfig, list[SeedResult]]:
    """The results of several runs of the bench as one: per seed the runs of every file (a label met twice
    keeps the first). Refused unless the files share their seeds and every seed's SFT start gave the same
    per-prompt scores (else the runs did not start from the same model and cannot be paired)."""
    loaded = [load_results(path) for path in paths]
    config, first = loaded[0]
    by_seed = {s.seed: s for s in first}
    for path, (other, seeds) in zip(paths[1:], loaded[1:], strict=True):
        if sorted(s.seed for s in seeds) != sorted(by_seed):
            raise SystemExit(f"--combine: {path} has seeds {sorted(s.seed for s in seeds)}, not {sorted(by_seed)}")
        for seed in seeds:
            mine = by_seed[seed.seed]
            if seed.sft_per_prompt != mine.sft_per_prompt:
                raise SystemExit(f"--combine: seed {seed.seed}'s SFT start differs in {path} (not the same start)")
            known = {(r.setting, r.loss, r.strategy): r for r in mine.runs}
            for run in seed.runs:
                key = (run.setting, run.loss, run.strategy)
                if key not in known:
                    mine.runs.append(run)
                elif objective_of(known[key]) != objective_of(run):
                    raise SystemExit(f"--combine: {run.strategy!r} ran with {objective_of(known[key])} before and "
                                     f"{objective_of(run)} in {path}")
        config = replace(config, settings=union(config.settings, other.settings),
                         losses=union(config.losses, other.losses),
                         strategies=union(config.strategies, other.strategies),
                         lam_sweep=tuple(sorted(union(config.lam_sweep, other.lam_sweep))),
                         scale_sweep=union(config.scale_sweep or (config.h_scale,),
                                           other.scale_sweep or (other.h_scale,)),
                         power_sweep=union(config.power_sweep, other.power_sweep))
    return config, sorted(by_seed.values(), key=lambda s: s.seed)


def configure(args: argparse.Namespace) -> BenchConfig:
    """The run's ``BenchConfig``: the defaults (or ``QUICK``) with the command line's choices, all checked
    before any work starts."""
    from dora_engine.losses import get_loss, get_strategy

    config = BenchConfig(**QUICK) if args.quick else BenchConfig()
    for name in ("seeds", "settings", "losses", "strategies"):
        if getattr(args, name):
            config = replace(config, **{name: tuple(getattr(args, name))})
    if args.h_scale:
        config = replace(config, h_scale=args.h_scale)
    if args.lams:
        if any(not math.isfinite(lam) or lam <= 0 for lam in args.lams):
            raise SystemExit(f"--lams: every λ must be a finite number > 0, got {args.lams}")
        config = replace(config, lam_sweep=tuple(sorted(set(args.lams))))
    if args.h_scales:
        if not args.lams:
            raise SystemExit("--h-scales needs --lams (the λ of the sweep)")
        config = replace(config, scale_sweep=tuple(dict.fromkeys(args.h_scales)))
    for power in [p for p in (args.ratio_power,) if p is not None] + list(args.ratio_powers or ()):
        try:
            check_ratio_power(power, "--ratio-power(s): τ")
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if args.ratio_power is not None:
        config = replace(config, ratio_power=args.ratio_power)
    if args.ratio_powers:
        config = replace(config, power_sweep=tuple(dict.fromkeys(args.ratio_powers)))
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        current = getattr(config, name, None)
        if not isinstance(current, int | float) or isinstance(current, bool):
            raise SystemExit(f"--set {assignment}: {name!r} is not a numeric BenchConfig field")
        number = float(value)
        if isinstance(current, int) and not number.is_integer():
            raise SystemExit(f"--set {assignment}: {name!r} takes a whole number")
        config = replace(config, **{name: type(current)(number)})
    try:
        for loss in config.losses:
            get_loss(loss)
        for strategy in config.strategies:
            get_strategy(strategy)
    except ValueError as err:
        raise SystemExit(f"bench_quality: {err}") from None
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("--jobs and --threads must be >= 1")
    return config


def run_grid(config: BenchConfig, jobs: int, threads: int) -> list[SeedResult]:
    """Every seed of ``config``, ``jobs`` at a time, sorted by seed."""
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as workdir:
        tasks = [(config, seed, workdir, threads) for seed in config.seeds]
        results = run_seeds(_worker, tasks, jobs, lambda result: f"seed {result.seed}: {result.seconds:.0f} s")
    return sorted(results, key=lambda s: s.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.combine:
        config, results = combine([Path(p) for p in args.combine])
    else:
        config = configure(args)
        results = run_grid(config, args.jobs, args.threads)
    elapsed = time.perf_counter() - started
    out = Path(args.output_dir)
    table = markdown_tables(config, results)
    with atomic_write(out / "quality_results.json") as handle:
        json.dump(compact({"config": asdict(config), "quick": args.quick, "seconds": elapsed, "jobs": args.jobs,
                           "combined_from": args.combine or [], "seeds": [asdict(s) for s in results]}),
                  handle, separators=(",", ":"))
    with atomic_write(out / "quality.md") as handle:
        handle.write(table)
    figures = ["quality.png"]
    plot(config, results, out / "quality.png")
    if config.lam_sweep or config.power_sweep:
        plot_lambda(config, results, out / "quality_lambda.png")
        figures.append("quality_lambda.png")
    print(table)
    if config.reversed_check:
        for s in results:
            rev = _values([s], "reward", strategy=REVERSED)[s.seed]
            print(f"seed {s.seed}: reversed-preference policy reward {rev:.3f}, SFT start {s.sft['reward']:.3f}")
    runs = sum(len(s.runs) for s in results)
    print(f"{runs} runs in {elapsed:.0f} s; wrote {out}/quality_results.json, quality.md, {', '.join(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
