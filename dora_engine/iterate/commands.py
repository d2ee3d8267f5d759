"""``dora-engine iterate --config C.yaml [--resume auto] [key=value …]`` (docs/design.md sections 6 and 10)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    help_text = ("iterative self-training: rounds of generation, scoring, calibration, alignment and evaluation, "
                 "one chain per strategy, resumable")
    parser = subparsers.add_parser("iterate", help=help_text, description=help_text)
    parser.add_argument("--config", required=True,
                        help="YAML config (keys: launch/README.md; the embedded default: launch/configs/"
                             "iterate_synth.yaml)")
    parser.add_argument("--resume", choices=("auto",), default=None,
                        help="continue the run in output_dir: every step whose manifest matches its inputs is kept")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds=4")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dora_engine.iterate.config import load_iterate_config
    from dora_engine.iterate.pipeline import Stopped, describe_stop, run_iterate
    from dora_engine.iterate.report import PLOT, RESULTS_JSON, RESULTS_MD
    from dora_engine.training.output_lock import output_lock
    from dora_engine.training.process_group import close_distributed
    from dora_engine.training.signals import StopSignals

    cfg = load_iterate_config(args.config, list(args.overrides))
    with output_lock(cfg.output_dir), StopSignals().installed() as stop:
        try:
            results = run_iterate(cfg, resume=args.resume == "auto", stop=stop)
        except Stopped as err:
            print(describe_stop(err, cfg), flush=True)
            return 0
        finally:
            close_distributed()  # the process group the run's trainers made (one for all)
    print()
    print(results["table"], end="")
    print(f"\nwrote {cfg.output_dir}/{RESULTS_MD}, {RESULTS_JSON}, {PLOT}")
    return 0
