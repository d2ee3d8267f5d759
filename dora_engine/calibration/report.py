"""The calibration report: classifier quality, γ, counts and the h̃ distribution (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dora_engine.atomic import atomic_path, atomic_write
from dora_engine.calibration.pipeline import PROBS_META_KEY, Calibration
from dora_engine.data.schema import Record

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def build_report(calibration: Calibration, scored: list[Record]) -> dict[str, Any]:
    """A JSON-ready summary of a calibration and of the dataset it scored."""
    h = np.array([r.h_tilde for r in scored], dtype=np.float64)
    per_source: dict[str, list[float]] = defaultdict(list)
    for record in scored:
        for response, c in zip(record.responses, record.meta[PROBS_META_KEY], strict=True):
            per_source[response.source].append(c)
    return {
        "target": calibration.target,
        "scheme": calibration.scheme,
        "settings": asdict(calibration.settings),
        "held_out_prompts": len(calibration.held_out_ids),
        "classifiers": [
            {
                "name": name,
                "classes": [list(members) for members in fitted.spec.classes],
                "train_counts": fitted.train_counts,
                "held_out_counts": fitted.held_out_counts,
                "source_counts": fitted.source_counts,
                "reused": fitted.reused,
                "path": fitted.path,
                **fitted.metrics,
            }
            for name, fitted in calibration.classifiers.items()
        ],
        "sources": {
            source: {
                "classifier": calibration.rules[source].classifier,
                "gamma": calibration.gamma(source),
                "responses": len(values),
                "mean_c": float(np.mean(values)),
            }
            for source, values in sorted(per_source.items())
        },
        "h_tilde": {
            "prompts": len(h),
            "mean": float(h.mean()),
            "quantiles": {f"q{round(q * 100):02d}": float(np.quantile(h, q)) for q in QUANTILES},
        },
    }


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Calibration report: target `{report['target']}`, scheme `{report['scheme']}`",
        "",
        f"{report['held_out_prompts']} held-out prompts (split by prompt). Metrics are on held-out responses; "
        "AUC and ECE are for P(target) (target vs the classifier's other classes).",
        "",
        "| classifier | train counts | held-out counts | accuracy | ROC-AUC | ECE | reused |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report["classifiers"]:
        lines.append(
            f"| {c['name']} | {c['train_counts']} | {c['held_out_counts']} | {_fmt(c['accuracy'])} | "
            f"{_fmt(c['roc_auc'])} | {_fmt(c['ece'])} | {'yes' if c['reused'] else 'no'} |"
        )
    lines += ["", "| source | classifier | γ | responses | mean c |", "| --- | --- | --- | --- | --- |"]
    for source, s in report["sources"].items():
        lines.append(f"| {source} | {s['classifier']} | {s['gamma']:.3f} | {s['responses']} | {s['mean_c']:.3f} |")
    h = report["h_tilde"]
    lines += [
        "",
        f"h̃ over {h['prompts']} prompts: mean {h['mean']:.3f}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in h["quantiles"].items()),
        "",
    ]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], h_values: np.ndarray, path: str | os.PathLike) -> None:
    """PNG: the h̃ histogram and a reliability diagram of every classifier (held-out P(target))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, reliability) = plt.subplots(1, 2, figsize=(11, 4.2))
    hist.hist(h_values, bins=40, color="tab:blue", alpha=0.8)
    hist.set_xlabel("h̃")
    hist.set_ylabel("prompts")
    hist.set_title("h̃ distribution")
    reliability.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for c in report["classifiers"]:
        bins = c["reliability"]
        if bins:
            reliability.plot(
                [b["mean_prob"] for b in bins],
                [b["frequency"] for b in bins],
                marker="o",
                label=f"{c['name']} (ECE {_fmt(c['ece'])})",
            )
    reliability.set_xlabel("predicted P(target)")
    reliability.set_ylabel("observed frequency of target")
    reliability.set_title("reliability (held-out)")
    reliability.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(calibration: Calibration, scored: list[Record], folder: str | os.PathLike) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``folder``; returns the report."""
    folder = Path(folder)
    report = build_report(calibration, scored)
    with atomic_write(folder / "report.json") as handle:
        json.dump(report, handle, indent=1, ensure_ascii=False)
    with atomic_write(folder / "report.md") as handle:
        handle.write(report_markdown(report))
    plot_report(report, np.array([r.h_tilde for r in scored]), folder / "report.png")
    return report
