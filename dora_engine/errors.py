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
from collections.abc import Iterator


class UserError(Exception):
    """Bad input from the user: the command reports it as one line naming the command, exit code 2."""


class UserValueError(UserError, ValueError):
    """A value the user chose (an option, a setting, a model or data set) that the command cannot use;
    the message names it and says what would do."""


class UserImportError(UserError, ImportError):
    """An optional package that the requested feature needs is missing; the message says how to install it."""


class TrainingError(UserError, RuntimeError):
    """A training run that cannot continue (e.g. too many non-finite steps in a row, a checkpoint written
    with another configuration or world size); the message says why."""


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
