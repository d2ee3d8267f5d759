"""Quality benchmark: oracle win rate against the golden responses for ERM, DRO, reweighting and DoRA.

Setup (all in-process, CPU by default):

* Data: ``data synth`` mixtures. Half of the training prompts have one golden response among K = 4
  (the rest drawn from the shifted sources verbose / off_topic / repetitive); the other half have only
  shifted responses, so their best-scored response is repetitive or verbose text. Scores are the oracle
  reward; a fraction of prompts (label noise 0% and 40%) gets its scores permuted
  (``dora_engine.data.corrupt``). Evaluation prompts are a fresh draw with their golden response.
* h̃: phase 1 of DoRA through ``dora_engine.calibration.fit`` / ``score`` (per-source scheme) with a
  tiny randomly initialised BERT classifier over the synth tokenizer ensembled with TF-IDF, cross-fitted
  on 2 folds, once per seed. Label noise changes scores only, so the same h̃ serves both noise levels.
* Policy: a tiny randomly initialised Llama over the synth word-level tokenizer. SFT once per seed on
  every training response (the mixture); it is then the reference model (summed log-probs S_ref) and
  the starting point of every alignment run: ``dora_engine.ops.dora_loss`` with the registry's loss
  (dpo_pl, rrhf, lire; default parameters) and strategy (erm, dro, reweight, dora at λ = 1), plus the
  λ curve of dora with dpo_pl.
* Evaluation: one sampled response per evaluation prompt (the paper's decoding: temperature 0.8,
  top-k 50, top-p 0.9), judged by the oracle against the golden response (``dora_engine.eval``);
  the win rate counts ties as half. Mean ± standard deviation over seeds.

Outputs in ``--output-dir``: ``quality_results.json`` (every run), ``quality.md`` (the tables) and
``quality.png`` (bars per loss and noise level, and the λ curve).

    python benchmarks/bench_quality.py                 # the full grid (under 45 minutes on CPU)
    python benchmarks/bench_quality.py --quick         # a smoke run (under a minute)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from dora_engine.atomic import atomic_path, atomic_write
from dora_engine.data.schema import Record
from dora_engine.data.sharded import derived_seed
from dora_engine.data.synth import GOLDEN_SOURCE, build_synth_tokenizer, synth_records
from dora_engine.eval.comparison import Comparison
from dora_engine.eval.judges import OracleScorer, RewardJudge
from dora_engine.eval.winrate import golden_response, summarise
from dora_engine.generation import EVALUATION_SAMPLING, Sampling, render_prompt, sample_texts
from dora_engine.ops import dora_loss

IGNORE = -100


@dataclass(frozen=True)
class BenchConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    losses: tuple[str, ...] = ("dpo_pl", "rrhf", "lire")
    strategies: tuple[str, ...] = ("erm", "dro", "reweight", "dora")
    noises: tuple[float, ...] = (0.0, 0.4)
    lam: float = 1.0
    lam_curve: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    lam_curve_loss: str = "dpo_pl"
    train_prompts: int = 256
    golden_fraction: float = 0.5
    eval_prompts: int = 80
    k: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    sft_epochs: int = 10
    sft_lr: float = 3e-3
    sft_batch: int = 32
    align_epochs: int = 2
    align_lr: float = 1e-4
    align_batch_prompts: int = 8
    classifier_epochs: int = 6
    classifier_lr: float = 2e-3
    max_new_tokens: int = 48
    backend: str = "reference"
    decoding: Sampling = field(default_factory=lambda: replace(EVALUATION_SAMPLING, max_new_tokens=48))


QUICK = {
    "seeds": (0,), "losses": ("dpo_pl",), "strategies": ("erm", "dora"), "noises": (0.0,), "lam_curve": (1.0, 4.0),
    "train_prompts": 32, "eval_prompts": 16, "sft_epochs": 2, "align_epochs": 1, "classifier_epochs": 1,
    "max_new_tokens": 24,
}


# ---------------------------------------------------------------- data and model


def encode_response(tokenizer, prompt_text: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + eos, and labels that score only the response and eos."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def collate(tokenizer, rows: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM batch; ``labels`` are already shifted to align with ``logits[:, :-1]``."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels[:, 1:]}


def record_rows(tokenizer, record: Record) -> list[tuple[list[int], list[int]]]:
    text = render_prompt(tokenizer, record.prompt)
    return [encode_response(tokenizer, text, r.text) for r in record.responses]


def shifted_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


def tiny_llama(tokenizer, config: BenchConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=2 * config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(model_config)


def mixture(config: BenchConfig, seed: int, noise: float) -> list[Record]:
    """Training prompts: a golden_fraction with one golden response, the rest with shifted responses only."""
    with_golden = round(config.train_prompts * config.golden_fraction)
    return [
        *synth_records(with_golden, k=config.k, golden_per_prompt=1, label_noise=noise, seed=seed),
        *synth_records(config.train_prompts - with_golden, k=config.k, golden_per_prompt=0, label_noise=noise,
                       seed=seed + 10_000),
    ]


# ---------------------------------------------------------------- phases


def fit_h_tilde(records: list[Record], tokenizer, config: BenchConfig, seed: int, workdir: Path) -> list[float]:
    """Phase 1 through the calibration API: a tiny random BERT over the synth tokenizer (fine-tuned) with TF-IDF,
    cross-fitted on 2 folds (each fold's h̃ from classifiers that did not see its prompts)."""
    from transformers import BertConfig, BertModel

    from dora_engine.calibration.classifier import ClassifierSettings
    from dora_engine.calibration.pipeline import fit, score

    backbone = workdir / "bert"
    if not backbone.exists():
        torch.manual_seed(seed)
        bert = BertModel(BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        ))
        bert.save_pretrained(backbone)
        build_synth_tokenizer(backbone)  # a fresh copy: no state left by earlier use
    settings = ClassifierSettings(
        backbone=f"{backbone}+tfidf", lr=config.classifier_lr, epochs=config.classifier_epochs, batch_size=32,
        seed=seed, max_length=192, folds=2, encoder="finetune", device="cpu",
    )
    calibration = fit(records, target=GOLDEN_SOURCE, output_dir=workdir / "calibration", settings=settings,
                      min_examples=4)  # the --quick run has 16 golden responses, some prompts repeated
    return [float(r.h_tilde) for r in score(records, calibration)]


def train_sft(model, tokenizer, records: list[Record], config: BenchConfig, seed: int) -> None:
    """Next-token cross-entropy on every response of the mixture."""
    rows = [row for record in records for row in record_rows(tokenizer, record)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_lr)
    model.train()
    for _ in range(config.sft_epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), config.sft_batch):
            batch = collate(tokenizer, [rows[i] for i in order[start:start + config.sft_batch]])
            logits = shifted_logits(model, batch)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def reference_logps(model, tokenizer, records: list[Record], config: BenchConfig) -> torch.Tensor:
    """S_ref (B, K): summed log-probs of every training response under the SFT model."""
    from dora_engine.ops import sequence_logprobs

    model.eval()
    out = []
    for start in range(0, len(records), config.align_batch_prompts):
        chunk = records[start:start + config.align_batch_prompts]
        batch = collate(tokenizer, [row for r in chunk for row in record_rows(tokenizer, r)])
        S, _ = sequence_logprobs(shifted_logits(model, batch), batch["labels"], backend=config.backend)
        out.append(S.view(len(chunk), config.k))
    return torch.cat(out)


def train_alignment(
    model, tokenizer, records: list[Record], ref: torch.Tensor, h: torch.Tensor, *, loss: str, strategy: str,
    lam: float, config: BenchConfig, seed: int,
) -> None:
    """Algorithm 1, phase 2: each step is one batch of prompts under the robust objective."""
    scores = torch.tensor([[r.score for r in rec.responses] for rec in records], dtype=torch.float32)
    encoded = [record_rows(tokenizer, r) for r in records]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.align_lr)
    model.train()
    for _ in range(config.align_epochs):
        order = torch.randperm(len(records), generator=generator)
        for start in range(0, len(order), config.align_batch_prompts):
            idx = order[start:start + config.align_batch_prompts]
            batch = collate(tokenizer, [row for i in idx.tolist() for row in encoded[i]])
            out = dora_loss(
                shifted_logits(model, batch), batch["labels"], num_responses=config.k, scores=scores[idx],
                h_tilde=h[idx], ref_logps=ref[idx].flatten(), loss=loss, strategy=strategy, lam=lam,
                backend=config.backend,
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def oracle_win_rate(model, tokenizer, eval_records: list[Record], config: BenchConfig, seed: int) -> float:
    """Win rate (ties half) of sampled responses against the golden ones, judged by the oracle."""
    outputs = sample_texts(model, tokenizer, [r.prompt for r in eval_records], config.decoding,
                           [derived_seed(seed, r.id) for r in eval_records], batch_size=len(eval_records),
                           progress=False)
    comparisons = [Comparison(r.id, r.prompt_text(), texts[0], golden_response(r, GOLDEN_SOURCE))
                   for r, texts in zip(eval_records, outputs, strict=True)]
    return summarise(RewardJudge(OracleScorer()).judge(comparisons), n_boot=1).win_rate_ties_half


# ---------------------------------------------------------------- the grid


@dataclass
class RunResult:
    seed: int
    noise: float
    loss: str
    strategy: str
    lam: float
    win_rate: float
    seconds: float


def run_grid(config: BenchConfig, progress) -> tuple[list[RunResult], dict[str, float], dict[str, dict[str, float]]]:
    """Every run of the grid, the SFT win rate per seed, and the mean h̃ per seed and kind of prompt."""
    tokenizer = build_synth_tokenizer()
    results: list[RunResult] = []
    sft_rates: dict[str, float] = {}
    h_means: dict[str, dict[str, float]] = {}
    alignment_runs = [(loss, strategy, config.lam) for loss in config.losses for strategy in config.strategies]
    alignment_runs += [(config.lam_curve_loss, "dora", lam) for lam in config.lam_curve
                       if (config.lam_curve_loss, "dora", lam) not in alignment_runs]
    for seed in config.seeds:
        eval_records = synth_records(config.eval_prompts, k=2, golden_per_prompt=1, seed=seed + 20_000)
        clean = mixture(config, seed, 0.0)
        with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
            h = torch.tensor(fit_h_tilde(clean, tokenizer, config, seed, Path(tmp)), dtype=torch.float32)
        has_golden = torch.tensor([any(r.source == GOLDEN_SOURCE for r in rec.responses) for rec in clean])
        h_means[str(seed)] = {"with_golden": h[has_golden].mean().item(), "shifted_only": h[~has_golden].mean().item()}
        sft = tiny_llama(tokenizer, config, seed)
        train_sft(sft, tokenizer, clean, config, seed)
        ref = reference_logps(sft, tokenizer, clean, config)
        sft_rates[str(seed)] = oracle_win_rate(sft, tokenizer, eval_records, config, seed)
        sft_state = {k: v.clone() for k, v in sft.state_dict().items()}
        for noise in config.noises:
            records = mixture(config, seed, noise)  # same texts as ``clean``; only the scores differ
            for loss, strategy, lam in alignment_runs:
                start = time.perf_counter()
                sft.load_state_dict(sft_state)
                train_alignment(sft, tokenizer, records, ref, h, loss=loss, strategy=strategy, lam=lam,
                                config=config, seed=seed)
                rate = oracle_win_rate(sft, tokenizer, eval_records, config, seed)
                results.append(RunResult(seed, noise, loss, strategy, lam, rate, time.perf_counter() - start))
                progress(results[-1])
    return results, sft_rates, h_means


# ---------------------------------------------------------------- reporting


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _select(results: Sequence[RunResult], **match) -> list[float]:
    return [r.win_rate for r in results if all(getattr(r, k) == v for k, v in match.items())]


def markdown_tables(
    config: BenchConfig, results: Sequence[RunResult], sft_rates: dict[str, float],
    h_means: dict[str, dict[str, float]] | None = None,
) -> str:
    """The main table (loss × noise rows, strategy columns at λ = config.lam) and the λ curve."""
    lines = [
        f"Oracle win rate (%) against the golden responses, ties count half; mean ± std over seeds "
        f"{list(config.seeds)}; λ = {config.lam} for dro and dora. "
        f"SFT starting point: {_cell(list(sft_rates.values()))}.",
        *([] if not h_means else [
            "",
            "Mean h̃ over seeds: prompts with a golden response "
            f"{statistics.fmean(h['with_golden'] for h in h_means.values()):.3f}, shifted-only prompts "
            f"{statistics.fmean(h['shifted_only'] for h in h_means.values()):.3f}.",
        ]),
        "",
        "| loss | label noise | " + " | ".join(config.strategies) + " |",
        "| --- | --- | " + " | ".join("---" for _ in config.strategies) + " |",
    ]
    for loss in config.losses:
        for noise in config.noises:
            cells = [_cell(_select(results, loss=loss, noise=noise, strategy=s, lam=config.lam))
                     for s in config.strategies]
            lines.append(f"| {loss} | {100 * noise:.0f}% | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"λ curve: dora with {config.lam_curve_loss} (erm for comparison).",
        "",
        "| label noise | " + " | ".join(f"λ = {lam:g}" for lam in config.lam_curve) + " | erm |",
        "| --- | " + " | ".join("---" for _ in config.lam_curve) + " | --- |",
    ]
    for noise in config.noises:
        cells = [_cell(_select(results, loss=config.lam_curve_loss, noise=noise, strategy="dora", lam=lam))
                 for lam in config.lam_curve]
        erm = _cell(_select(results, loss=config.lam_curve_loss, noise=noise, strategy="erm", lam=config.lam))
        lines.append(f"| {100 * noise:.0f}% | " + " | ".join(cells) + f" | {erm} |")
    return "\n".join(lines) + "\n"


def plot(config: BenchConfig, results: Sequence[RunResult], sft_rates: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    groups = [(loss, noise) for loss in config.losses for noise in config.noises]
    width = 0.8 / len(config.strategies)
    for j, strategy in enumerate(config.strategies):
        stats = [mean_std(_select(results, loss=lo, noise=no, strategy=strategy, lam=config.lam) or [math.nan])
                 for lo, no in groups]
        xs = [i + (j - (len(config.strategies) - 1) / 2) * width for i in range(len(groups))]
        bars.bar(xs, [100 * m for m, _ in stats], width, yerr=[100 * s for _, s in stats], label=strategy, capsize=2)
    sft_mean, _ = mean_std(list(sft_rates.values()))
    bars.axhline(100 * sft_mean, color="grey", linestyle="--", linewidth=1, label="SFT")
    bars.set_xticks(range(len(groups)), [f"{lo}\nnoise {100 * no:.0f}%" for lo, no in groups])
    bars.set_ylabel("oracle win rate vs golden (%)")
    bars.set_ylim(bottom=0)
    bars.legend(fontsize=8)
    for noise in config.noises:
        stats = [mean_std(_select(results, loss=config.lam_curve_loss, noise=noise, strategy="dora", lam=lam)
                          or [math.nan]) for lam in config.lam_curve]
        curve.errorbar(config.lam_curve, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
                       marker="o", capsize=3, label=f"noise {100 * noise:.0f}%")
    curve.set_xscale("log", base=2)
    curve.set_xlabel("λ")
    curve.set_ylabel("oracle win rate vs golden (%)")
    curve.set_ylim(bottom=0)
    curve.set_title(f"dora + {config.lam_curve_loss}")
    curve.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one seed, dpo_pl, erm vs dora, tiny data")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2)")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON, markdown and PNG go")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for these tiny models on a shared CPU)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = BenchConfig(**QUICK) if args.quick else BenchConfig()
    config = replace(config, decoding=replace(config.decoding, max_new_tokens=config.max_new_tokens))
    if args.seeds:
        config = replace(config, seeds=tuple(args.seeds))
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    per_seed = len(config.noises) * (len(config.losses) * len(config.strategies)
                                     + len(set(config.lam_curve) - {config.lam}))
    started = time.perf_counter()
    with tqdm(total=per_seed * len(config.seeds), desc="quality runs", unit="run") as bar:
        def progress(run: RunResult) -> None:
            bar.update(1)
            name = f"{run.loss}/{run.strategy}/λ{run.lam:g}/noise{run.noise:g}"
            bar.set_postfix(last=f"{name}: {100 * run.win_rate:.1f}%")

        results, sft_rates, h_means = run_grid(config, progress)
    elapsed = time.perf_counter() - started
    out = Path(args.output_dir)
    table = markdown_tables(config, results, sft_rates, h_means)
    with atomic_write(out / "quality_results.json") as handle:
        config_dict = {**asdict(config), "decoding": asdict(config.decoding)}
        json.dump({"config": config_dict, "quick": args.quick, "seconds": elapsed, "sft_win_rate": sft_rates,
                   "mean_h_tilde": h_means,
                   "runs": [asdict(r) for r in results]}, handle, indent=1)
    with atomic_write(out / "quality.md") as handle:
        handle.write(table)
    plot(config, results, sft_rates, out / "quality.png")
    print(table)
    print(f"{len(results)} runs in {elapsed:.0f} s; wrote {out}/quality_results.json, quality.md, quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
