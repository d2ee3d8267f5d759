"""The final table of ``dora-engine iterate`` (docs/design.md section 10): strategy × iteration.

For each policy (the start policy, iteration 0, and each chain's policy after round r) and metric m (the
reward of its response to a held-out prompt; its win points against the golden response: 1, ½ on a tie,
0), the mean over the n held-out prompts with its percentile-bootstrap 95% interval over prompts
(``eval.paired.bootstrap_mean``); for each strategy s other than ``erm``, the paired difference
s − erm per iteration, d_i = m(s, x_i) − m(erm, x_i), with its interval from resampling the prompts
(``eval.paired.paired_interval``): every policy answers the same prompts with the same sampling seeds.
Written as ``results.md``, ``results.json`` and ``iterate.png`` (mean reward by iteration per strategy, with
intervals) in the run's folder, each atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dora_engine.atomic import atomic_path, atomic_write
from dora_engine.eval.paired import Interval, bootstrap_mean, paired_interval

if TYPE_CHECKING:
    from dora_engine.iterate.config import IterateConfig

BASELINE = "erm"
METRICS = (("reward", "rewards", "Mean reward", 1.0, 3), ("win_rate", "win_points",
                                                         "Win rate against the golden responses, ties half (%)",
                                                         100.0, 1))
RESULTS_MD, RESULTS_JSON, PLOT = "results.md", "results.json", "iterate.png"


@dataclass(frozen=True)
class Evaluation:
    """A policy's per-prompt reward and win points against the golden responses on the held-out prompts, and
    the content hash of the evaluation step that produced them."""

    name: str
    rewards: list[float]
    win_points: list[float]
    digest: str


def summarise(cfg: IterateConfig, start: Evaluation, history: dict[str, Sequence[Evaluation]]) -> dict[str, Any]:
    """Means with intervals per strategy and iteration (0: the start policy) and the paired differences
    s − erm per iteration (module docstring), as JSON-ready values."""
    n_boot, seed = cfg.evaluate.n_boot, cfg.seed
    out: dict[str, Any] = {"name": cfg.run_name, "judge": cfg.evaluate.reward, "prompts": len(start.rewards),
                           "iterations": list(range(len(next(iter(history.values()), [])) + 1))}
    for metric, attribute, *_ in METRICS:
        out[metric] = {s: [bootstrap_mean(getattr(e, attribute), n_boot=n_boot, seed=seed).to_dict()
                           for e in (start, *evaluations)] for s, evaluations in history.items()}
        if BASELINE in history:
            out[f"{metric}_differences"] = {
                f"{s} − {BASELINE}": [
                    paired_interval(getattr(b, attribute), getattr(e, attribute), n_boot=n_boot, seed=seed).to_dict()
                    for b, e in zip(history[BASELINE], evaluations, strict=True)]
                for s, evaluations in history.items() if s != BASELINE}
    return out


def mean_cell(interval: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean [lo, hi]`` of an ``Interval``'s dict, times ``scale``, without signs (``Interval.format`` signs
    differences)."""
    mean, lo, hi = (scale * interval[k] for k in ("mean", "lo", "hi"))
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(results: dict[str, Any]) -> str:
    """The tables: one per metric, rows the strategies and their paired differences, columns the iterations."""
    iterations = results["iterations"]
    lines = [
        f"Run {results['name']}: one sampled response per held-out prompt ({results['prompts']} prompts), judged "
        f"by {results['judge']}; mean with a 95% percentile-bootstrap interval over prompts. Differences are paired "
        "by prompt (every policy answers the same prompts with the same sampling seeds; **bold**: the interval "
        "excludes zero). Iteration 0 is the start policy, shared by every chain.",
    ]
    for metric, _, title, scale, digits in METRICS:
        lines += ["", f"### {title}", "",
                  "| strategy | " + " | ".join(f"iteration {i}" if i else "start" for i in iterations) + " |",
                  "| --- | " + " | ".join("---" for _ in iterations) + " |"]
        for strategy, cells in results[metric].items():
            lines.append(f"| {strategy} | " + " | ".join(mean_cell(c, scale, digits) for c in cells) + " |")
        for label, cells in results.get(f"{metric}_differences", {}).items():
            texts = []
            for c in cells:
                interval = Interval(**c)
                text = interval.format(scale, digits)
                texts.append(f"**{text}**" if interval.excludes_zero() else text)
            lines.append(f"| {label} (paired) | – | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Mean reward by iteration per strategy, with its interval; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    strategies = list(results["reward"])
    for j, strategy in enumerate(strategies):
        cells = results["reward"][strategy]
        offset = (j - (len(strategies) - 1) / 2) * 0.06
        xs = [i + offset for i in results["iterations"]]
        means = [c["mean"] for c in cells]
        errors = [[c["mean"] - c["lo"] for c in cells], [c["hi"] - c["mean"] for c in cells]]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=strategy)
    ax.set_xticks(results["iterations"], ["start" if i == 0 else str(i) for i in results["iterations"]])
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"mean reward ({results['judge']})")
    ax.set_title(f"{results['name']}: {results['prompts']} held-out prompts, 95% intervals", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_results(cfg: IterateConfig, start: Evaluation, history: dict[str, Sequence[Evaluation]]) -> dict[str, Any]:
    """``summarise``, then ``results.md``, ``results.json`` and ``iterate.png`` in the run's folder; returns
    the results with their markdown under ``"table"``."""
    results = summarise(cfg, start, history)
    root = Path(cfg.output_dir)
    table = markdown(results)
    with atomic_write(root / RESULTS_JSON) as handle:
        json.dump(results, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    with atomic_write(root / RESULTS_MD) as handle:
        handle.write(table)
    plot(results, root / PLOT)
    return {**results, "table": table}
