"""The ``dora-engine`` command (docs/design.md section 6).

Each phase lives in its own module exposing ``register(subparsers)``, which adds its sub-command(s)
with ``set_defaults(func=...)``; ``func(args)`` returns the exit code. Command modules import heavy
libraries (transformers, deepspeed, matplotlib) inside their functions so that ``--help`` stays fast.

Errors. Bad input ends the command with one line, ``dora-engine COMMAND: error: MESSAGE``, and exit
code 2, or 1 for a training run that cannot continue (``TrainingError``); DORA_ENGINE_DEBUG=1 shows the
traceback instead (``dora_engine.errors.report_user_error``, which each rank of a launch uses too). Bad
input is

- a ``dora_engine.errors.UserError``: a bad option value, data that breaks the schema, a training
  config that cannot run, a model that cannot be loaded, a missing optional package, a judge endpoint
  that refuses or is unreachable;
- an ``OSError`` about a path the user named: a ``FileNotFoundError``, ``FileExistsError``,
  ``IsADirectoryError``, ``NotADirectoryError`` or ``PermissionError`` whose file is one of the
  command's arguments, or a folder above one (a missing input file, an output folder that cannot be made).

Anything else is a bug and keeps Python's behaviour: the traceback, exit code 1. Ctrl-C ends with
"interrupted" and exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from dora_engine import __version__
from dora_engine.errors import UserError, report_user_error

PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
"""The OSErrors that are bad input when their file is a path the user named (module docstring)."""

COMMAND_MODULES = (
    "dora_engine.ops.commands",
    "dora_engine.data.commands",
    "dora_engine.calibration.commands",
    "dora_engine.training.commands",
    "dora_engine.eval.commands",
    "dora_engine.iterate.commands",
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


def _named_paths(args: argparse.Namespace) -> set[Path]:
    """Every argument value as an absolute path (lists and tuples searched too)."""
    paths: set[Path] = set()

    def add(value: object) -> None:
        if isinstance(value, str | os.PathLike):
            paths.add(Path(os.path.abspath(os.fspath(value))))
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)

    for value in vars(args).values():
        add(value)
    return paths


def is_user_error(err: BaseException, args: argparse.Namespace) -> bool:
    """Whether ``err`` is bad input rather than a bug (module docstring)."""
    if isinstance(err, UserError):
        return True
    if not isinstance(err, PATH_ERRORS):
        return False
    named = _named_paths(args)
    for filename in (err.filename, err.filename2):
        if not isinstance(filename, str | bytes | os.PathLike):
            continue
        path = Path(os.path.abspath(os.fsdecode(filename)))
        if any(path == n or path in n.parents for n in named):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input ends with one line naming the command and exit code 2 (1: a run that
    cannot continue), a bug with its traceback (module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as err:
        if not is_user_error(err, args):
            raise
        return report_user_error(" ".join(_command_words(parser, argv)), err)


if __name__ == "__main__":
    sys.exit(main())
