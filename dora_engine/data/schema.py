"""The preference-data schema (docs/design.md section 3): one record per prompt with K ≥ 2 responses.

```json
{"id": "hh-0001", "prompt": "…" | [{"role": "user", "content": "…"}, …],
 "responses": [{"text": "…", "source": "chosen", "score": 1.0}, …],
 "h_tilde": 1.37, "meta": {"corrupted": false}}
```
Every validation error names the record (index and id) and the field at fault.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write
from dora_engine.errors import UserError
from dora_engine.prompt import Prompt

H_TILDE_MAX = 1e6
"""The largest h̃ a record may carry: calibration gives h̃ < K (docs/design.md section 4.5), and h̃·ℓ must stay far
from float32's overflow (3.4e38) for any loss value."""


class RecordError(UserError, ValueError):
    """A record that does not follow the schema; the message names the record and the field."""


@dataclass
class Response:
    text: str
    source: str
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "source": self.source}
        if self.score is not None:
            out["score"] = self.score
        return out


@dataclass
class Record:
    id: str
    prompt: Prompt
    responses: list[Response]
    h_tilde: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_responses(self) -> int:
        return len(self.responses)

    @property
    def has_scores(self) -> bool:
        return all(r.score is not None for r in self.responses)

    def prompt_text(self) -> str:
        """The prompt as plain text (``prompt_as_text``)."""
        return prompt_as_text(self.prompt)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "responses": [r.to_dict() for r in self.responses],
        }
        if self.h_tilde is not None:
            out["h_tilde"] = self.h_tilde
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, data: Any, index: int | None = None) -> Record:
        """Validate and build a record; ``index`` (its position in a file) goes into error messages."""
        where = f"record {index}" if index is not None else "record"
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
        rid = data.get("id")
        if rid is not None:
            where += f" (id={rid!r})"
        unknown = sorted(set(data) - {"id", "prompt", "responses", "h_tilde", "meta"})
        if unknown:
            raise RecordError(f"{where}: unknown field(s) {unknown}")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or str(rid) == "":
            raise RecordError(f"{where}: field 'id' must be a non-empty string, got {rid!r}")
        prompt = data.get("prompt")
        _check_prompt(prompt, where)
        responses = data.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            got = len(responses) if isinstance(responses, list) else type(responses).__name__
            raise RecordError(f"{where}: field 'responses' must be a list of at least 2 responses, got {got}")
        parsed = [_response(r, f"{where}: field 'responses[{k}]") for k, r in enumerate(responses)]
        h = data.get("h_tilde")
        if h is not None and not (_is_number(h) and math.isfinite(h) and 0 < h <= H_TILDE_MAX):
            raise RecordError(
                f"{where}: field 'h_tilde' must be a finite number > 0 and ≤ {H_TILDE_MAX:g}, got {h!r} (calibration "
                "gives h̃ below the number of responses; larger values can overflow h̃·ℓ)"
            )
        meta = data.get("meta", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise RecordError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
        return cls(str(rid), prompt, parsed, None if h is None else float(h), dict(meta))


def prompt_as_text(prompt: Prompt) -> str:
    """A prompt as plain text: chat prompts joined as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RecordError(f"{where}: field 'prompt' is empty")
        return
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise RecordError(
                    f"{where}: field 'prompt[{i}]' must be an object with string 'role' and 'content'"
                )
        return
    raise RecordError(f"{where}: field 'prompt' must be a non-empty string or list of chat messages")


def _response(data: Any, where: str) -> Response:
    if not isinstance(data, dict):
        raise RecordError(f"{where}' must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - {"text", "source", "score"})
    if unknown:
        raise RecordError(f"{where}' has unknown field(s) {unknown}")
    text, source, score = data.get("text"), data.get("source"), data.get("score")
    if not isinstance(text, str):
        raise RecordError(f"{where}.text' must be a string, got {type(text).__name__}")
    if not isinstance(source, str) or not source:
        raise RecordError(f"{where}.source' must be a non-empty string, got {source!r}")
    if score is not None and not (_is_number(score) and math.isfinite(score)):
        raise RecordError(f"{where}.score' must be a finite number, got {score!r}")
    return Response(text, source, None if score is None else float(score))


GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes (whatever its name says)."""
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line index, parsed object) for each non-blank line of a JSONL file.

    A gzip file is read as such whether or not its name ends in ``.gz``; a byte-order mark at the start
    is skipped. A line that is not UTF-8 or not JSON is a ``RecordError`` naming the file, the line and the
    expected format.
    """
    path = Path(path)
    compressed = _is_gzip(path)
    if path.suffix == ".gz" and not compressed:
        raise RecordError(f"{path}: the name ends in .gz but the file is not gzip-compressed")
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        lines = enumerate(handle)
        while True:
            try:
                i, raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError) as err:  # a damaged or truncated gzip stream
                raise RecordError(f"{path}: cannot be decompressed ({err}); expected gzipped JSONL") from None
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as err:
                bad = raw[err.start : err.start + 1]
                raise RecordError(
                    f"{path}: line {i + 1} is not valid UTF-8 (byte {err.start + 1}: {bad!r}); expected JSONL"
                ) from None
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}: line {i + 1} is not valid JSON ({err.msg})") from None


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    """Validated records of a JSONL dataset, one at a time (only the ids are kept, to refuse duplicates)."""
    seen = set()
    for n, (_, obj) in enumerate(iter_jsonl(path)):
        rec = Record.from_dict(obj, index=n)
        if rec.id in seen:
            raise RecordError(f"record {n} (id={rec.id!r}): duplicate id")
        seen.add(rec.id)
        yield rec


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read and validate a JSONL dataset; ids must be unique."""
    return list(iter_records(path))


class RecordsFile(Sequence):
    """The records of a JSONL file, read from disk each time they are iterated (never held at once)."""

    def __init__(self, path: str | os.PathLike, count: int):
        self.path = Path(path)
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Record]:
        return iter_records(self.path)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return read_records(self.path)[index]
        n = self.count
        if not -n <= index < n:
            raise IndexError(index)
        return next(rec for i, rec in enumerate(self) if i == index % n)


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records as JSONL atomically (temporary file, then rename). Returns the count."""
    path = Path(path)
    count = 0
    if path.suffix == ".gz":
        with atomic_write(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz:
            for rec in records:
                gz.write((json.dumps(rec.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))
                count += 1
        return count
    with atomic_write(path) as handle:
        for rec in records:
            handle.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count
