"""The ``dora-engine`` command (DESIGN.md section 6).

Each phase lives in its own module exposing ``register(subparsers)``, which adds its sub-command(s)
with ``set_defaults(func=...)``; ``func(args)`` returns the exit code. Command modules import heavy
libraries (transformers, deepspeed, datasets) inside their functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dora_engine import __version__

COMMAND_MODULES = (
    "dora_engine.ops.report",
    "dora_engine.data.commands",
    "dora_engine.calibration.commands",
    "dora_engine.training.commands",
    "dora_engine.eval.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dora-engine",
        description="DoRA: distribution-aware robust alignment on DeepSpeed.",
    )
    parser.add_argument("--version", action="version", version=f"dora-engine {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
