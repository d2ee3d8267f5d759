"""The ``dora-engine`` command (DESIGN.md section 6).

Each phase lives in its own module exposing ``register(subparsers)``, which adds its sub-command(s)
with ``set_defaults(func=...)``; ``func(args)`` returns the exit code. Command modules import heavy
libraries (transformers, deepspeed, datasets) inside their functions so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
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


def _command_words(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The sub-command chain named in ``argv`` (e.g. ``["data", "corrupt"]``), for error messages."""
    words = []
    for word in argv:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        words.append(word)
        parser = choices[word]
    return words


def main(argv: list[str] | None = None) -> int:
    """Run a command. Bad input (data, options, missing files or packages) ends with one line naming the
    command and exit code 2; set DORA_ENGINE_DEBUG=1 for the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError, OSError) as err:  # RecordError is a ValueError
        if os.environ.get("DORA_ENGINE_DEBUG") == "1":
            raise
        print(f"dora-engine {' '.join(_command_words(parser, argv))}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
