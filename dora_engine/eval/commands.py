"""``dora-engine eval generate | winrate | calibration | compare`` (docs/design.md section 6)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dora_engine.atomic import atomic_write
from dora_engine.eval.comparison import Judge
from dora_engine.generation import add_backend_arguments
from dora_engine.hf_loading import add_trust_remote_code_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluation: generate, win rates, calibration diagnostic")
    commands = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    _register_generate(commands)
    _register_winrate(commands)
    _register_calibration(commands)
    _register_compare(commands)


def _register_generate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="responses of a trained model to held-out prompts")
    p.add_argument("--model", required=True, help="the model: a local folder or hub id")
    p.add_argument("--data", required=True, help="records (JSONL, docs/design.md section 3) whose prompts to answer")
    p.add_argument("--output", required=True, help="generations JSONL: {id, instruction, output, generator} per line")
    p.add_argument("--alpaca-eval", metavar="PATH", help="also write AlpacaEval's model_outputs.json here")
    p.add_argument("--generator",
                   help="the generator name in the outputs (default: the model folder's name; for a training "
                        "run's export RUN/final, the run folder's name RUN; a hub id's last part)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="0 disables top-k (default: 50)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="answer only the first N prompts")
    p.add_argument("--device", help="cuda, cpu, … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    add_backend_arguments(p)
    add_trust_remote_code_argument(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dora_engine.data.schema import read_records
    from dora_engine.eval.generate import generate_records, write_generations, write_model_outputs
    from dora_engine.generation import EVALUATION_SAMPLING, vllm_options

    sampling = replace(EVALUATION_SAMPLING, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens)
    records = read_records(args.data)[: args.limit]
    generations = generate_records(
        records, args.model, generator=args.generator, backend=args.backend, sampling=sampling, seed=args.seed,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, vllm=vllm_options(args),
        trust_remote_code=args.trust_remote_code,
    )
    write_generations(args.output, generations)
    if args.alpaca_eval:
        write_model_outputs(args.alpaca_eval, generations)
    print(f"wrote {len(generations)} generations to {args.output}")
    return 0


def _register_winrate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("winrate", help="win / lose / tie rates against the golden responses")
    p.add_argument("--generations", required=True, help="generations JSONL, or an AlpacaEval model_outputs.json")
    p.add_argument("--data", required=True, help="records holding the golden responses (joined by id or prompt)")
    p.add_argument("--target-source", default="golden", help="the golden source's name (default: golden)")
    p.add_argument("--judge", default="oracle", help="oracle | reward-model:PATH | openai:MODEL (default: oracle)")
    p.add_argument("--judge-template", choices=("helpful", "harmless"), default="helpful",
                   help="prompt of the openai judge (default: helpful)")
    p.add_argument("--cache-dir", help="openai judge answer cache (default: judge_cache beside --output, else ./)")
    p.add_argument("--workers", type=int, default=4, help="parallel requests of the openai judge")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="openai judge: stop the whole run after this long (default: no limit; answers are cached)")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="openai judge: time one request may take in all, however slowly the reply comes (default: 120)")
    p.add_argument("--max-consecutive-failures", type=int, default=8, metavar="N",
                   help="openai judge: stop after N failed requests in a row (default: 8)")
    p.add_argument("--tie-tolerance", type=float, default=0.0, help="reward judges: |Δr| at most this is a tie")
    p.add_argument("--batch-size", type=int, default=8, help="reward-model batch size")
    p.add_argument("--device", help="reward-model device (default: cuda when available)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="seeds the A/B order swap and the bootstrap")
    p.add_argument("--output", help="report JSON: rates, intervals and per-comparison verdicts")
    add_trust_remote_code_argument(p)
    p.set_defaults(func=run_winrate)


def _judge(args: argparse.Namespace) -> Judge:
    """The judge ``eval winrate`` names, with the options of its kind."""
    from dora_engine.eval.http_judge import ChatOptions
    from dora_engine.eval.judges import make_judge

    beside = Path(args.output).parent if args.output else Path(".")
    cache = Path(args.cache_dir) if args.cache_dir else beside / "judge_cache"
    chat = ChatOptions(template=args.judge_template, seed=args.seed, cache_dir=cache, workers=args.workers,
                       max_retries=args.max_retries, request_deadline_s=args.request_timeout,
                       run_deadline_s=args.timeout, max_consecutive_failures=args.max_consecutive_failures)
    return make_judge(args.judge, tie_tolerance=args.tie_tolerance, batch_size=args.batch_size, device=args.device,
                      chat=chat, trust_remote_code=args.trust_remote_code)


def run_winrate(args: argparse.Namespace) -> int:
    from dora_engine.data.schema import read_records
    from dora_engine.eval.generate import read_generations
    from dora_engine.eval.winrate import format_summary, pair_with_golden, summarise

    comparisons = pair_with_golden(read_generations(args.generations), read_records(args.data), args.target_source)
    judge = _judge(args)
    verdicts = judge.judge(comparisons)
    summary = summarise(verdicts, n_boot=args.n_boot, seed=args.seed)
    print(format_summary(summary, judge.name))
    if args.output:
        report = {"judge": judge.name, "generations": str(args.generations), **summary.to_dict(),
                  "verdicts": {c.id: v for c, v in zip(comparisons, verdicts, strict=True)}}
        with atomic_write(args.output) as handle:
            json.dump(report, handle, indent=1)
    return 0


def _register_calibration(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("calibration", help="reward vs. classifier confidence of generated responses")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH", type=_model_spec,
                   help="a model's generations JSONL (repeat: e.g. policy=… baseline=…); rows may carry "
                        "precomputed 'reward' and 'confidence'")
    p.add_argument("--reward", help="oracle (data synth datasets) | reward-model:PATH; needed unless every row "
                                    "has a 'reward'")
    p.add_argument("--classifier", metavar="DIR",
                   help="the calibration folder `dora-engine calibrate` wrote (its classifier of the target "
                        "source is used), or one binary classifier folder; needed unless every row has a "
                        "'confidence'")
    p.add_argument("--normalise", choices=("minmax", "zscore", "none"), default="minmax",
                   help="reward normalisation over all models' responses pooled (default: minmax)")
    p.add_argument("--max-length", type=int, default=None,
                   help="classifier input length (default: the calibration's, else 512)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--output-dir", required=True, help="writes calibration_report.json and reward_confidence.png")
    add_trust_remote_code_argument(p)
    p.set_defaults(func=run_calibration)


def _model_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {spec!r}")
    return name, path


def run_calibration(args: argparse.Namespace) -> int:
    from dora_engine.errors import UserValueError
    from dora_engine.eval.calibration_diag import (
        classifier_confidence,
        diagnose,
        load_scored,
        plot_diagnostic,
        resolve_classifier,
    )
    from dora_engine.eval.judges import make_reward_scorer

    groups = [load_scored(path, name) for name, path in args.model]
    # What is missing is said before any model loads.
    for (name, path), g in zip(args.model, groups, strict=True):
        for field, option, what in (
            ("reward", args.reward, "--reward oracle (data synth datasets) or --reward reward-model:PATH"),
            ("confidence", args.classifier, "--classifier with the folder `dora-engine calibrate` wrote "
                                            "(its --output-dir)"),
        ):
            missing = next((i for i, v in enumerate(getattr(g, field)) if v is None), None)
            if option is None and missing is not None:
                raise UserValueError(f"{path} (model {name!r}): line {missing + 1} has no {field!r}; pass {what}")
    classifier = resolve_classifier(args.classifier, args.max_length) if args.classifier else None
    scorer = make_reward_scorer(args.reward, trust_remote_code=args.trust_remote_code) if args.reward else None
    for g in groups:
        if scorer is not None:
            g.reward = list(scorer.score(g.instructions, g.outputs))
        if classifier is not None:
            g.confidence = list(classifier_confidence(
                classifier, g, batch_size=args.batch_size, device=args.device,
                trust_remote_code=args.trust_remote_code,
            ))
    normalised, fits = diagnose(groups, args.normalise)
    out = Path(args.output_dir)
    plot_diagnostic(groups, normalised, fits, out / "reward_confidence.png", args.normalise)
    report = {"normalise": args.normalise, "reward": args.reward or "precomputed",
              "confidence": args.classifier or "precomputed", "fits": {k: v.to_dict() for k, v in fits.items()}}
    if classifier is not None:
        report["classifier"] = {"path": classifier.path, "name": classifier.name, "max_length": classifier.max_length}
    with atomic_write(out / "calibration_report.json") as handle:
        json.dump(report, handle, indent=1)
    for name, fit in fits.items():
        print(f"{name}: slope {fit.slope:.4f}, intercept {fit.intercept:.4f}, r {fit.r:.3f} (n={fit.n})")
    print(f"wrote {out / 'reward_confidence.png'} and {out / 'calibration_report.json'}")
    return 0


def _register_compare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("compare", help="two models on the same prompts: paired differences with bootstrap CIs")
    p.add_argument("--baseline", required=True, metavar="NAME=PATH", type=_model_spec,
                   help="the baseline's generations JSONL (e.g. sft=runs/x/eval/generations_sft.jsonl)")
    p.add_argument("--candidate", required=True, metavar="NAME=PATH", type=_model_spec,
                   help="the candidate's generations of the same prompts, in the same order")
    p.add_argument("--data", required=True, help="records holding the golden responses (joined by id or prompt)")
    p.add_argument("--target-source", default="golden", help="the golden source's name (default: golden)")
    p.add_argument("--reward", default="oracle", help="oracle (data synth datasets) | reward-model:PATH")
    p.add_argument("--h-tilde-data", metavar="PATH",
                   help="calibrated training records: also report their mean h̃ with and without a golden response")
    p.add_argument("--tie-tolerance", type=float, default=0.0, help="|Δr| at most this is a tie")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the prompts (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    p.add_argument("--output", help="report JSON (the table is also written beside it as .md)")
    add_trust_remote_code_argument(p)
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from dora_engine.data.schema import read_records
    from dora_engine.data.summary import mean_h_tilde_by_target
    from dora_engine.errors import UserValueError
    from dora_engine.eval.generate import read_generations
    from dora_engine.eval.judges import RewardJudge, make_reward_scorer
    from dora_engine.eval.paired import check_same_prompts, format_report, paired_report, score_against_golden
    from dora_engine.eval.winrate import pair_with_golden

    if args.output and Path(args.output).suffix == ".md":
        raise UserValueError(f"--output {args.output}: give the JSON path; the table goes beside it as .md")
    (base_name, base_path), (cand_name, cand_path) = args.baseline, args.candidate
    baseline, candidate = read_generations(base_path), read_generations(cand_path)
    check_same_prompts(baseline, candidate, (base_path, cand_path))
    records = read_records(args.data)
    judge = RewardJudge(make_reward_scorer(args.reward, trust_remote_code=args.trust_remote_code),
                        tie_tolerance=args.tie_tolerance)
    scores = [score_against_golden(name, pair_with_golden(gens, records, args.target_source), judge)
              for name, gens in ((base_name, baseline), (cand_name, candidate))]
    report = paired_report(*scores, n_boot=args.n_boot, seed=args.seed)
    text = format_report(report, judge.name)
    result = report.to_dict()
    if args.h_tilde_data:
        means = mean_h_tilde_by_target(read_records(args.h_tilde_data), args.target_source)
        result["mean_h_tilde"] = {k: {"mean": m if n else None, "records": n} for k, (m, n) in means.items()}
        (with_m, with_n), (without_m, without_n) = means["with_target"], means["without_target"]
        text += (f"\n\nmean h̃ of the training prompts ({args.h_tilde_data}): {with_m:.3f} with a "
                 f"{args.target_source} response ({with_n} prompts), {without_m:.3f} without one ({without_n})")
    print(text)
    if args.output:
        with atomic_write(args.output) as handle:
            json.dump(result, handle, indent=1)
        with atomic_write(Path(args.output).with_suffix(".md")) as handle:
            handle.write(text + "\n")
    return 0
