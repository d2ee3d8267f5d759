"""Calibration on real data: held-out quality of the phase-1 classifiers (DESIGN.md section 4).

- AlpacaEval: target gpt4_1106_preview against Mistral-7B-Instruct-v0.3, Meta-Llama-3-8B-Instruct and
  alpaca-7b (scheme per_source, split by prompt): held-out ROC-AUC per source, next to a bag-of-words
  logistic-regression baseline on the same split; the correlation between c(model response) and the
  GPT-4-turbo judge's preference for the model response (judge files exist for alpaca-7b).
- HH-RLHF harmless test: pairwise chosen (target) vs rejected, on a subset.

Writes the section "Calibration on real data" of benchmarks/RESULTS.md (other sections are kept) and
the raw figures as JSON in the work folder. Classifiers are cached in the work folder: a rerun with the
same settings only scores.

    python benchmarks/calibration_report.py [--max-length 256 --epochs 1 --hh-limit 1000]
"""

from __future__ import annotations

import argparse
import json
import re
import time
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


def classifier_rows(calibration, records: list[Record], settings: ClassifierSettings) -> list[dict]:
    train, held = split_by_prompt(records, settings.held_out, settings.seed)
    rows = []
    for name, fitted in calibration.classifiers.items():
        others = [s for members in fitted.spec.classes[:-1] for s in members]
        bow = bag_of_words_auc(train, held, calibration.target, others[0], settings.seed) if len(others) == 1 else None
        rows.append(
            {
                "classifier": name,
                "train_counts": fitted.train_counts,
                "held_out_counts": fitted.held_out_counts,
                "gamma": fitted.train_counts[0] / fitted.train_counts[1],
                "bow_auc": bow,
                **{k: fitted.metrics[k] for k in ("accuracy", "roc_auc", "ece")},
            }
        )
    return rows


def judge_correlation(scored: list[Record], held_ids: set[str], generator: str) -> dict | None:
    """Pearson/Spearman of c(generator's response) with the judge's preference for it (preference − 1)."""
    from scipy.stats import pearsonr, spearmanr

    path = DATA / "alpaca_eval" / f"judge-{generator}-vs-{TARGET}.jsonl.gz"
    if not path.is_file():
        return None
    preference = {row["instruction"]: float(row["preference"]) - 1.0 for row in read_rows(path)}
    out = {}
    for subset in ("held_out", "all"):
        c, p = [], []
        for rec in scored:
            if (subset == "all" or rec.id in held_ids) and rec.prompt in preference:
                k = next(k for k, r in enumerate(rec.responses) if r.source == generator)
                c.append(rec.meta[PROBS_META_KEY][k])
                p.append(preference[rec.prompt])
        out[subset] = {
            "n": len(c),
            "pearson": float(pearsonr(c, p)[0]),
            "spearman": float(spearmanr(c, p)[0]),
            "mean_judge_preference": float(np.mean(p)),
        }
    return out


def alpaca(settings: ClassifierSettings, work: Path) -> dict:
    files = [DATA / "alpaca_eval" / f"outputs-{g}.jsonl.gz" for g in (TARGET, *OTHERS)]
    records = convert_files("alpaca", files, target=TARGET)
    start = time.time()
    calibration = fit(records, target=TARGET, output_dir=work / "alpaca", settings=settings)
    fit_s = time.time() - start
    scored = score(records, calibration)
    h = np.array([r.h_tilde for r in scored])
    return {
        "prompts": len(records),
        "fit_seconds": fit_s,
        "classifiers": classifier_rows(calibration, records, settings),
        "judge_alpaca-7b": judge_correlation(scored, set(calibration.held_out_ids), "alpaca-7b"),
        "h_tilde_quantiles": {q: float(np.quantile(h, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
    }


def hh(settings: ClassifierSettings, work: Path, limit: int) -> dict:
    records = convert_files("hh", [DATA / "hh-rlhf-harmless-base-test.jsonl.gz"])[:limit]
    start = time.time()
    calibration = fit(records, target="chosen", output_dir=work / "hh", settings=settings)
    return {
        "prompts": len(records),
        "fit_seconds": time.time() - start,
        "classifiers": classifier_rows(calibration, records, settings),
    }


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def markdown(results: dict, settings: ClassifierSettings, command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        "",
        f"Backbone `{settings.backbone}`, max_length {settings.max_length}, {settings.epochs} epoch(s), "
        f"batch {settings.batch_size}, lr {settings.lr}, held-out {settings.held_out:.0%} of prompts "
        f"(split by prompt, seed {settings.seed}), CPU. Bag-of-words: TF-IDF 1-2 grams + logistic "
        "regression on the response text, same split.",
        "",
    ]
    for name, block in (
        ("AlpacaEval (target gpt4_1106_preview)", results["alpaca"]),
        ("HH-RLHF harmless test (target chosen vs rejected)", results["hh"]),
    ):
        lines += [
            f"**{name}**: {block['prompts']} prompts, fit {block['fit_seconds'] / 60:.1f} min "
            "(0 when the classifiers were reused).",
            "",
            "| classifier | train (label 0 / 1) | held-out | γ | accuracy | ROC-AUC | ECE | BoW ROC-AUC |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in block["classifiers"]:
            lines.append(
                f"| {row['classifier']} | {row['train_counts'][0]} / {row['train_counts'][1]} | "
                f"{sum(row['held_out_counts'])} | {row['gamma']:.2f} | {_fmt(row['accuracy'])} | "
                f"{_fmt(row['roc_auc'])} | {_fmt(row['ece'])} | {_fmt(row['bow_auc'])} |"
            )
        lines.append("")
    judge = results["alpaca"]["judge_alpaca-7b"]
    if judge:
        lines += [
            "**Judge agreement** (alpaca-7b vs gpt4_1106_preview, GPT-4-turbo preference for alpaca-7b "
            "minus 1 against c(alpaca-7b response)):",
            "",
        ]
        for subset, j in judge.items():
            lines.append(
                f"- {subset.replace('_', '-')} prompts (n = {j['n']}): Pearson {j['pearson']:.3f}, "
                f"Spearman {j['spearman']:.3f} (mean judge preference {j['mean_judge_preference']:.3f})"
            )
        lines.append("")
    q = results["alpaca"]["h_tilde_quantiles"]
    lines += [
        "AlpacaEval h̃ quantiles (n = 4 responses, h̃ ∈ (0, 4)): "
        + ", ".join(f"q{int(k * 100)} {v:.3f}" for k, v in q.items()),
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, results_path: Path) -> None:
    """Replace (or append) this script's section of RESULTS.md, keeping every other section."""
    old = results_path.read_text(encoding="utf-8") if results_path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    with atomic_write(results_path) as handle:
        handle.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="/tmp/dora-calibration-report")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--hh-limit", type=int, default=1000, help="first N HH-RLHF pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file whose section is rewritten")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real data not found at {DATA}")
    settings = ClassifierSettings(
        backbone=args.backbone,
        max_length=args.max_length,
        epochs=args.epochs,
        batch_size=args.batch_size,
        held_out=args.held_out,
        seed=args.seed,
        device=args.device,
    )
    work = Path(args.work_dir)
    results = {"alpaca": alpaca(settings, work), "hh": hh(settings, work, args.hh_limit)}
    with atomic_write(work / "calibration_report.json") as handle:
        json.dump(results, handle, indent=1)
    command = (
        f"python benchmarks/calibration_report.py --max-length {args.max_length} --epochs {args.epochs} "
        f"--batch-size {args.batch_size} --held-out {args.held_out} --hh-limit {args.hh_limit}"
    )
    write_section(markdown(results, settings, command), args.results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
