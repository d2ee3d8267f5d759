"""Tokenised training data as a memory-mapped Arrow dataset on disk, built once and shared (docs/design.md
section 3.2).

A build reads the data (the schema's JSONL, or what ``datasets`` loads: ``dora_engine.data.hf``; or either
in a public format that ``data.format`` names: ``dora_engine.data.converters.ROW_CONVERTERS``) record
by record into an Arrow file, tokenises it with ``datasets.Dataset.map`` (``num_proc`` processes) and
saves the result with ``save_to_disk`` under ``<cache_dir>/tokens-<key>``. The key hashes the data
files' bytes, the format they are read in (and its column mapping), the tokenizer, the chat template,
the length limits and the stage's settings, so every rank and every later run with the same key maps
the same files instead of tokenising again. The folder appears complete or not at all (built under a
temporary name, then renamed). Its ``dora_tokens.json`` records the size and SHA-256 of every file
``save_to_disk`` wrote and a digest of its own fields; each process checks them before mapping the files,
and a folder that fails the check (a file altered, truncated or missing, the record itself unreadable or
altered) is set aside and built again after one warning line. Under several ranks, local rank 0 of each
node checks and builds while the other local ranks wait for an intact folder (or for the build's error,
which they raise too). The rows are the ones
``data.tokenise`` makes from the same records, in the same order, so the sampler, the collator, the
reference cache and resume work the same on both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write, give_default_modes, temporary_dir
from dora_engine.data.schema import Record, RecordError, iter_jsonl
from dora_engine.errors import UserError
from dora_engine.rows import Row, RowTokenizer, alignment_problem
from dora_engine.training.data import (
    Example,
    NoRecordsError,
    TrainingData,
    check_nonempty,
    file_hash,
    record_rows,
    sft_targets,
)
from dora_engine.training.digests import file_entry

FORMAT = 1  # bump when the stored columns or their meaning change
META = "dora_tokens.json"
BATCH = 1024  # records per Arrow batch and per map call
PARALLEL_FROM = 20_000  # fewer records are tokenised in this process (starting workers costs more)
WAIT_POLL_S = 0.5
SHOW_MAP_BAR_FROM = 10_000  # records; smaller builds take a moment and print nothing
SCHEMA = "schema"  # data.format of records already in the docs/design.md section 3 schema

META_FIELDS = {"format": int, "num_records": int, "num_responses": int, "examples": int, "data_hash": str,
               "token_hash": str, "files": dict, "digest": str}


class DamagedFolder(Exception):
    """A tokenised folder that does not match its ``dora_tokens.json`` (or has none); the message says how."""


class TokenisedCacheError(UserError, OSError):
    """A tokenised folder that still fails its check right after it was built; the message names it."""


def default_cache_dir() -> Path:
    """``$DORA_ENGINE_CACHE/tokenised``, else ``$XDG_CACHE_HOME/dora_engine/tokenised`` (``~/.cache`` by default)."""
    root = os.environ.get("DORA_ENGINE_CACHE")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dora_engine")
    return Path(root) / "tokenised"


# --------------------------------------------------------------------------------------------------
# Reading the records
# --------------------------------------------------------------------------------------------------


def iter_source(
    path: str, columns: dict[str, str] | None, hf_cache: str | None, data_format: str = SCHEMA
) -> Iterator[Record]:
    """Validated records of one data.train / data.eval entry in ``data_format`` (data.format), streamed."""
    from dora_engine.data.converters import iter_converted
    from dora_engine.data.hf import is_hf_source, iter_hf_records, load_hf, looks_like_trl

    if data_format != SCHEMA:
        yield from iter_converted(data_format, path, id_prefix=Path(path).stem or "row", cache_dir=hf_cache)
        return
    if is_hf_source(path):
        yield from iter_hf_records(load_hf(path, cache_dir=hf_cache), columns, name=str(path),
                                   id_prefix=Path(path).stem or "row")
        return
    for n, (_, obj) in enumerate(iter_jsonl(path)):
        if n == 0 and isinstance(obj, dict) and looks_like_trl(list(obj), {}):
            raise RecordError(f"{path}: this looks like TRL's layout (prompt/chosen/rejected): use data.format: trl")
        yield Record.from_dict(obj, index=n)


def source_files(paths: Sequence[str], hf_cache: str | None) -> list[str]:
    from dora_engine.data.hf import is_hf_source, load_hf
    from dora_engine.data.hf import source_files as hf_files

    out: list[str] = []
    for path in paths:
        if is_hf_source(path) and not Path(path).exists():
            out.extend(hf_files(path, load_hf(path, cache_dir=hf_cache)))
        elif is_hf_source(path):
            out.extend(hf_files(path))
        else:
            out.append(str(path))
    return out


def _records_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("file", pa.int32()), ("row", pa.int64()), ("id", pa.string()), ("prompt", pa.string()),
        ("texts", pa.list_(pa.string())), ("sources", pa.list_(pa.string())), ("scores", pa.list_(pa.float64())),
        ("h_tilde", pa.float64()),
    ])


def write_records_arrow(
    paths: Sequence[str], destination: Path, *, columns: dict[str, str] | None, hf_cache: str | None, progress: bool,
    data_format: str = SCHEMA,
) -> int:
    """Stream the records of ``paths`` into one Arrow file (the format ``datasets`` maps); returns the count.
    Ids must be unique across the files; errors name the file and the record."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    schema = _records_schema()
    seen: dict[str, int] = {}
    count = 0
    # Shown after 2 s only: small data (and a bad record early on) leave the terminal as it was.
    bar = tqdm(desc="reading records", unit=" records", disable=not progress, leave=False, delay=2.0)
    with pa.OSFile(str(destination), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buffer: dict[str, list] = {name: [] for name in schema.names}

        def flush() -> None:
            if buffer["id"]:
                writer.write_batch(pa.record_batch([pa.array(buffer[n], type=schema.field(n).type)
                                                    for n in schema.names], schema=schema))
                for values in buffer.values():
                    values.clear()

        for f, path in enumerate(paths):
            try:
                for n, rec in enumerate(iter_source(path, columns, hf_cache, data_format)):
                    if rec.id in seen:
                        raise RecordError(f"record {n} (id={rec.id!r}): duplicate id (also in {paths[seen[rec.id]]})")
                    seen[rec.id] = f
                    buffer["file"].append(f)
                    buffer["row"].append(n)
                    buffer["id"].append(rec.id)
                    buffer["prompt"].append(json.dumps(rec.prompt, ensure_ascii=False))
                    buffer["texts"].append([r.text for r in rec.responses])
                    buffer["sources"].append([r.source for r in rec.responses])
                    buffer["scores"].append([r.score for r in rec.responses])
                    buffer["h_tilde"].append(rec.h_tilde)
                    count += 1
                    if len(buffer["id"]) >= BATCH:
                        flush()
                        bar.update(BATCH)
            except RecordError as err:
                bar.close()
                message = str(err)
                raise RecordError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        bar.update(len(buffer["id"]))
        flush()
    bar.close()
    return count


# --------------------------------------------------------------------------------------------------
# Tokenising (runs in datasets' map workers)
# --------------------------------------------------------------------------------------------------


def _record(batch: dict[str, list], j: int) -> Record:
    from dora_engine.data.schema import Response

    return Record(batch["id"][j], json.loads(batch["prompt"][j]), [
        Response(t, s, sc) for t, s, sc in zip(batch["texts"][j], batch["sources"][j], batch["scores"][j], strict=True)
    ], batch["h_tilde"][j])


def tokenise_batch(batch: dict[str, list], indices: list[int], *, tokenizer: RowTokenizer, settings: dict[str, Any],
                   paths: list[str]) -> dict[str, list]:
    """Rows of one batch of records. A record that fails gives one row whose ``error`` holds the message
    (``kind`` 1: the align checks of ``check_align_records``, 2: the others), so the first error in
    record order is reported whatever the number of workers."""
    out: dict[str, list] = {k: [] for k in ("record_index", "prompt_ids", "response_ids", "scores", "h_tilde",
                                            "max_ids", "kind", "error")}

    def emit(i: int, prompt: list[int], responses: list[list[int]], scores, h, kind: int = 0, error: str = "") -> None:
        out["record_index"].append(i)
        out["prompt_ids"].append(prompt)
        out["response_ids"].append(responses)
        out["scores"].append(scores)
        out["h_tilde"].append(h)
        out["max_ids"].append([max(prompt + r) for r in responses])
        out["kind"].append(kind)
        out["error"].append(error)

    stage, K = settings["stage"], settings["num_responses"]
    for j, i in enumerate(indices):
        rec = _record(batch, j)
        where = f"{paths[batch['file'][j]]}: record {batch['row'][j]} (id={rec.id!r})"
        if stage == "align":
            error = alignment_problem(where, [r.score for r in rec.responses], rec.h_tilde, K=K,
                                      k_from=settings["k_from"], needs_h_tilde=settings["needs_h_tilde"])
            if error:
                emit(i, [], [], None, None, 1, error)
                continue
            targets = list(range(K))
        else:
            targets = sft_targets(rec, settings["target_source"])
        try:
            if not settings["allow_empty"]:
                check_nonempty(i, rec, targets)
            rows = record_rows(tokenizer, i, rec, targets) if targets else []
        except RecordError as err:
            emit(i, [], [], None, None, 2, str(err))
            continue
        if not rows:
            continue
        prompt = rows[0].input_ids[: rows[0].prompt_len]
        if stage == "align":
            emit(i, prompt, [r.input_ids[r.prompt_len :] for r in rows], [r.score for r in rec.responses], rec.h_tilde)
        else:
            for r in rows:
                emit(i, prompt, [r.input_ids[r.prompt_len :]], None, None)
    return out


# --------------------------------------------------------------------------------------------------
# The memory-mapped data
# --------------------------------------------------------------------------------------------------


class ArrowExamples(Sequence):
    """``Example`` objects made on access from the memory-mapped table (nothing is held per example)."""

    def __init__(self, table: Any):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    @staticmethod
    def _example(row: dict[str, Any]) -> Example:
        prompt = row["prompt_ids"]
        rows = [Row(prompt + r, len(prompt)) for r in row["response_ids"]]
        return Example(row["record_index"], rows, row["scores"], row["h_tilde"])

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._example(self.table.slice(i % n, 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Example]:
        for batch in self.table.to_batches(max_chunksize=BATCH):
            for row in batch.to_pylist():
                yield self._example(row)


@dataclass
class ArrowTrainingData(TrainingData):
    """``TrainingData`` over a tokenised folder; ``built`` says whether this process tokenised it."""

    records: int = 0
    path: Path | None = None
    built: bool = False
    dataset: Any = field(default=None, repr=False)

    @property
    def num_records(self) -> int:
        return self.records

    def mean_h_tilde(self) -> float:
        """Mean h̃ over the examples (``TrainingData.mean_h_tilde``), from the column."""
        import pyarrow.compute as pc

        return float(pc.mean(self.examples.table.column("h_tilde")).as_py())

    def max_token_ids(self) -> Any:
        """The largest token id of each row, flattened in row order (a pyarrow array)."""
        import pyarrow.compute as pc

        return pc.list_flatten(self.examples.table.column("max_ids"))


def _hash_arrays(digest: Any, array: Any) -> None:
    """Feed a (nested) list array's lengths and values into ``digest``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        for chunk in array.chunks:
            _hash_arrays(digest, chunk)
        return
    while pa.types.is_list(array.type):
        digest.update(pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype("int64").tobytes())
        array = array.flatten()
    digest.update(array.to_numpy(zero_copy_only=False).astype("int64").tobytes())


def token_hash(table: Any, stage: str, K: int) -> str:
    digest = hashlib.sha256(f"arrow{FORMAT}|{stage}|{K}".encode())
    for name in ("record_index", "prompt_ids", "response_ids"):
        _hash_arrays(digest, table.column(name))
    return digest.hexdigest()


def tokenizer_digest(tokenizer: RowTokenizer) -> str:
    """What the rows depend on in the tokenizer: its vocabulary and rules, special tokens, chat template."""
    tok = tokenizer.tok
    digest = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    digest.update(json.dumps([tok.eos_token_id, tok.bos_token_id, str(getattr(tok, "chat_template", None)),
                              tokenizer.use_template, tokenizer.max_prompt, tokenizer.max_response]).encode())
    return digest.hexdigest()


def data_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder/data`` (what ``save_to_disk`` wrote), by path
    relative to ``folder``."""
    return {p.relative_to(folder).as_posix(): file_entry(p) for p in sorted((folder / "data").rglob("*"))
            if p.is_file()}


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the fields of a ``dora_tokens.json`` other than ``digest`` (canonical JSON)."""
    fields = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def checked_meta(folder: Path, data_hash: str, digests: bool = True) -> dict[str, Any]:
    """The ``dora_tokens.json`` of ``folder`` once the folder matches it: the record readable, with its
    fields and its own digest intact, for these data (``data_hash``), and every file under ``data`` the
    one it lists (no file missing or extra, sizes first, then, with ``digests``, SHA-256). ``DamagedFolder``
    says what does not match."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedFolder(f"{META} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFolder(f"{META} cannot be read: {type(err).__name__}") from None
    if not isinstance(meta, dict):
        raise DamagedFolder(f"{META} is not a JSON object")
    wrong = [k for k, kind in META_FIELDS.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        raise DamagedFolder(f"{META} lacks {', '.join(wrong)} (altered, or written by an older version)")
    if meta["digest"] != meta_digest(meta):
        raise DamagedFolder(f"{META} was altered (its digest does not match its fields)")
    if meta["format"] != FORMAT or meta["data_hash"] != data_hash:
        raise DamagedFolder(f"{META} describes other data (format or data hash)")
    listed = meta["files"]
    present = sorted(p.relative_to(folder).as_posix() for p in (folder / "data").rglob("*") if p.is_file())
    missing = sorted(set(listed) - set(present))
    if missing or not listed:
        raise DamagedFolder(f"file {missing[0]} is missing" if missing else f"{META} lists no files")
    extra = sorted(set(present) - set(listed))
    if extra:
        raise DamagedFolder(f"file {extra[0]} is not listed in {META}")
    for name, want in listed.items():
        size = (folder / name).stat().st_size
        if size != want.get("bytes"):
            raise DamagedFolder(f"file {name} has {size} bytes, {META} says {want.get('bytes')}")
    for name, want in listed.items():
        if digests and file_entry(folder / name)["sha256"] != want.get("sha256"):
            raise DamagedFolder(f"file {name} differs from {META} (SHA-256)")
    return meta


def _open(path: Path, data_hash: str, built: bool, digests: bool = True) -> ArrowTrainingData:
    """The tokenised data of ``path``, memory-mapped once ``checked_meta`` passes; ``DamagedFolder`` else."""
    import datasets
    import pyarrow as pa

    try:
        meta = checked_meta(path, data_hash, digests)
        dataset = datasets.load_from_disk(str(path / "data"))
    except OSError as err:  # a file vanished or cannot be read while checking: another process set it aside
        raise DamagedFolder(f"cannot be read: {type(err).__name__}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, pa.ArrowException) as err:
        raise DamagedFolder(f"cannot be mapped: {type(err).__name__}") from None
    table = dataset.data.table
    if table.num_rows != meta["examples"]:
        raise DamagedFolder(f"the data hold {table.num_rows} rows, {META} says {meta['examples']}")
    return ArrowTrainingData(ArrowExamples(table), meta["num_responses"], data_hash, meta["token_hash"],
                             records=meta["num_records"], path=path, built=built, dataset=dataset)


def _set_aside(path: Path) -> None:
    """Move a damaged folder out of ``path`` in one rename (other processes see it whole or gone; those
    that mapped its files keep them), then remove it. Its temporary name is one that a later run's
    clean-up of interrupted writes removes (docs/design.md section 7.4) should this process die first."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another process set it aside first
        return
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    (ds_logging.enable_progress_bar if enabled else ds_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (ds_logging.enable_progress_bar if was else ds_logging.disable_progress_bar)()


def _build(path: Path, paths: list[str], tokenizer: RowTokenizer, settings: dict[str, Any], data_hash: str, *,
           columns: dict[str, str] | None, data_format: str, num_proc: int | None, progress: bool) -> None:
    import datasets
    import pyarrow.compute as pc

    work = temporary_dir(path)
    try:
        count = write_records_arrow(paths, work / "records.arrow", columns=columns,
                                    hf_cache=str(path.parent / "hf"), progress=progress, data_format=data_format)
        if count == 0:
            raise NoRecordsError(paths)
        records = datasets.Dataset.from_file(str(work / "records.arrow"))
        if settings["stage"] == "align" and settings["num_responses"] is None:
            settings = {**settings, "num_responses": len(records[0]["texts"])}
        procs = num_proc if num_proc is not None else (min(8, os.cpu_count() or 1) if count >= PARALLEL_FROM else 1)
        started = time.perf_counter()
        with _progress_bars(progress and count >= SHOW_MAP_BAR_FROM):
            tokens = records.map(
                tokenise_batch, batched=True, batch_size=BATCH, with_indices=True, remove_columns=records.column_names,
                num_proc=procs if procs > 1 else None, desc=f"tokenising ({procs} process{'es' * (procs > 1)})",
                fn_kwargs={"tokenizer": tokenizer, "settings": settings, "paths": [str(p) for p in paths]},
                cache_file_name=str(work / "tokens.arrow"), new_fingerprint=path.name,
                features=_token_features(),
            )
        table = tokens.data.table
        kinds = table.column("kind")
        if pc.max(kinds).as_py():
            for kind in (1, 2):
                hits = pc.indices_nonzero(pc.equal(kinds, kind))
                if len(hits):
                    raise RecordError(table.column("error")[hits[0].as_py()].as_py())
        if table.num_rows == 0:
            sources = sorted(set(pc.unique(pc.list_flatten(records.data.table.column("sources"))).to_pylist()))
            raise RecordError(
                f"no response has source {settings['target_source']!r} (data.target_source); sources in the data: "
                f"{sources}"
            )
        tokens = tokens.remove_columns(["kind", "error"])
        with _progress_bars(False):
            tokens.save_to_disk(str(work / "data"))
        meta = {"format": FORMAT, "num_records": count, "num_responses": settings["num_responses"] or 1,
                "examples": tokens.num_rows, "data_hash": data_hash, "sources": [str(p) for p in paths],
                "token_hash": token_hash(tokens.data.table, settings["stage"], settings["num_responses"] or 1),
                "settings": {k: v for k, v in settings.items()}, "tokenise_s": round(time.perf_counter() - started, 2),
                "num_proc": procs}
        del tokens, records, table
        for name in os.listdir(work):
            if name != "data":
                target = work / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        meta["files"] = data_digests(work)
        meta["digest"] = meta_digest(meta)
        (work / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        give_default_modes(work)
        try:
            os.rename(work, path)
        except OSError:  # a folder is there: another node or run finished the same key first, so use theirs
            if (path / META).is_file():
                shutil.rmtree(work, ignore_errors=True)
            else:  # a damaged folder (every build renames in a complete one): replace it
                _set_aside(path)
                os.rename(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _token_features() -> Any:
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({
        "record_index": datasets.Value("int64"), "prompt_ids": ids, "response_ids": datasets.List(ids),
        "scores": datasets.List(datasets.Value("float64")), "h_tilde": datasets.Value("float64"),
        "max_ids": ids, "kind": datasets.Value("int8"), "error": datasets.Value("string"),
    })


def _process_start() -> float:
    """This process's start as a Unix time (Linux ``/proc``); now, where that cannot be read."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells a folder at ``path`` from the one that replaces it (None when it has no record)."""
    try:
        meta = (path / META).stat()
        return path.stat().st_ino, meta.st_ino, meta.st_mtime_ns
    except OSError:
        return None


def checked_stamp(path: Path) -> Path:
    """Where local rank 0 records that it checked the folder at ``path`` (``_stamp``): beside its record,
    outside the ``data`` it lists, so that the stamp goes wherever the folder goes."""
    return path / "dora_checked.json"


def _stamp(path: Path, checked: Path) -> None:
    """Local rank 0 has checked every digest of the folder now at ``path`` in this launch: say so to the
    other local ranks of the launch (children of the same launcher), which then check only its record and
    sizes instead of reading every file again."""
    with atomic_write(checked) as handle:
        json.dump({"folder": _identity(path), "launcher": os.getppid()}, handle)


def _stamped(path: Path, checked: Path) -> bool:
    """Whether local rank 0 of this launch checked the folder now at ``path`` (``_stamp``)."""
    try:
        stamp = json.loads(checked.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    seen = _identity(path)
    return seen is not None and stamp == {"folder": list(seen), "launcher": os.getppid()}


def _wait(path: Path, marker: Path, data_hash: str, progress: bool) -> ArrowTrainingData:
    """The data of ``path`` once it holds an intact folder, which local rank 0 builds, or replaces when it
    is damaged; raise local rank 0's error when its build fails instead. The ranks of one launch start
    together, so an error written since shortly before this process started is this build's (an older
    one is an earlier run's, which local rank 0 removes when it starts)."""
    since = _process_start() - 10.0
    said = False
    damaged = None
    while True:
        seen = _identity(path)
        if seen is not None and seen != damaged:
            try:
                return _open(path, data_hash, built=False, digests=not _stamped(path, checked_stamp(path)))
            except DamagedFolder:
                damaged = seen  # local rank 0 finds the same, sets it aside and builds it again
        with contextlib.suppress(FileNotFoundError):
            if marker.stat().st_mtime >= since:
                raise RecordError(marker.read_text(encoding="utf-8"))
        if progress and not said:
            print(f"[dora-engine] waiting for local rank 0 to tokenise {path}", flush=True)
            said = True
        time.sleep(WAIT_POLL_S)


def load_tokenised(
    paths: Sequence[str], tokenizer: RowTokenizer, *, stage: str, target_source: str, num_responses: int | None,
    needs_h_tilde: bool, cache_dir: str | os.PathLike, allow_empty: bool = False, k_from: str | None = None,
    columns: dict[str, str] | None = None, data_format: str = SCHEMA, num_proc: int | None = None,
    progress: bool = False, local_rank: int | None = None,
) -> ArrowTrainingData:
    """The tokenised data of ``paths`` (read in ``data_format``: ``SCHEMA`` or a row-wise converter's
    name) from ``cache_dir``, built first when no run has built its key. Errors name the file and the
    record as ``data.tokenise`` does."""
    cache = Path(cache_dir)
    made = [p for p in [cache, *cache.parents] if not p.exists()]  # removed again when the build fails alone
    cache.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in paths]
    data_hash = file_hash(source_files(paths, str(cache / "hf")))
    settings = {"stage": stage, "target_source": target_source if stage == "sft" else None,
                "num_responses": num_responses if stage == "align" else None, "needs_h_tilde": needs_h_tilde,
                "allow_empty": allow_empty, "k_from": k_from}
    key = hashlib.sha256(json.dumps({"format": FORMAT, "data": data_hash, "tokenizer": tokenizer_digest(tokenizer),
                                     "settings": settings, "columns": columns or {}, "data_format": data_format},
                                    sort_keys=True).encode())
    path = cache / f"tokens-{key.hexdigest()[:24]}"
    marker = cache / f"{path.name}.error"
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank != 0:
        return _wait(path, marker, data_hash, progress)
    checked = checked_stamp(path)
    if os.path.lexists(path):
        try:
            data = _open(path, data_hash, built=False)
            _stamp(path, checked)
            return data
        except DamagedFolder as err:
            print(f"[dora-engine] warning: tokenised data in {path} cannot be used ({err}); tokenising again",
                  file=sys.stderr, flush=True)
            _set_aside(path)
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    waiting = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1) > 1
    try:
        _build(path, paths, tokenizer, settings, data_hash, columns=columns, data_format=data_format,
               num_proc=num_proc, progress=progress)
    except BaseException as err:
        if waiting:  # the other local ranks wait for the folder: tell them why it will not come
            with atomic_write(marker) as handle:
                handle.write(str(err) if isinstance(err, RecordError) else f"local rank 0 failed to tokenise: {err!r}")
        else:  # a failed run leaves nothing behind (docs/design.md section 7.2)
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    try:
        data = _open(path, data_hash, built=True)
        _stamp(path, checked)
        return data
    except DamagedFolder as err:  # the folder that won the rename (another run's) is damaged too
        raise TokenisedCacheError(f"tokenised data in {path} cannot be used right after tokenising ({err}); "
                                  "remove the folder and run again") from None
