"""Loading the Hugging Face models, tokenizers and configs a user names, without running their code
(docs/design.md section 7.6).

A model folder (or hub repository) may ship its own Python modules and name them under ``auto_map`` in
``config.json`` or ``tokenizer_config.json``; loading it with ``trust_remote_code=True`` imports and runs
them with the user's permissions. Left unset, transformers asks ``[y/N]`` on the terminal. Here it is
always set: ``False`` unless the user opted in (``model.trust_remote_code: true`` in a training config,
``--trust-remote-code`` on the other commands, ``add_trust_remote_code_argument``). Without the opt-in a
source that needs its own code is refused with one line (``RemoteCodeError``) naming the source and the
key; a folder whose ``auto_map`` only repeats a class transformers ships loads with transformers' own.

Every loader of the package goes through ``load_pretrained`` (and vLLM through ``refuse_remote_code``
before it is given the same setting).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from dora_engine.errors import ModelLoadError, loading_user_model

OPT_IN = "--trust-remote-code, or model.trust_remote_code: true in a training config"

TRUST_REMOTE_CODE_HELP = (
    "run the Python code a model folder or hub repository ships (its config's auto_map) to load it; "
    "that code runs with your permissions: only for a source you trust (default: such a source is refused)"
)


class RemoteCodeError(ModelLoadError):
    """A model source that needs its own Python code, which the user did not opt in to run."""


def add_trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-remote-code`` (``args.trust_remote_code``), the opt-in of every command that loads a model."""
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or unreadable: the loader itself says what is wrong
    return data if isinstance(data, dict) else {}


def remote_code_key(source: str | os.PathLike) -> str | None:
    """Where a local model folder asks for its own code, e.g. ``config.json 'auto_map' (model_type 'x')``:
    an ``auto_map`` for a model type, or a tokenizer class, that transformers does not ship. ``None`` for a
    folder that needs none, and for a hub id (transformers refuses those itself, see ``load_pretrained``)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if config.get("auto_map") and model_type not in CONFIG_MAPPING:
        return f"config.json 'auto_map' (model_type {model_type!r})"
    tokenizer = _read_json(folder / "tokenizer_config.json")
    tokenizer_class = tokenizer.get("tokenizer_class")
    shipped = isinstance(tokenizer_class, str) and tokenizer_class_from_name(tokenizer_class) is not None
    if tokenizer.get("auto_map") and not shipped:
        return f"tokenizer_config.json 'auto_map' (tokenizer_class {tokenizer_class!r})"
    return None


def _refusal(source: str | os.PathLike, key: str) -> RemoteCodeError:
    return RemoteCodeError(
        f"{os.fspath(source)}: {key} asks to run the model's own Python code; refused (opt in with {OPT_IN}, "
        "only for a source you trust: its code runs with your permissions)"
    )


def refuse_remote_code(source: str | os.PathLike, trust_remote_code: bool) -> None:
    """Raise ``RemoteCodeError`` when ``source`` is a local folder that needs its own code and the user
    did not opt in (module docstring)."""
    if trust_remote_code:
        return
    key = remote_code_key(source)
    if key is not None:
        raise _refusal(source, key)


def load_pretrained(auto_class: Any, source: str, *, trust_remote_code: bool, dtype: Any = None) -> Any:
    """``auto_class.from_pretrained(source)`` (``AutoConfig``, ``AutoTokenizer``, ``AutoModel…``) with
    ``trust_remote_code`` always given; a source that needs its own code without the opt-in, or that cannot
    be loaded, is a ``ModelLoadError`` naming it. ``dtype``: the weights' dtype (model classes only)."""
    refuse_remote_code(source, trust_remote_code)
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        options["dtype"] = dtype
    with loading_user_model(source):
        try:
            return auto_class.from_pretrained(source, **options)
        except ValueError as err:
            if not trust_remote_code and "trust_remote_code" in str(err):  # a hub repository with its own code
                raise _refusal(source, "its 'auto_map'") from err
            raise
