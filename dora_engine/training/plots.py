"""Training curves: ``<output_dir>/metrics.png`` from ``metrics.jsonl`` (written at the end of a run)."""

from __future__ import annotations

import json
from pathlib import Path

from dora_engine.atomic import atomic_path

PANELS = (
    ("loss", "eval/loss"),
    ("rewards/margins", "eval/rewards/margins"),
    ("rewards/accuracies", "eval/rewards/accuracies"),
    ("robust/ess", "robust/weight_max"),
    ("lr",),
    ("grad_norm",),
)


def plot_metrics(metrics_file: Path, destination: Path) -> Path | None:
    """One panel per metric group that the run logged; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                series.setdefault(key, []).append((record["step"], value))
    panels = [[k for k in group if k in series] for group in PANELS]
    panels = [p for p in panels if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, keys in zip(axes[0], panels, strict=True):
        for key in keys:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(keys[0])
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(destination) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return destination
