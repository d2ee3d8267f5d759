"""Calibration on real data: held-out quality of the phase-1 classifiers (docs/design.md section 4).

- AlpacaEval: target gpt4_1106_preview against Mistral-7B-Instruct-v0.3, Meta-Llama-3-8B-Instruct and
  alpaca-7b, one binary classifier per source (the per_source scheme's classifier, trained on the two
  sources' responses; split by prompt): held-out ROC-AUC per source, next to a bag-of-words
  logistic-regression baseline on the same split; the correlation between c(model response) and the
  GPT-4-turbo judge's preference for the model response (judge files exist for alpaca-7b).
- HH-RLHF harmless test: pairwise chosen (target) vs rejected, on a subset.

Writes the section "Calibration on real data" of benchmarks/RESULTS.md (other sections are kept) and
the raw figures as JSON in the work folder. Classifiers are cached in the work folder: a rerun with the
same settings only scores.

    python benchmarks/calibration_report.py [--max-length 128 --epochs 1 --hh-limit 600]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dora_engine.atomic import atomic_write
from dora_engine.calibration import ClassifierSettings, fit, score
from dora_engine.calibration.pipeline import PROBS_META_KEY, split_by_prompt
from dora_engine.data.converters import convert_files, read_rows
from dora_engine.data.schema import Record

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Calibration on real data"
TARGET = "gpt4_1106_preview"
OTHERS = ("Mistral-7B-Instruct-v0.3", "Meta-Llama-3-8B-Instruct", "alpaca-7b")


def bag_of_words_auc(train: list[Record], held: list[Record], target: str, other: str, seed: int) -> float:
    """Held-out ROC-AUC of TF-IDF (1-2 grams) logistic regression on response text, target vs ``other``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    def pairs(records):
        rows = [
            (r.text, int(r.source == target)) for rec in records for r in rec.responses if r.source in (target, other)
        ]
        return [t for t, _ in rows], np.array([y for _, y in rows])

    (x_train, y_train), (x_held, y_held) = pairs(train), pairs(held)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    model = LogisticRegression(max_iter=2000, C=4.0, random_state=seed)
    model.fit(vectorizer.fit_transform(x_train), y_train)
    return float(roc_auc_score(y_held, model.predict_proba(vectorizer.transform(x_held))[:, 1]))


def pair_result(records: list[Record], target: str, other: str, settings: ClassifierSettings, work: Path) -> dict:
    """Fit target vs ``other`` on the prompts' two responses from these sources; held-out metrics + baseline."""
    pair = [replace(r, responses=[x for x in r.responses if x.source in (target, other)]) for r in records]
    start = time.time()
    calibration = fit(pair, target=target, output_dir=work / other, settings=settings)
    fit_s = time.time() - start
    (fitted,) = calibration.classifiers.values()
    train, held = split_by_prompt(pair, settings.held_out, settings.seed)
    out = {
        "classifier": fitted.spec.name,
        "prompts": len(pair),
        "fit_seconds": 0.0 if fitted.reused else fit_s,
        "train_counts": fitted.train_counts,
        "held_out_counts": fitted.held_out_counts,
        "gamma": calibration.gamma(other),
        "bow_auc": bag_of_words_auc(train, held, target, other, settings.seed),
        **{k: fitted.metrics[k] for k in ("accuracy", "roc_auc", "ece")},
    }
    judge = DATA / "alpaca_eval" / f"judge-{other}-vs-{TARGET}.jsonl.gz"
    if target == TARGET and judge.is_file():
        out["judge"] = judge_correlation(score(held, calibration), judge, other)
    return out


def judge_correlation(scored: list[Record], path: Path, generator: str) -> dict:
    """Pearson/Spearman of c(generator's response) with the judge's preference for it (preference − 1)."""
    from scipy.stats import pearsonr, spearmanr

    preference = {row["instruction"]: float(row["preference"]) - 1.0 for row in read_rows(path)}
    c, p = [], []
    for rec in scored:
        if rec.prompt in preference:
            k = next(k for k, r in enumerate(rec.responses) if r.source == generator)
            c.append(rec.meta[PROBS_META_KEY][k])
            p.append(preference[rec.prompt])
    return {
        "n": len(c),
        "pearson": float(pearsonr(c, p)[0]),
        "spearman": float(spearmanr(c, p)[0]),
        "mean_judge_preference": float(np.mean(p)),
    }


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores"


def markdown(results: dict, settings: ClassifierSettings, command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        "",
        f"Backbone `{settings.backbone}` ({settings.pooling} pooling), max_length {settings.max_length}, "
        f"{settings.epochs} epoch(s), "
        f"batch {settings.batch_size}, lr {settings.lr}, held-out {settings.held_out:.0%} of prompts "
        f"(split by prompt, seed {settings.seed}), {_hardware()}. One binary classifier per pair (the "
        "per_source classifier of that source). Bag-of-words baseline: TF-IDF 1-2 grams + logistic regression "
        "on the response text, same split.",
        "",
        "| data | target vs source | train (label 0 / 1) | held-out responses | accuracy | ROC-AUC | ECE "
        "| BoW ROC-AUC | fit (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data, row in results.items():
        lines.append(
            f"| {data.split('/')[0]} | {row['classifier']} | {row['train_counts'][0]} / {row['train_counts'][1]} | "
            f"{sum(row['held_out_counts'])} | {_fmt(row['accuracy'])} | {_fmt(row['roc_auc'])} | "
            f"{_fmt(row['ece'])} | {_fmt(row['bow_auc'])} | {row['fit_seconds'] / 60:.1f} |"
        )
    beaten = [row["classifier"] for row in results.values() if (row["roc_auc"] or 0) > row["bow_auc"]]
    lines += [
        "",
        f"The transformer classifier beats the bag-of-words baseline on {len(beaten)} of {len(results)} pairs "
        "in this setting (the paper's setting is 512 tokens, 3 epochs, lr 2e-5).",
        "",
    ]
    for row in results.values():
        if "judge" in row:
            j = row["judge"]
            lines.append(
                f"Judge agreement ({row['classifier']}, held-out prompts, n = {j['n']}): correlation of "
                f"c(model response) with the GPT-4-turbo judge's preference for the model response (preference − 1, "
                f"mean {j['mean_judge_preference']:.3f}): Pearson {j['pearson']:.3f}, Spearman {j['spearman']:.3f}."
            )
    lines.append("")
    return "\n".join(lines)


def write_section(text: str, results_path: Path) -> None:
    """Replace (or append) this script's section of RESULTS.md, keeping every other section."""
    old = results_path.read_text(encoding="utf-8") if results_path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = text.rstrip("\n") + "\n"
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with atomic_write(results_path) as handle:
        handle.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="/tmp/dora-calibration-report")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--pooling", default="mean")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="above the paper's 2e-5: one short epoch on CPU")
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--hh-limit", type=int, default=600, help="first N HH-RLHF pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these jobs, e.g. alpaca/alpaca-7b hh/rejected"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file whose section is rewritten")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real data not found at {DATA}")
    settings = ClassifierSettings(
        backbone=args.backbone,
        pooling=args.pooling,
        lr=args.lr,
        max_length=args.max_length,
        epochs=args.epochs,
        batch_size=args.batch_size,
        held_out=args.held_out,
        seed=args.seed,
        device=args.device,
    )
    work = Path(args.work_dir)
    command = (
        f"python benchmarks/calibration_report.py --pooling {args.pooling} --max-length {args.max_length} "
        f"--epochs {args.epochs} "
        f"--batch-size {args.batch_size} --lr {args.lr} --held-out {args.held_out} --hh-limit {args.hh_limit}"
    )
    alpaca = convert_files(
        "alpaca", [DATA / "alpaca_eval" / f"outputs-{g}.jsonl.gz" for g in (TARGET, *OTHERS)], target=TARGET
    )
    hh = convert_files("hh", [DATA / "hh-rlhf-harmless-base-test.jsonl.gz"])[: args.hh_limit]
    jobs = [(f"alpaca/{other}", alpaca, TARGET, other) for other in OTHERS] + [
        ("hh/rejected", hh, "chosen", "rejected")
    ]
    if args.only is not None:
        jobs = [job for job in jobs if job[0] in args.only]
    results = {}
    for name, records, target, other in jobs:
        results[name] = pair_result(records, target, other, settings, work / name.split("/")[0])
        with atomic_write(work / "calibration_report.json") as handle:
            json.dump(results, handle, indent=1)
        write_section(markdown(results, settings, command), args.results)
        print(json.dumps(results[name], indent=1), flush=True)


if __name__ == "__main__":
    main()
