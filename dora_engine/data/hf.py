"""Preference data that Hugging Face ``datasets`` loads, mapped onto the dataset schema (docs/design.md section 3).

A source is a local file (``.parquet``, ``.arrow``, ``.csv``, ``.json`` / ``.jsonl``), a folder (one that
``Dataset.save_to_disk`` wrote, or a folder of data files) or a hub id (``org/name``, where the machine
has the network). A column mapping says which column holds each field of the schema: ``id``, ``prompt``,
``responses``, ``h_tilde``, ``meta``, and, inside each response, ``responses.text``,
``responses.source``, ``responses.score``; fields it does not name keep their own name, and columns
no field names are ignored. A row that does not follow the schema is a ``RecordError`` naming the
source and the row, as for JSONL files; a source in TRL's layout (``chosen`` / ``rejected``, no
``responses``) is refused with a pointer to the ``trl`` format (``dora_engine.data.converters``), which
reads the same sources.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dora_engine.data.schema import Record, RecordError
from dora_engine.errors import UserValueError

FIELDS = ("id", "prompt", "responses", "h_tilde", "meta")
RESPONSE_FIELDS = ("text", "source", "score")
COLUMN_KEYS = FIELDS + tuple(f"responses.{f}" for f in RESPONSE_FIELDS)
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV", "json": "JSON", "arrow": "an Arrow file",
                "saved": "a save_to_disk folder", "dataset": "a dataset"}
TRL_COLUMNS = ("chosen", "rejected")
HF_SUFFIXES = (".parquet", ".arrow", ".csv")
"""Suffixes that always go through ``datasets``; other files are read as the schema's JSONL (section 3)."""


def is_hf_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read through ``datasets`` rather than as the schema's JSONL: a folder, a file
    with a suffix of ``HF_SUFFIXES``, or a name that is no local path (a hub id)."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.is_file():
        return p.suffix in HF_SUFFIXES
    return True


def check_columns(columns: Mapping[str, str] | None, key: str = "columns") -> dict[str, str]:
    """A column mapping with known keys and string values; ``key`` names it in errors."""
    columns = dict(columns or {})
    for name, value in columns.items():
        if name not in COLUMN_KEYS:
            raise UserValueError(f"{key}: unknown field {name!r}; valid: {', '.join(COLUMN_KEYS)}")
        if not isinstance(value, str) or not value:
            raise UserValueError(f"{key}: field {name!r} must name a column, got {value!r}")
    return columns


def parse_columns(items: list[str] | None) -> dict[str, str]:
    """``["prompt=question", "responses.text=content"]`` → a column mapping."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserValueError(f"--columns: {item!r} must have the form field=column (e.g. prompt=question)")
        name, column = item.split("=", 1)
        out[name.strip()] = column.strip()
    return check_columns(out, "--columns")


def load_hf(source: str | os.PathLike, *, split: str | None = None, cache_dir: str | None = None) -> Any:
    """A ``datasets.Dataset`` (memory-mapped where the source is Arrow) of ``source``. A source that cannot
    be read is a ``UserValueError`` in one line naming it and the format it was read as; a missing file
    (a name with a data file's suffix, or a path starting with ``/`` or ``.``) is a ``FileNotFoundError``,
    never a hub request."""
    import datasets

    path = Path(source)
    if not path.exists() and (path.suffix in (*FILE_BUILDERS, ".arrow", ".gz") or str(source).startswith(("/", "."))):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(source))  # a file, not a hub id
    kind = "dataset"
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # datasets logs a failed read before raising it: said once, below
    try:
        if path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
            kind = "saved"
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix == ".arrow":
            kind = "arrow"
            loaded = datasets.Dataset.from_file(str(path))
        elif path.is_file():
            builder = FILE_BUILDERS.get(path.suffix if path.suffix != ".gz" else Path(path.stem).suffix)
            if builder is None:
                raise UserValueError(f"{path}: unknown data file type (use {', '.join(sorted(FILE_BUILDERS))}, .arrow)")
            kind = builder
            loaded = datasets.load_dataset(builder, data_files=str(path), split=split or "train", cache_dir=cache_dir)
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), split=split or "train", cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset(str(source), split=split or "train", cache_dir=cache_dir)
    except (OSError, EOFError, ValueError, datasets.exceptions.DatasetsError) as err:  # OSError, EOFError: gzip
        if isinstance(err, UserValueError):
            raise
        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ else err
        first = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise UserValueError(f"{source}: cannot be read as {FORMAT_NAMES[kind]} ({first})") from None
    finally:
        logger.setLevel(level)
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in loaded else names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise UserValueError(f"{source}: holds the splits {names}; name one (split)")
        loaded = loaded[chosen]
    return loaded


def source_files(source: str | os.PathLike, dataset: Any = None) -> list[str]:
    """The files whose bytes key a source: the file, a folder's files (sorted), or a hub dataset's cache."""
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return [str(p) for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if dataset is None:
        dataset = load_hf(source)
    return sorted(f["filename"] for f in dataset.cache_files)


def _mapped(row: Mapping[str, Any], columns: Mapping[str, str], n: int, id_prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in FIELDS:
        column = columns.get(name, name)
        if column in row and row[column] is not None:
            out[name] = row[column]
    if "id" not in out:
        out["id"] = f"{id_prefix}-{n}"
    responses = out.get("responses")
    if isinstance(responses, list):
        names = {f: columns.get(f"responses.{f}", f) for f in RESPONSE_FIELDS}
        mapped = []
        for item in responses:
            if isinstance(item, Mapping):
                item = {f: item[c] for f, c in names.items() if c in item and item[c] is not None}
            mapped.append(item)
        out["responses"] = mapped
    return out


def iter_dataset_rows(dataset: Any, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """The rows of a ``datasets.Dataset`` as plain dicts, read in batches (never held in Python at once)."""
    for batch in dataset.iter(batch_size=batch_size):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def looks_like_trl(column_names: list[str], columns: Mapping[str, str]) -> bool:
    """Whether a source without a ``responses`` column (or mapping) has TRL's ``chosen`` / ``rejected``."""
    return "responses" not in columns and "responses" not in column_names and all(
        c in column_names for c in TRL_COLUMNS)


def iter_hf_records(
    dataset: Any, columns: Mapping[str, str] | None = None, *, name: str = "dataset", id_prefix: str = "row",
    batch_size: int = 1024,
) -> Iterator[Record]:
    """Validated records of a ``datasets.Dataset``, row by row; a bad row is a ``RecordError`` naming
    ``name`` and the row. Rows are read in batches, so the dataset is never held in Python at once. A
    dataset in TRL's layout is refused with a pointer to the ``trl`` format."""
    columns = check_columns(columns)
    if looks_like_trl(dataset.column_names, columns):
        raise UserValueError(f"{name}: this looks like TRL's layout (prompt/chosen/rejected): use --format trl "
                             "(data.format: trl in a training config)")
    missing = [c for f, c in columns.items() if "." not in f and c not in dataset.column_names]
    if missing:
        raise UserValueError(f"{name}: no column {missing[0]!r}; columns: {dataset.column_names}")
    for n, row in enumerate(iter_dataset_rows(dataset, batch_size)):
        try:
            yield Record.from_dict(_mapped(row, columns, n, id_prefix), index=n)
        except RecordError as err:
            raise RecordError(f"{name}: {err}") from None
