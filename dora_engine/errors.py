"""The user's errors: what the ``dora-engine`` command reports as bad input (``dora_engine.cli``).

Every error that is the user's to fix (a bad option value, data that breaks the schema, an optional
package that is not installed, an unreachable judge endpoint) derives from ``UserError``; anything
else that escapes a command is a bug and shows its traceback. Each concrete error also derives from
the built-in exception a Python caller would expect (``ValueError``, ``ImportError``, ``RuntimeError``),
so ``except ValueError`` keeps catching a bad option value.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = "DORA_ENGINE_DEBUG"  # "1": a user's error shows its traceback instead of one line


class UserError(Exception):
    """Bad input from the user: the command reports it as one line naming the command, exit code
    ``exit_code`` (2; 1 for a training run that cannot continue)."""

    exit_code = 2


class UserValueError(UserError, ValueError):
    """A value the user chose (an option, a setting, a model or data set) that the command cannot use;
    the message names it and says what would do."""


class UserImportError(UserError, ImportError):
    """An optional package that the requested feature needs is missing; the message says how to install it."""


class TrainingError(UserError, RuntimeError):
    """A training run that cannot continue (e.g. too many non-finite steps in a row, a checkpoint written
    with another configuration or world size); the message says why. Exit code 1, as for a launch whose
    rank failed: a scheduler retries it only once the cause is fixed, like bad input."""

    exit_code = 1


class ModelLoadError(UserError, OSError):
    """A model the user named that cannot be loaded: a missing folder, a folder without its files, an
    unknown hub id."""


@contextlib.contextmanager
def loading_user_model(source: str | os.PathLike) -> Iterator[None]:
    """Re-raise a failure to load ``source`` (a model folder or hub id the user named) as a
    ``ModelLoadError`` naming it. Hugging Face loaders report a bad source as an OSError or a ValueError
    over several lines, of which the first says what is wrong."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as err:
        first_line = next(iter(str(err).splitlines()), type(err).__name__)
        raise ModelLoadError(f"cannot load {os.fspath(source)!r}: {first_line.strip()}") from err


def report_user_error(command: str, err: BaseException) -> int:
    """Print ``err`` as the one line ``dora-engine COMMAND: error: MESSAGE`` on stderr and return its exit
    code (``UserError.exit_code``; 2 for an ``OSError`` about a path the user named). The one reporter of
    ``dora-engine`` and of each rank of a launch; with ``DORA_ENGINE_DEBUG=1`` it re-raises ``err`` so that
    its traceback shows."""
    if os.environ.get(DEBUG_ENV) == "1":
        raise err
    print(f"dora-engine {command}: error: {err}", file=sys.stderr, flush=True)
    return getattr(err, "exit_code", UserError.exit_code)
