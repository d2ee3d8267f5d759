"""Training smoke test: ``dora-engine train`` for a few steps on one device, against a CPU run of the same config.

    python benchmarks/train_smoke.py --device cuda --work /tmp/smoke [--steps 3] [--summary smoke.json]
    python benchmarks/train_smoke.py --device cpu --work /tmp/smoke            # the same checks without a GPU

What runs, each as its own ``python -m dora_engine.cli train`` process (the product's command):

1. data and model: ``dora-engine data synth`` (with its word-level tokenizer; every record gets an h̃), a tiny
   Llama from ``launch/make_tiny_model.py``;
2. ``dora-engine ref-logps`` on the device: the reference log-probs, cached for every run below;
3. DoRA alignment (``dpo_pl`` loss, ``robust.strategy: dora``) under ZeRO-3 (``launch/zero3.json``) for
   ``--steps`` optimizer steps, once per variant: ``train.loss_path`` fused_linear and logits, each with
   ``train.backend`` auto and fused; on cuda in bf16, on cpu in fp32. Every variant must reuse the cached
   reference log-probs;
4. checkpoint + resume: the first variant saves a checkpoint at its last step; ``--resume auto`` with one more
   step must resume there and write exactly that one step;
5. the oracle: the same config on the CPU (``CUDA_VISIBLE_DEVICES=``), fp32, ``backend: reference`` (the
   pure-PyTorch loss) and ``loss_path: logits``, for ``--steps`` + 1 steps. It runs beside the device runs.

Each variant's per-step ``loss``, ``logps/chosen`` and ``logps/rejected`` (metrics.jsonl), and the resumed
step's, must match the oracle's within ``|a - b| <= atol + rtol·|b|``: rtol 0.03, atol 0.05 for bf16 (bf16
keeps 8 significant bits, 0.4% per rounding; a sequence's log-prob (about -150 here) sums ~50 token terms
computed through two bf16 layers, and three optimizer steps from bf16 gradients add to the difference, so
a correct run lands within about 1-2%; one optimizer step moves the log-probs by 10-15, and a wrong kernel,
label shift, reduction or a lost update moves them by that much or more), 1e-3 / 1e-4 for fp32 (summation
orders only; a CPU run here agrees to 1e-6). The bf16 tolerance is an estimate until a GPU run measures it:
the summary keeps every figure. The oracle is fp32, not bf16 on the CPU: a CPU bf16 run rounds in
other places than the GPU one (its matmuls accumulate differently), so it would be no closer to the GPU's
figures, only a second approximation; fp32 is the figure both approximate. The reference backend keeps the
oracle independent of the op under test and needs no second build of the op for the CPU.

The verdict (and every check) goes to ``--summary`` (JSON) and stdout; exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (train.loss_path, train.backend)
    "fused_linear-auto": ("fused_linear", "auto"),
    "fused_linear-fused": ("fused_linear", "fused"),
    "logits-auto": ("logits", "auto"),
    "logits-fused": ("logits", "fused"),
}
COMPARED = ("loss", "logps/chosen", "logps/rejected")
TOLERANCE = {"bf16": (0.03, 0.05), "fp32": (1e-3, 1e-4)}  # precision: (rtol, atol)
CPU_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` from the checkout with its output in ``log``; a failure raises with the log's tail."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.call(cmd, cwd=ROOT, env=full_env, stdout=handle, stderr=subprocess.STDOUT)
    print(f"  {log.stem}: exit {code} in {time.monotonic() - start:.0f} s", flush=True)
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed (exit {code}); {log}:\n{tail}")


def prepare(work: Path) -> tuple[Path, Path]:
    """The tiny Llama and the training records (synth, each record with an h̃ in 0.5..1.5)."""
    model, data = work / "model", work / "train.jsonl"
    if (model / "config.json").is_file() and data.is_file():
        return model, data
    synth = work / "synth.jsonl"
    run([sys.executable, "-m", "dora_engine.cli", "data", "synth", "--out", str(synth), "--num-prompts", "24",
         "--k", "3", "--golden-fraction", "1.0", "--split", "train", "--seed", "0",
         "--tokenizer-dir", str(work / "tokenizer")], work / "logs" / "synth.log", CPU_ENV)
    run([sys.executable, "launch/make_tiny_model.py", "--kind", "llama", "--tokenizer", str(work / "tokenizer"),
         "--out", str(model), "--hidden", "64", "--layers", "2"], work / "logs" / "model.log", CPU_ENV)
    rows = [json.loads(line) for line in synth.read_text(encoding="utf-8").splitlines()]
    data.write_text("".join(json.dumps({**row, "h_tilde": 0.5 + 0.5 * (i % 3)}) + "\n" for i, row in enumerate(rows)),
                    encoding="utf-8")
    return model, data


def write_config(path: Path, work: Path, model: Path, data: Path, *, output_dir: Path, precision: str, backend: str,
                 loss_path: str, steps: int, checkpoint_every: int) -> Path:
    config = {
        "stage": "align",
        "model": {"path": str(model)},
        "data": {"train": [str(data)], "target_source": "golden", "max_prompt_tokens": 32, "max_response_tokens": 48,
                 "cache_dir": str(work / "tokenised"), "ref_cache_dir": str(work / f"ref_cache_{precision}")},
        "loss": {"name": "dpo_pl"},
        "robust": {"strategy": "dora", "lam": 1.0},
        "train": {"micro_batch_prompts": 4, "grad_accum_steps": 1, "lr": 0.01, "schedule": "constant",
                  "warmup_steps": 0, "max_steps": steps, "seed": 0, "precision": precision, "backend": backend,
                  "loss_path": loss_path, "gradient_checkpointing": False},
        "deepspeed": str(ROOT / "launch" / "zero3.json"),
        "logging": {"every": 1, "tensorboard": "off"},
        "checkpoint": {"every": checkpoint_every, "keep": 1, "export": False},
        "output_dir": str(output_dir),
    }
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def metrics(output_dir: Path) -> dict[int, dict[str, Any]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {row["step"]: row for row in rows}


def mismatches(name: str, rows: dict[int, dict[str, Any]], oracle: dict[int, dict[str, Any]], steps: list[int],
               rtol: float, atol: float) -> list[str]:
    """Every compared figure of ``rows`` outside the tolerance of the oracle's, or missing."""
    found = []
    for step in steps:
        for key in COMPARED:
            got, want = rows.get(step, {}).get(key), oracle.get(step, {}).get(key)
            if got is None or want is None:
                found.append(f"{name} step {step} {key}: missing (run {got}, oracle {want})")
            elif not abs(got - want) <= atol + rtol * abs(want):
                found.append(f"{name} step {step} {key}: {got:.6g} vs oracle {want:.6g} "
                             f"(|diff| {abs(got - want):.3g} > {atol + rtol * abs(want):.3g})")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder for the data, model, runs and logs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--jobs", type=int, default=None,
                        help="variants run at once (default: all on cuda, 1 on cpu); the oracle runs beside them")
    parser.add_argument("--summary", type=Path, default=None, help="write the checks and figures here (JSON)")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    precision = "bf16" if args.device == "cuda" else "fp32"
    rtol, atol = TOLERANCE[precision]
    device_env = {} if args.device == "cuda" else CPU_ENV
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    train = [sys.executable, "-m", "dora_engine.cli", "train"]
    start = time.monotonic()
    checks: list[str] = []
    failures: list[str] = []
    figures: dict[str, dict[int, dict[str, Any]]] = {}

    def config_for(name: str, steps: int, every: int, **overrides: str) -> Path:
        loss_path, backend = VARIANTS.get(name, ("logits", "reference"))
        settings = {"precision": precision, "backend": backend, "loss_path": loss_path, **overrides}
        return write_config(work / f"{name}.yaml", work, model, data, output_dir=work / "runs" / name,
                            steps=steps, checkpoint_every=every, **settings)

    def log_of(name: str) -> str:
        return (work / "logs" / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    print(f"train_smoke: {args.device}, {precision}, {args.steps} steps, variants {names}; work {work}", flush=True)
    try:
        model, data = prepare(work)
        oracle_config = config_for("oracle", args.steps + 1, 0, precision="fp32")
        first = config_for(names[0], args.steps, args.steps)
        run([*train[:-1], "ref-logps", "--config", str(first)], work / "logs" / "ref_logps.log", device_env)
    except RuntimeError as err:
        print(f"train_smoke: FAILED before training: {err}")
        if args.summary:
            args.summary.write_text(json.dumps({"device": args.device, "verdict": "FAILED",
                                                "failures": [f"setup: {err}"]}, indent=1) + "\n", encoding="utf-8")
        return 1
    jobs = args.jobs or (len(names) if args.device == "cuda" else 1)
    with ThreadPoolExecutor(max_workers=jobs + 1) as pool:
        oracle_run = pool.submit(run, [*train, "--config", str(oracle_config)], work / "logs" / "oracle.log", CPU_ENV)
        with ThreadPoolExecutor(max_workers=jobs) as variants:
            done = {name: variants.submit(run, [*train, "--config", str(config_for(name, args.steps, args.steps))],
                                          work / "logs" / f"{name}.log", device_env) for name in names}
            for name, future in done.items():
                try:
                    future.result()
                except RuntimeError as err:
                    failures.append(f"{name}: {err}")
        if not any(f.startswith(names[0] + ":") for f in failures):
            try:
                run([*train, "--config", str(first), "--resume", "auto", f"train.max_steps={args.steps + 1}"],
                    work / "logs" / "resume.log", device_env)
            except RuntimeError as err:
                failures.append(f"resume: {err}")
        try:
            oracle_run.result()
        except RuntimeError as err:
            failures.append(f"oracle: {err}")

    steps = list(range(1, args.steps + 1))
    oracle = metrics(work / "runs" / "oracle") if not any(f.startswith("oracle:") for f in failures) else {}
    figures["oracle"] = oracle
    for name in names:
        if any(f.startswith(name + ":") for f in failures):
            continue
        rows = figures[name] = metrics(work / "runs" / name)
        if "reference log-probs: reusing" in log_of(name):
            checks.append(f"{name}: reused the cached reference log-probs")
        else:
            failures.append(f"{name}: did not reuse the cached reference log-probs (logs/{name}.log)")
        if [step for step in sorted(rows) if step <= args.steps] != steps:  # the resumed step follows in names[0]
            failures.append(f"{name}: metrics.jsonl has steps {sorted(rows)}, expected {steps}")
        if oracle:
            found = mismatches(name, rows, oracle, steps, rtol, atol)
            failures += found
            if not found:
                checks.append(f"{name}: {', '.join(COMPARED)} at steps {steps} within rtol {rtol}, atol {atol} "
                              "of the CPU fp32 oracle")
    if not any(f.startswith(("resume:", names[0] + ":")) for f in failures):
        resumed_step = args.steps + 1
        rows = figures["resumed"] = metrics(work / "runs" / names[0])
        if f"at step {args.steps}" not in log_of("resume") or "resumed from" not in log_of("resume"):
            failures.append(f"resume: the log does not say it resumed at step {args.steps} (logs/resume.log)")
        elif sorted(rows) != [*steps, resumed_step]:
            failures.append(f"resume: metrics.jsonl has steps {sorted(rows)}, expected {[*steps, resumed_step]}")
        else:
            checks.append(f"resume: continued from the step-{args.steps} checkpoint for one step")
            if oracle:
                found = mismatches("resumed", rows, oracle, [resumed_step], rtol, atol)
                failures += found
                if not found:
                    checks.append(f"resume: step {resumed_step} within tolerance of the oracle's uninterrupted run")

    verdict = "ok" if not failures else "FAILED"
    for line in checks:
        print(f"  ok  {line}")
    for line in failures:
        print(f"  FAIL {line}")
    print(f"train_smoke: {verdict} in {time.monotonic() - start:.0f} s")
    if args.summary:
        summary = {"device": args.device, "precision": precision, "steps": args.steps, "variants": names,
                   "rtol": rtol, "atol": atol, "verdict": verdict, "checks": checks, "failures": failures,
                   "figures": {name: {str(step): {key: row.get(key) for key in COMPARED} for step, row in rows.items()}
                               for name, rows in figures.items()}}
        args.summary.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
