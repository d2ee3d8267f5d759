"""Iterative self-training benchmark: does DoRA's gain over ERM hold, grow or fade over rounds of self-training?

Every seed runs ``dora-engine iterate``'s protocol (docs/design.md section 10) through its Python front door,
``dora_engine.iterate.pipeline.run_iterate``, in a process of its own: the embedded default
``launch/configs/iterate_synth.yaml`` with the seed as ``seed`` and ``data.synth_seed`` (its training data,
held-out prompts, tiny start model, sampling, calibration folds and bootstrap), ``BENCH`` sizes below, and
the ``--set`` overrides. Within a seed: one SFT start; ERM and DoRA as separate chains from it (each
generates from its own policy; round 1's generation from the start policy is shared); per round, each
chain's mean oracle reward of one sampled response per held-out prompt and its win rate against the golden
responses (ties half), the same sampling seeds for every policy.

Report, per iteration (0: the start policy): each strategy's mean over seeds with a percentile-bootstrap 95%
interval over seeds (``dora_engine.eval.paired.bootstrap_mean``), and the paired difference dora − erm per
seed with its mean and bootstrap interval over seeds (``paired_interval``); a per-seed table of the
differences; a plot of dora − erm by iteration. The settings are fixed on the tuning seeds
(``--tuning-seeds``, written to ``iterate_tuning.*``) before the reported seeds (``--seeds``, default
10-19, ``iterate_bench.*``) are run.

    python benchmarks/bench_iterate.py --jobs 2                           # seeds 10-19
    python benchmarks/bench_iterate.py --tuning-seeds 100 101 102 --set align.lr=2e-4 --jobs 2
    python benchmarks/bench_iterate.py --quick                            # a smoke run (one seed, tiny sizes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_pool import run_seeds  # noqa: E402 (a benchmarks module beside this one)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "launch" / "configs" / "iterate_synth.yaml"
SEEDS = tuple(range(10, 20))  # 0-9 hold the embedded default's own seed
TUNING_SEEDS = tuple(range(100, 105))
METRICS = (("reward", "Mean oracle reward of the held-out generations (primary)", 1.0, 3),
           ("win_rate", "Win rate against the golden responses, ties half (%)", 100.0, 1))

# Per seed: the embedded default as it is (about 3 minutes of one core: 10 seeds in about 15 minutes with 2
# processes on 2 idle cores), one torch thread per process.
BENCH = ("threads=1",)
QUICK = ("threads=1", "rounds=2", "data.synth_prompts=32", "data.synth_eval_prompts=24", "start.sft_epochs=4",
         "generate.max_new_tokens=16", "evaluate.max_new_tokens=16", "calibrate.folds=2", "calibrate.min_examples=2",
         "align.epochs=1", "evaluate.n_boot=200")


def seed_overrides(seed: int, output_dir: Path, base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The iterate config's overrides of one seed's run (later ones win)."""
    return [*base, *extra, f"seed={seed}", f"data.synth_seed={seed}", f"name=seed{seed}", f"output_dir={output_dir}"]


def run_seed(seed: int, overrides: list[str], log: Path) -> dict[str, Any]:
    """One seed's iterate run, its progress lines in ``log``; the per-iteration means of each strategy."""
    from dora_engine.iterate.config import load_iterate_config
    from dora_engine.iterate.pipeline import run_iterate
    from dora_engine.training.process_group import close_distributed
    from dora_engine.training.signals import StopSignals

    started = time.perf_counter()
    cfg = load_iterate_config(DEFAULT_CONFIG, overrides)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        try:
            results = run_iterate(cfg, resume=True, stop=StopSignals())
        finally:
            close_distributed()  # the next seed of this process makes a new group
    return {"seed": seed, "seconds": time.perf_counter() - started, "prompts": results["prompts"],
            **{metric: {s: [cell["mean"] for cell in cells] for s, cells in results[metric].items()}
               for metric, *_ in METRICS}}


def _worker(task: tuple[int, list[str], str]) -> dict[str, Any]:
    from dora_engine.iterate.pipeline import Stopped

    seed, overrides, log = task
    try:
        return run_seed(seed, overrides, Path(log))
    except Stopped:
        if multiprocessing.parent_process() is None:
            raise
        # a pool worker stopped by the pool's terminate (its parent is stopping): what it did is saved for a
        # rerun with --work-dir; it must end, not go back for another task the parent would wait on
        os._exit(128 + signal.SIGTERM)


# ---------------------------------------------------------------- reporting


def summarise(seeds: list[dict[str, Any]], strategies: Sequence[str], n_boot: int = 2000) -> dict[str, Any]:
    """Per metric, strategy and iteration: the mean over seeds with its bootstrap interval; per iteration, the
    paired difference dora − erm over seeds (when both ran)."""
    from dora_engine.eval.paired import bootstrap_mean, paired_interval

    iterations = range(len(seeds[0]["reward"][strategies[0]]))
    out: dict[str, Any] = {"seeds": [s["seed"] for s in seeds], "iterations": list(iterations)}
    for metric, *_ in METRICS:
        out[metric] = {st: [bootstrap_mean([s[metric][st][i] for s in seeds], n_boot=n_boot).to_dict()
                            for i in iterations] for st in strategies}
        if {"erm", "dora"} <= set(strategies):
            out[f"{metric}_dora_minus_erm"] = [
                paired_interval([s[metric]["erm"][i] for s in seeds], [s[metric]["dora"][i] for s in seeds],
                                n_boot=n_boot).to_dict() for i in iterations]
    return out


def markdown(summary: dict[str, Any], seeds: list[dict[str, Any]], label: str) -> str:
    from dora_engine.eval.paired import Interval
    from dora_engine.iterate.report import mean_cell

    header = "| strategy | " + " | ".join(f"iteration {i}" if i else "start" for i in summary["iterations"]) + " |"
    rule = "| --- | " + " | ".join("---" for _ in summary["iterations"]) + " |"
    lines = [f"{label} seeds {summary['seeds']}: per seed, one iterate run ({seeds[0]['prompts']} held-out prompts); "
             "mean over seeds with a 95% percentile-bootstrap interval over seeds, and the paired difference "
             "dora − erm per seed, its mean and interval (**bold**: the interval excludes zero)."]
    for metric, title, scale, digits in METRICS:
        lines += ["", f"### {title}", "", header, rule]
        for strategy, cells in summary[metric].items():
            lines.append(f"| {strategy} | " + " | ".join(mean_cell(c, scale, digits) for c in cells) + " |")
        if f"{metric}_dora_minus_erm" in summary:
            texts = []
            for i, c in enumerate(summary[f"{metric}_dora_minus_erm"]):
                interval = Interval(**c)
                text = interval.format(scale, digits)
                if i == 0:
                    text = "–"  # the shared start
                elif interval.n < 2:
                    text = f"{scale * interval.mean:+.{digits}f}"  # one seed: no interval to speak of
                elif interval.excludes_zero():
                    text = f"**{text}**"
                texts.append(text)
            lines.append("| dora − erm (paired) | " + " | ".join(texts) + " |")
    if "reward_dora_minus_erm" in summary:
        lines += ["", "### dora − erm per seed (mean oracle reward)", "",
                  "| iteration | " + " | ".join(str(s["seed"]) for s in seeds) + " |",
                  "| --- | " + " | ".join("---" for _ in seeds) + " |"]
        for i in summary["iterations"][1:]:
            lines.append(f"| {i} | " + " | ".join(f"{s['reward']['dora'][i] - s['reward']['erm'][i]:+.3f}"
                                                  for s in seeds) + " |")
    seconds = [s["seconds"] for s in seeds]
    lines += ["", f"Time per seed: {statistics.fmean(seconds):.0f} s on average ({min(seconds):.0f}-"
                  f"{max(seconds):.0f} s)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Left: each strategy's mean reward by iteration; right: dora − erm by iteration; with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dora_engine.atomic import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = summary["iterations"]
    for strategy, cells in summary["reward"].items():
        axes[0].errorbar(xs, [c["mean"] for c in cells], capsize=3, marker="o", label=strategy,
                         yerr=[[c["mean"] - c["lo"] for c in cells], [c["hi"] - c["mean"] for c in cells]])
    axes[0].set_ylabel("mean oracle reward")
    axes[0].legend(fontsize=8)
    if "reward_dora_minus_erm" in summary:
        cells = summary["reward_dora_minus_erm"][1:]
        axes[1].errorbar(xs[1:], [c["mean"] for c in cells], capsize=3, marker="o",
                         yerr=[[c["mean"] - c["lo"] for c in cells], [c["hi"] - c["mean"] for c in cells]])
        axes[1].axhline(0, color="grey", linewidth=1)
    axes[1].set_ylabel("dora − erm (paired over seeds)")
    for ax in axes:
        ax.set_xticks(xs, ["start" if i == 0 else str(i) for i in xs])
        ax.set_xlabel("iteration")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seeds", type=int, nargs="+", help=f"the reported seeds (default {SEEDS[0]}-{SEEDS[-1]})")
    which.add_argument("--tuning-seeds", type=int, nargs="*", metavar="SEED",
                       help="run tuning seeds instead (default, given without values: "
                            f"{TUNING_SEEDS[0]}-{TUNING_SEEDS[-1]}); written to iterate_tuning.*")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one seed (0 unless given), tiny sizes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the iterate config (launch/README.md), e.g. --set align.lr=2e-4")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (default 1)")
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON, markdown and PNG go")
    parser.add_argument("--work-dir", help="keep every seed's run folder (and its log) here, and resume the runs "
                                           "found there (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from dora_engine.atomic import atomic_write
    from dora_engine.iterate.config import load_iterate_config

    args = parse_args(argv)
    tuning = args.tuning_seeds is not None
    seeds = args.seeds or args.tuning_seeds or (TUNING_SEEDS if tuning else (0,) if args.quick else SEEDS)
    base = QUICK if args.quick else BENCH
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_iterate_") as tmp:
        work = Path(args.work_dir or tmp)
        tasks = [(seed, seed_overrides(seed, work / f"seed{seed}", base, args.set), str(work / f"seed{seed}.log"))
                 for seed in seeds]
        cfg = load_iterate_config(DEFAULT_CONFIG, tasks[0][1])  # a bad --set is one line before any work
        started = time.perf_counter()
        results = run_seeds(_worker, tasks, args.jobs, lambda result: f"seed {result['seed']}: "
                            f"{result['seconds']:.0f} s")
    results.sort(key=lambda s: s["seed"])
    elapsed = time.perf_counter() - started
    summary = summarise(results, cfg.strategies)
    label = "Tuning" if tuning else "Quick" if args.quick else "Reported"
    table = markdown(summary, results, label)
    out = Path(args.output_dir)
    stem = "iterate_tuning" if tuning else "iterate_quick" if args.quick else "iterate_bench"
    with atomic_write(out / f"{stem}.json") as handle:
        json.dump({"config": cfg.to_dict(), "overrides": [*base, *args.set], "seconds": elapsed, "jobs": args.jobs,
                   "summary": summary, "seeds": results}, handle, indent=1)
    with atomic_write(out / f"{stem}.md") as handle:
        handle.write(table)
    plot(summary, out / f"{stem}.png")
    print(table)
    print(f"{len(results)} seeds in {elapsed:.0f} s; wrote {out}/{stem}.json, {stem}.md, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
