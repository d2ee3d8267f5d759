"""``dora-engine data …``: the data pipeline on the command line (docs/design.md section 6).

Each sub-command is a thin wrapper over a library function of ``dora_engine.data`` so that the steps
compose in Python as well.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from dora_engine.data.converters import FORMATS
from dora_engine.data.schema import Record, read_records, write_records
from dora_engine.data.summary import summarize
from dora_engine.data.synth import SPLITS
from dora_engine.errors import UserValueError
from dora_engine.generation import add_backend_arguments
from dora_engine.hf_loading import add_trust_remote_code_argument


def _parse_mix(text: str) -> dict[str, float]:
    """``verbose=1,off_topic=2`` -> {"verbose": 1.0, "off_topic": 2.0}."""
    mix = {}
    for item in text.split(","):
        name, sep, weight = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--mix item {item!r} is not SOURCE=WEIGHT")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix weight {weight!r} of {name!r} is not a number") from None
    return mix


def _report(out: Path, records: list[Record]) -> int:
    print(f"wrote {out}")
    print(summarize(records))
    return 0


def _finish(out: Path, records: list[Record]) -> int:
    write_records(out, records)
    return _report(out, records)


def _convert_hf(args: argparse.Namespace) -> int:
    """Stream what ``datasets`` loads into the schema's JSONL (nothing is held in memory at once)."""
    from dora_engine.data.hf import iter_hf_records, load_hf, parse_columns

    if args.target is not None:
        raise UserValueError("--target applies to --format alpaca only")
    columns = parse_columns(args.columns)
    dropped: list[str] = []

    def records():
        for source in args.inputs:
            dataset = load_hf(str(source), split=args.split)
            for rec in iter_hf_records(dataset, columns, name=str(source), id_prefix=Path(str(source)).stem or "row"):
                if not args.keep_empty and any(not r.text for r in rec.responses):
                    dropped.append(rec.id)
                    continue
                yield rec

    count = write_records(args.out, records())
    if dropped:
        print(f"warning: dropped {len(dropped)} record(s) with an empty response (e.g. id={dropped[0]!r}); "
              "--keep-empty keeps them", file=sys.stderr)
    print(f"wrote {count} records to {args.out}")
    return 0


def _add_resume_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard-size", type=int, default=256,
                        help="prompts per shard; finished shards survive an interruption and are not redone")
    parser.add_argument("--restart", action="store_true",
                        help="discard the shards of an earlier, different run instead of refusing to resume")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def _cmd_convert(args: argparse.Namespace) -> int:
    from dora_engine.data.converters import convert_files

    if args.format == "hf":
        return _convert_hf(args)
    if args.columns:
        raise UserValueError("--columns applies to --format hf only")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = convert_files(args.format, args.inputs, target=args.target, drop_empty=not args.keep_empty,
                                split=args.split)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return _finish(args.out, records)


def _cmd_augment(args: argparse.Namespace) -> int:
    from dora_engine.data.augment import augment_file
    from dora_engine.generation import Sampling, vllm_options

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens)
    records = augment_file(
        args.input, args.out, args.model, args.n, backend=args.backend, sampling=sampling,
        batch_size=args.batch_size, source=args.source, seed=args.seed, device=args.device, vllm=vllm_options(args),
        shard_size=args.shard_size, restart=args.restart, trust_remote_code=args.trust_remote_code,
    )
    return _report(args.out, records)


def _cmd_score(args: argparse.Namespace) -> int:
    from dora_engine.data.score import ORACLE, score_file

    records = score_file(
        args.input, args.out, ORACLE if args.oracle else args.model, batch_size=args.batch_size,
        max_length=args.max_length, keep_existing=args.keep_existing, device=args.device,
        shard_size=args.shard_size, restart=args.restart, trust_remote_code=args.trust_remote_code,
    )
    return _report(args.out, records)


def _cmd_synth(args: argparse.Namespace) -> int:
    from dora_engine.data.synth import build_synth_tokenizer, synth_records

    records = synth_records(
        num_prompts=args.num_prompts,
        k=args.k,
        golden_per_prompt=args.golden_per_prompt,
        mix=args.mix,
        label_noise=args.label_noise,
        length_bias=args.length_bias,
        seed=args.seed,
        golden_fraction=args.golden_fraction,
        split=args.split,
    )
    if args.tokenizer_dir is not None:
        build_synth_tokenizer(args.tokenizer_dir)
        print(f"wrote tokenizer to {args.tokenizer_dir}")
    return _finish(args.out, records)


def _cmd_corrupt(args: argparse.Namespace) -> int:
    from dora_engine.data.corrupt import corrupt_records

    return _finish(args.out, corrupt_records(read_records(args.input), args.rate, args.seed))


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="data pipeline: convert, augment, score, corrupt, synth")
    commands = data.add_subparsers(dest="data_command", metavar="STEP", required=True)

    convert = commands.add_parser("convert", help="convert a public preference format to the dataset schema")
    convert.add_argument("inputs", nargs="+",
                         help="input files: JSON list or JSONL (.gz allowed), or what `datasets` loads (Parquet, "
                              "Arrow, CSV, a save_to_disk folder, a hub id; --format hf: JSON(L) too)")
    convert.add_argument("--format", required=True, choices=[*FORMATS, "hf"],
                         help="trl: TRL's prompt/chosen/rejected (standard or conversational, explicit or implicit "
                              "prompt); hh: raw HH-RLHF transcripts; tldr: TL;DR summarisation comparisons (info, "
                              "summaries, choice); alpaca: AlpacaEval model outputs of several generators; authors: "
                              "query/responses/scores/probs; hf: rows already in the schema's fields, renamed by "
                              "--columns")
    convert.add_argument("--columns", nargs="*", default=None, metavar="FIELD=COLUMN",
                         help="hf: which column holds a schema field (id, prompt, responses, h_tilde, meta, "
                              "responses.text, responses.source, responses.score)")
    convert.add_argument("--split", default=None,
                         help="the split of a `datasets` source to read (default: train, or the only one)")
    convert.add_argument("--out", type=Path, required=True, help="output JSONL (.gz allowed)")
    convert.add_argument("--target", default=None, help="alpaca: the generator whose outputs are the target")
    convert.add_argument("--keep-empty", action="store_true",
                         help="keep records with an empty response (dropped by default)")
    convert.set_defaults(func=_cmd_convert)

    augment = commands.add_parser("augment", help="add n sampled responses per prompt from a causal LM")
    augment.add_argument("input", type=Path)
    augment.add_argument("--out", type=Path, required=True)
    augment.add_argument("--model", required=True, help="path or name of the causal LM")
    augment.add_argument("--n", type=int, default=2, help="responses to add per prompt")
    augment.add_argument("--source", default=None,
                         help="source label of the new responses (default: the model folder's name; for a "
                              "training run's export RUN/final, the run folder's name RUN; a hub id's last part)")
    augment.add_argument("--temperature", type=float, default=0.8)
    augment.add_argument("--top-p", type=float, default=1.0)
    augment.add_argument("--top-k", type=int, default=0, help="0 switches top-k filtering off")
    augment.add_argument("--repetition-penalty", type=float, default=1.1)
    augment.add_argument("--max-new-tokens", type=int, default=256)
    augment.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (transformers)")
    augment.add_argument("--seed", type=int, default=0)
    add_backend_arguments(augment)
    _add_resume_options(augment)
    add_trust_remote_code_argument(augment)
    augment.set_defaults(func=_cmd_augment)

    score = commands.add_parser("score", help="fill every response's score with a single-logit reward model")
    score.add_argument("input", type=Path)
    score.add_argument("--out", type=Path, required=True)
    scorer = score.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--model", help="path or name of an AutoModelForSequenceClassification with one output")
    scorer.add_argument("--oracle", action="store_true", help="score with the synth dataset's oracle_reward")
    score.add_argument("--batch-size", type=int, default=16, help="responses per forward pass")
    score.add_argument("--max-length", type=int, default=1024, help="truncate longer inputs from the left")
    score.add_argument("--keep-existing", action="store_true", help="keep scores that are already present")
    _add_resume_options(score)
    add_trust_remote_code_argument(score)
    score.set_defaults(func=_cmd_score)

    synth = commands.add_parser("synth", help="write the synthetic mixture-shift dataset with its known oracle")
    synth.add_argument("--out", type=Path, required=True, help="output JSONL (.gz allowed)")
    synth.add_argument("--num-prompts", type=int, default=200)
    synth.add_argument("--k", type=int, default=4, help="responses per prompt")
    synth.add_argument("--golden-per-prompt", type=int, default=1)
    synth.add_argument("--golden-fraction", type=float, default=1.0,
                       help="fraction of prompts that get the golden responses; the rest have shifted ones only")
    synth.add_argument("--split", choices=SPLITS, default="all",
                       help="prompt texts: train and eval are disjoint halves of all (for held-out evaluation)")
    synth.add_argument("--mix", type=_parse_mix, default=None,
                       help="weights of the shifted sources, e.g. verbose=1,off_topic=1,repetitive=1 (default)")
    synth.add_argument("--label-noise", type=float, default=0.0, help="fraction of records with permuted scores")
    synth.add_argument("--length-bias", type=float, default=0.0,
                       help="add length_bias * words/40 to the scores (a verbosity-biased reward model)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tokenizer-dir", type=Path, default=None,
                       help="also save a word-level tokenizer for the synth vocabulary here")
    synth.set_defaults(func=_cmd_synth)

    corrupt = commands.add_parser("corrupt", help="label noise: permute the scores of a random subset of prompts")
    corrupt.add_argument("input", type=Path)
    corrupt.add_argument("--out", type=Path, required=True)
    corrupt.add_argument("--rate", type=float, required=True, help="probability that a record is corrupted")
    corrupt.add_argument("--seed", type=int, default=0)
    corrupt.set_defaults(func=_cmd_corrupt)
