"""The calibration report (JSON, Markdown, PNG): classifier quality out of fold and in fold, γ, counts, the
h̃ distribution overall and by source, its mean overall (the divisor of ``robust.h_scale: dataset`` for the
scored file) and on prompts with / without a target response, reliability, and optionally the agreement of c with
a judge.

Out of fold: every response scored by the fold's classifier that did not train on its prompt (the c that
h̃ uses). In fold: the same classifiers on a sample of the responses they trained on, i.e. what c would
look like without cross-fitting. By source: each response's term of h̃ (h̃ is the mean of its prompt's
terms, term_k = w_k^τ / (w_k^τ / n + β_k) ∈ (0, n) with w_k = γ_k c_k / (1 − c_k); n·c_k when γ = 1, β = 1/n
and τ = 1).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dora_engine.atomic import atomic_path, atomic_write
from dora_engine.calibration.pipeline import FOLD_META_KEY, PROBS_META_KEY, Calibration, slot_betas
from dora_engine.data.schema import Record
from dora_engine.data.summary import mean_h_tilde_by_target
from dora_engine.data.weights import CALIBRATION_RATIO_POWER, h_tilde_terms

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def response_terms(
    calibration: Calibration, scored: list[Record], beta: str = "uniform", ratio_power: float = CALIBRATION_RATIO_POWER
) -> dict[str, np.ndarray]:
    """Each response's term of h̃, grouped by source (``scored`` from ``score`` with the same ``beta`` and
    ``ratio_power``)."""
    out: dict[str, list[float]] = defaultdict(list)
    for record in scored:
        fold = record.meta.get(FOLD_META_KEY)
        gamma = [calibration.gamma(r.source, fold) for r in record.responses]
        terms = h_tilde_terms(record.meta[PROBS_META_KEY], gamma, slot_betas(record, beta), ratio_power)
        for response, term in zip(record.responses, terms, strict=True):
            out[response.source].append(float(term))
    return {source: np.array(values) for source, values in sorted(out.items())}


def build_report(
    calibration: Calibration,
    scored: list[Record],
    *,
    beta: str = "uniform",
    ratio_power: float = CALIBRATION_RATIO_POWER,
    judge: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary of a calibration and of the dataset it scored."""
    h = np.array([r.h_tilde for r in scored], dtype=np.float64)
    per_source: dict[str, list[float]] = defaultdict(list)
    for record in scored:
        for response, c in zip(record.responses, record.meta[PROBS_META_KEY], strict=True):
            per_source[response.source].append(c)
    terms = response_terms(calibration, scored, beta, ratio_power)
    in_training = sum(r.meta.get(FOLD_META_KEY) is not None for r in scored)
    report = {
        "target": calibration.target,
        "scheme": calibration.scheme,
        "settings": asdict(calibration.settings),
        "folds": calibration.settings.folds,
        "training_prompts": len(calibration.folds),
        "scored_out_of_fold": in_training,
        "scored_by_all_folds": len(scored) - in_training,
        "classifiers": [
            {
                "name": name,
                "classes": [list(members) for members in fitted.spec.classes],
                "class_counts": fitted.class_counts,
                "source_counts": fitted.source_counts,
                "reused": fitted.reused,
                "paths": [path for fold in fitted.folds for path in fold.paths],
                **fitted.metrics,
                "in_fold": {k: v for k, v in fitted.in_fold.items() if k != "reliability"},
                "in_fold_reliability": fitted.in_fold.get("reliability", []),
                "folds": [
                    {"fold": f.fold, "train_counts": f.train_counts, "held_out_counts": f.held_out_counts,
                     "roc_auc": f.metrics["roc_auc"], "in_fold_roc_auc": f.in_fold["roc_auc"], "reused": f.reused}
                    for f in fitted.folds
                ],
                "members": fitted.member_metrics,
            }
            for name, fitted in calibration.classifiers.items()
        ],
        "sources": {
            source: {
                "classifier": calibration.rules[source].classifier,
                "gamma": calibration.gamma(source),
                "responses": len(values),
                "mean_c": float(np.mean(values)),
                "h_tilde_term": {"mean": float(terms[source].mean()), "quantiles": _quantiles(terms[source])},
            }
            for source, values in sorted(per_source.items())
        },
        # mean: what robust.h_scale `dataset` divides h̃ by when training on the scored file
        "h_tilde": {"beta": beta, "ratio_power": ratio_power, "prompts": len(h), "mean": float(h.mean()),
                    "quantiles": _quantiles(h),
                    "by_target": {group: {"prompts": n, "mean": mean if n else None} for group, (mean, n)
                                  in mean_h_tilde_by_target(scored, calibration.target).items()}},
    }
    if judge is not None:
        report["judge"] = judge
    return report


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def report_markdown(report: dict[str, Any]) -> str:
    from dora_engine.calibration.judge import judge_sentence

    k = report["folds"]
    lines = [
        f"# Calibration report: target `{report['target']}`, scheme `{report['scheme']}`, "
        f"backbone `{report['settings']['backbone']}`",
        "",
        f"Cross-fitted: the training data's {report['training_prompts']} distinct prompts are split into {k} "
        "folds and each "
        f"fold's responses are scored by classifiers trained on the other {k - 1}. Out-of-fold (OOF) metrics are "
        "on those scores, the c that h̃ uses; in-fold metrics score the same classifiers on responses they "
        "trained on, which is what c would be without cross-fitting. AUC and ECE are for P(target).",
        "",
        "| classifier | responses per class | OOF accuracy | OOF ROC-AUC | OOF ECE | in-fold ROC-AUC | in-fold ECE "
        "| reused |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report["classifiers"]:
        lines.append(
            f"| {c['name']} | {c['class_counts']} | {_fmt(c['accuracy'])} | {_fmt(c['roc_auc'])} | "
            f"{_fmt(c['ece'])} | {_fmt(c['in_fold']['roc_auc'])} | {_fmt(c['in_fold']['ece'])} | "
            f"{'yes' if c['reused'] else 'no'} |"
        )
    for c in report["classifiers"]:
        if c["members"]:
            alone = ", ".join(f"{b} {_fmt(m['roc_auc'])}" for b, m in c["members"].items())
            lines.append(f"\n{c['name']}: each member alone, OOF ROC-AUC {alone}; together {_fmt(c['roc_auc'])}.")
    lines += [
        "",
        "| source | classifier | γ | responses | mean c | mean h̃ term | term q05 / q50 / q95 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for source, s in report["sources"].items():
        q = s["h_tilde_term"]["quantiles"]
        lines.append(
            f"| {source} | {s['classifier']} | {s['gamma']:.3f} | {s['responses']} | {s['mean_c']:.3f} | "
            f"{s['h_tilde_term']['mean']:.3f} | {q['q05']:.3f} / {q['q50']:.3f} / {q['q95']:.3f} |"
        )
    h = report["h_tilde"]
    scored = f"{report['scored_out_of_fold']} prompt(s) scored out of fold"
    if report["scored_by_all_folds"]:
        scored += f", {report['scored_by_all_folds']} outside the training data by the mean of all folds"
    groups = "; ".join(f"{group.split('_')[0]} a `{report['target']}` response: {_fmt(g['mean'])} "
                       f"({g['prompts']} prompts)" for group, g in h["by_target"].items())
    lines += [
        "",
        f"h̃ (β {h['beta']}, ratio power τ = {h['ratio_power']:g}) over {h['prompts']} prompts ({scored}): "
        f"mean {h['mean']:.3f}; "
        + ", ".join(f"{key} {v:.3f}" for key, v in h["quantiles"].items()),
        "",
        f"Mean h̃ {h['mean']:.4g}: what `robust.h_scale: dataset` divides h̃ by when training on this file "
        f"(docs/design.md section 4.3). Mean h̃ {groups}.",
        "",
    ]
    if "judge" in report:
        lines += [judge_sentence(report["judge"]), ""]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], h_values: np.ndarray, terms: dict[str, np.ndarray],
                path: str | os.PathLike) -> None:
    """PNG: the h̃ histogram, the h̃ terms by source, and the OOF reliability diagram of every classifier
    (in fold dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, by_source, reliability) = plt.subplots(1, 3, figsize=(16, 4.6))
    hist.hist(h_values, bins=40, color="tab:blue", alpha=0.8)
    hist.set_xlabel("h̃")
    hist.set_ylabel("prompts")
    hist.set_title("h̃ distribution")
    high = max((float(v.max()) for v in terms.values()), default=1.0)
    edges = np.linspace(0.0, max(high, 1e-9), 41)
    for source, values in terms.items():
        by_source.hist(values, bins=edges, histtype="step", linewidth=1.5, label=f"{source} (n = {len(values)})")
    by_source.set_xlabel("term of h̃ (n·c when γ = 1, β = 1/n)")
    by_source.set_ylabel("responses")
    by_source.set_title("h̃ terms by source")
    by_source.legend(fontsize=7)
    reliability.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for index, c in enumerate(report["classifiers"]):
        color = f"C{index % 10}"
        for bins, style, label in ((c["reliability"], "-", f"{c['name']} OOF (ECE {_fmt(c['ece'])})"),
                                   (c["in_fold_reliability"], ":", "in fold")):
            if bins:
                reliability.plot([b["mean_prob"] for b in bins], [b["frequency"] for b in bins], marker="o",
                                 markersize=3, linestyle=style, color=color, label=label)
    reliability.set_xlabel("predicted P(target)")
    reliability.set_ylabel("observed frequency of target")
    reliability.set_title("reliability (out of fold; in fold dotted)")
    reliability.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(
    calibration: Calibration,
    scored: list[Record],
    folder: str | os.PathLike,
    *,
    beta: str = "uniform",
    ratio_power: float = CALIBRATION_RATIO_POWER,
    judge_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``folder``; returns the report.

    ``judge_file``: AlpacaEval-style preference annotations of the scored responses (``judge``).
    """
    from dora_engine.calibration.judge import judge_correlation

    folder = Path(folder)
    judge = None if judge_file is None else judge_correlation(scored, judge_file)
    report = build_report(calibration, scored, beta=beta, ratio_power=ratio_power, judge=judge)
    with atomic_write(folder / "report.json") as handle:
        json.dump(report, handle, indent=1, ensure_ascii=False)
    with atomic_write(folder / "report.md") as handle:
        handle.write(report_markdown(report))
    terms = response_terms(calibration, scored, beta, ratio_power)
    plot_report(report, np.array([r.h_tilde for r in scored]), terms, folder / "report.png")
    return report
