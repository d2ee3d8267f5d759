"""Calibration on real data: cross-fitted quality of the phase-1 classifiers (docs/design.md section 4.5).

Four pairs, one binary classifier each (the per_source scheme's classifier of that source):
AlpacaEval target gpt4_1106_preview against Mistral-7B-Instruct-v0.3, Meta-Llama-3-8B-Instruct and
alpaca-7b (805 prompts, one response per generator), and HH-RLHF harmless test chosen (target) against
rejected (the first ``--hh-limit`` pairs). Every option is cross-fitted with the same folds (``--folds``,
``--seed``): its out-of-fold (OOF) ROC-AUC is held-out quality over every prompt, its in-fold ROC-AUC the
same classifiers on responses they trained on. Options (``OPTIONS``): the default (``ClassifierSettings()``:
MiniLM features + TF-IDF), each of its members alone, the fine-tuned MiniLM and its ensemble with TF-IDF.
For each ensemble the script also scores the plain equal-weight average of the members' log-odds (no
combiner), to show what the cross-fitted combiner adds.

The judge agreement comes from the default option's calibration with ``--judge-file`` for the pairs that
have GPT-4-turbo annotations (alpaca-7b). Wall times: the default option is fitted first, in a work folder
of its own, and timed from start to end (fit, score, report); every other option's time is the sum of its
classifiers' own training-and-prediction times. The targets are printed at the end.

Writes the section "Calibration on real data" of benchmarks/RESULTS.md (the text below the table, from
"Notes", is kept) and the raw figures as JSON in the work folder. Classifiers are cached in the work folder:
a rerun only scores.

    python benchmarks/calibration_report.py [--options default tfidf minilm] [--only alpaca/alpaca-7b]
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
from dora_engine.calibration import features as feature_cache
from dora_engine.calibration.pipeline import PREDICTIONS, apply_combiner
from dora_engine.calibration.report import write_report
from dora_engine.data.converters import convert_files
from dora_engine.data.schema import Record

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Calibration on real data"
NOTES = "### Notes"
TARGET = "gpt4_1106_preview"
OTHERS = ("Mistral-7B-Instruct-v0.3", "Meta-Llama-3-8B-Instruct", "alpaca-7b")
FINETUNE = {"backbone": "minilm", "encoder": "finetune", "lr": 1e-4, "epochs": 1, "max_length": 256}
OPTIONS = {
    "default": {},
    "tfidf": {"backbone": "tfidf"},
    "minilm": {"backbone": "minilm"},
    "minilm-ft": FINETUNE,
    "minilm-ft+tfidf": {**FINETUNE, "backbone": "minilm+tfidf"},
}
TARGETS = {"Mistral-7B-Instruct-v0.3": 0.90, "Meta-Llama-3-8B-Instruct": 0.95}


def pair_records(records: list[Record], target: str, other: str) -> list[Record]:
    return [replace(r, responses=[x for x in r.responses if x.source in (target, other)]) for r in records]


def averaged_auc(fitted) -> float | None:
    """OOF ROC-AUC of an ensemble whose members' log-odds are averaged with equal weights and no calibration
    (what the combiner replaces); ``None`` for a single backbone."""
    from sklearn.metrics import roc_auc_score

    if len(fitted.folds[0].paths) < 2:
        return None
    scores, labels = [], []
    for fold in fitted.folds:
        members = []
        for path in fold.paths:
            with np.load(Path(path, PREDICTIONS)) as saved:
                members.append(saved["held_probs"])
                y = saved["held_labels"]
        scores.append(apply_combiner(None, members)[:, 1])
        labels.append(y)
    return float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))


def run_option(name: str, records: list[Record], target: str, other: str, settings: ClassifierSettings,
               work: Path, judge: Path | None) -> dict:
    """Fit (classifiers cached in ``work``, shared by the options), score and report (in ``work/name``)."""
    start = time.perf_counter()
    calibration = fit(records, target=target, output_dir=work, settings=settings)
    scored = score(records, calibration)
    report = write_report(calibration, scored, work / name, judge_file=judge)
    wall = time.perf_counter() - start
    (fitted,) = calibration.classifiers.values()
    out = {
        "option": name,
        "backbone": settings.backbone,
        "encoder": settings.encoder,
        "classifier": fitted.spec.name,
        "prompts": len(records),
        "class_counts": fitted.class_counts,
        "oof": {k: fitted.metrics[k] for k in ("accuracy", "roc_auc", "ece")},
        "in_fold": {k: fitted.in_fold[k] for k in ("accuracy", "roc_auc", "ece")},
        "members": {b: m["roc_auc"] for b, m in fitted.member_metrics.items()},
        "averaged_roc_auc": averaged_auc(fitted),
        "classifier_seconds": sum(f.seconds for f in fitted.folds),
        "wall_seconds": wall,
        "reused": fitted.reused,
        "mean_h_tilde": report["h_tilde"]["mean"],
    }
    if "judge" in report:
        out["judge"] = report["judge"]["sources"]
    return out


def _pair_name(pair: str) -> str:
    return "HH chosen vs rejected" if pair.startswith("hh/") else f"{TARGET} vs {pair.split('/')[-1]}"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores"


def targets(results: dict) -> list[str]:
    lines = []
    for other, goal in TARGETS.items():
        rows = results.get(f"alpaca/{other}", {})
        if rows:
            best = max(rows.values(), key=lambda r: r["oof"]["roc_auc"] or 0)
            ok = (best["oof"]["roc_auc"] or 0) >= goal
            lines.append(f"- best option on {other}: `{best['option']}` OOF ROC-AUC {_fmt(best['oof']['roc_auc'])} "
                         f"(target >= {goal:.2f}: {'met' if ok else 'not met'})")
    pairs = [rows for rows in results.values() if "default" in rows and "tfidf" in rows]
    above = sum(rows["default"]["oof"]["roc_auc"] > rows["tfidf"]["oof"]["roc_auc"] for rows in pairs)
    lines.append(f"- default above TF-IDF alone on {above} of {len(pairs)} pairs (target: at least 3 of 4)")
    timed = [rows["default"]["wall_seconds"] for rows in results.values() if "default" in rows]
    if timed:
        total = sum(timed) / 60
        lines.append(f"- default option, all {len(timed)} pairs: {total:.1f} min wall time "
                     f"(target: under 30 min on 2 cores: {'met' if total < 30 else 'not met'})")
    return lines


def markdown(results: dict, args: argparse.Namespace, command: str) -> str:
    default = ClassifierSettings()
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_hardware()}. {args.folds}-fold cross-fitting by prompt (seed {args.seed}); one binary "
        "classifier per pair. OOF: each response scored by the fold's classifier that did not train on its prompt "
        "(the c that h̃ uses); in fold: the same classifiers on a sample of up to 256 responses each that they "
        f"trained on. Default option: backbone `{default.backbone}` with `encoder={default.encoder}` (MiniLM "
        f"layer features, {default.max_length} tokens, + `tfidf`: TF-IDF word 1-2 and char 2-5 grams, opening and "
        "closing words, length and markdown counts; docs/design.md section 4.5). `minilm-ft`: the MiniLM "
        "fine-tuned (mean pooling, lr 1e-4, 1 epoch, 256 tokens). Every option's c goes "
        "through its cross-fitted combiner (Platt scaling; for ensembles also the members' weights); equal "
        "average: the members' raw log-odds averaged instead. Time: the default's "
        "wall time (fit, score, report, from scratch); the others' classifier training-and-prediction time (the "
        "default's members are the `tfidf` and `minilm` options' classifiers, trained once).",
        "",
        "| pair | option | OOF ROC-AUC | in-fold ROC-AUC | OOF ECE | in-fold ECE | OOF accuracy | members (OOF AUC) "
        "| equal average | time (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pair, rows in results.items():
        for name in OPTIONS:
            if name not in rows:
                continue
            r = rows[name]
            members = ", ".join(f"{b} {_fmt(v)}" for b, v in r["members"].items()) or "–"
            seconds = r["wall_seconds"] if name == "default" else r["classifier_seconds"]
            lines.append(
                f"| {_pair_name(pair)} | {name} | {_fmt(r['oof']['roc_auc'])} | {_fmt(r['in_fold']['roc_auc'])} | "
                f"{_fmt(r['oof']['ece'])} | {_fmt(r['in_fold']['ece'])} | {_fmt(r['oof']['accuracy'])} | {members} | "
                f"{_fmt(r['averaged_roc_auc'])} | {seconds / 60:.1f} |"
            )
    lines += ["", "Targets:", "", *targets(results), ""]
    for pair, rows in results.items():
        judge = rows.get("default", {}).get("judge")
        if judge:
            parts = "; ".join(f"{s} ρ = {_fmt(v['spearman'])} (n = {v['n']}, mean preference "
                              f"{v['mean_preference']:.3f})" for s, v in judge.items())
            lines.append(f"Judge agreement ({_pair_name(pair)} pair, default option, OOF c against the "
                         f"GPT-4-turbo judge's preference for each response, Spearman within each source): {parts}.")
    lines.append("")
    return "\n".join(lines)


def write_section(text: str, results_path: Path) -> None:
    """Replace this script's part of the section (up to its "Notes"), keeping the notes and other sections."""
    old = results_path.read_text(encoding="utf-8") if results_path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^{re.escape(NOTES)}\n|^## |\Z)", re.S | re.M)
    text = text.rstrip("\n") + "\n"
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with atomic_write(results_path) as handle:
        handle.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="/tmp/dora-calibration-report")
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--folds", type=int, default=ClassifierSettings().folds)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hh-limit", type=int, default=600, help="first N HH-RLHF pairs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", nargs="*", default=None, help="only these pairs, e.g. alpaca/alpaca-7b hh/rejected")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the Markdown file whose section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print only; leave --results alone")
    parser.add_argument("--report-only", action="store_true",
                        help="fit nothing: write the section from the figures saved in the work folder")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"real data not found at {DATA}")
    work = Path(args.work_dir)
    command = (f"python benchmarks/calibration_report.py --folds {args.folds} --seed {args.seed} "
               f"--hh-limit {args.hh_limit}")
    alpaca = convert_files(
        "alpaca", [DATA / "alpaca_eval" / f"outputs-{g}.jsonl.gz" for g in (TARGET, *OTHERS)], target=TARGET
    )
    hh = convert_files("hh", [DATA / "hh-rlhf-harmless-base-test.jsonl.gz"])[: args.hh_limit]
    saved = work / "calibration_report.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    if args.report_only:
        text = markdown(results, args, command)
        print(text)
        if not args.no_write:
            write_section(text, args.results)
        return
    jobs = [(f"alpaca/{other}", pair_records(alpaca, TARGET, other), TARGET, other) for other in OTHERS]
    jobs.append(("hh/rejected", hh, "chosen", "rejected"))
    if args.only is not None:
        jobs = [job for job in jobs if job[0] in args.only]
    for pair, records, target, other in jobs:
        judge = DATA / "alpaca_eval" / f"judge-{other}-vs-{TARGET}.jsonl.gz"
        rows = results.setdefault(pair, {})
        for name in [o for o in OPTIONS if o in args.options]:
            settings = ClassifierSettings(**{**OPTIONS[name], "folds": args.folds, "seed": args.seed,
                                             "device": args.device})
            feature_cache._CACHE.clear()  # each option pays for its own features
            row = run_option(name, records, target, other, settings, work / pair,
                             judge if name == "default" and judge.is_file() else None)
            if row["reused"] and name in rows:  # timings of a rerun from the cache say nothing: keep the first
                row["wall_seconds"] = rows[name]["wall_seconds"]
            rows[name] = row
            with atomic_write(saved) as handle:
                json.dump(results, handle, indent=1)
            print(json.dumps(row), flush=True)
    text = markdown(results, args, command)
    print(text)
    if not args.no_write:
        write_section(text, args.results)


if __name__ == "__main__":
    main()
