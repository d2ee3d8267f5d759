"""Converters from public preference formats to the dataset schema (docs/design.md section 3).

Formats (``FORMATS``; each converter takes parsed rows and returns ``list[Record]``):

``trl``      ``from_trl``: TRL-style ``prompt`` / ``chosen`` / ``rejected``. The prompt is a string or a
             chat list; chosen/rejected are strings or chat lists whose last message is the assistant's
             answer. Without ``prompt`` the chat lists' shared leading messages are the prompt (TRL's
             implicit-prompt form). Sources ``chosen`` / ``rejected``; scores ``score_chosen`` /
             ``score_rejected`` when present, else 1 / 0.
``hh``       ``from_hh_rlhf``: raw HH-RLHF, ``chosen`` / ``rejected`` full transcripts
             (``\\n\\nHuman: … \\n\\nAssistant: …``). Their longest common prefix is cut at its last
             ``\\n\\nAssistant:``; what precedes is the prompt, kept as a chat list of
             ``{"role": "user" | "assistant", "content"}`` so that chat templates apply; what follows in
             each transcript is the response. Sources ``chosen`` / ``rejected``, scores 1 / 0.
``alpaca``   ``from_alpaca_eval``: AlpacaEval ``model_outputs`` rows (``instruction``, ``output``,
             ``generator``) of several generators, joined on ``instruction`` (instructions missing from
             some generator are dropped with a warning). One response per generator, the ``target``
             generator first, the others by name; source = generator name; no scores (``data score``
             fills them); ``meta.target`` names the target.
``authors``  ``from_authors``: the DoRA authors' released format, ``query``, ``responses`` (list of
             str), ``scores`` (list of float), ``probs`` (classifier probability per response) and
             optionally ``sources``; ``h_tilde`` follows from ``probs`` by docs/design.md section 4 with
             γ = 1 and β_k = 1/n, i.e. h̃ = mean_k n·c_k (``dora_engine.data.weights.h_tilde``).
             Sources default to ``slot0``, ``slot1``, … .

Records whose response text is empty are dropped with a warning naming them (by default): an
empty response has no token to score, which the loss rejects. Ids come from an ``id`` field when
present, else ``<prefix>-<row index>``. A malformed row raises ``RecordError`` naming the row
index (and id) and the field at fault. ``read_rows`` reads JSON lists and JSONL, gzipped or not.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dora_engine.data.schema import Record, RecordError, Response, iter_jsonl
from dora_engine.errors import UserValueError
from dora_engine.prompt import Prompt

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def read_rows(path: str | os.PathLike) -> list[Any]:
    """Rows of a JSON list file or a JSONL file (either may be gzipped)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        head = handle.read(1)
        while head and head.isspace():
            head = handle.read(1)
        if head == "[":
            try:
                rows = json.loads(head + handle.read())
            except json.JSONDecodeError as err:
                raise RecordError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
            return rows
    return [obj for _, obj in iter_jsonl(path)]


def _where(index: int, row: Any) -> str:
    rid = row.get("id") if isinstance(row, dict) else None
    return f"row {index}" + (f" (id={rid!r})" if rid is not None else "")


def _row_id(index: int, row: dict, prefix: str) -> str:
    rid = row.get("id")
    return str(rid) if rid is not None and str(rid) != "" else f"{prefix}-{index:06d}"


def _field(row: Any, name: str, index: int, kinds: type | tuple[type, ...]) -> Any:
    if not isinstance(row, dict):
        raise RecordError(f"row {index}: expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise RecordError(f"{_where(index, row)}: field {name!r} is missing")
    value = row[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        names = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise RecordError(f"{_where(index, row)}: field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _check_messages(messages: list, where: str, name: str) -> list[dict[str, str]]:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RecordError(f"{where}: field '{name}[{i}]' must be an object with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _finish(records: list[Record], drop_empty: bool, fmt: str) -> list[Record]:
    """Validate the converted records against the schema (unique ids included); drop empty-response ones."""
    seen: set[str] = set()
    for n, rec in enumerate(records):
        Record.from_dict(rec.to_dict(), index=n)
        if rec.id in seen:
            raise RecordError(f"{fmt}: record {n} (id={rec.id!r}): duplicate id")
        seen.add(rec.id)
    if not drop_empty:
        return records
    kept, dropped = [], []
    for rec in records:
        (kept if all(r.text.strip() for r in rec.responses) else dropped).append(rec)
    if dropped:
        shown = ", ".join(rec.id for rec in dropped[:10]) + (", …" if len(dropped) > 10 else "")
        warnings.warn(f"{fmt}: dropped {len(dropped)} record(s) with an empty response: {shown}", stacklevel=3)
    return kept


def _answer(value: Any, where: str, name: str) -> tuple[list[dict[str, str]] | None, str]:
    """(leading messages or None, answer text) of a chosen/rejected value."""
    if isinstance(value, str):
        return None, value
    if isinstance(value, list) and value:
        messages = _check_messages(value, where, name)
        if messages[-1]["role"] != "assistant":
            raise RecordError(f"{where}: field '{name}[-1]' must be the assistant's message, "
                              f"got role {messages[-1]['role']!r}")
        return messages[:-1], messages[-1]["content"]
    raise RecordError(f"{where}: field {name!r} must be a string or a non-empty chat list")


def _score(row: dict, name: str, default: float, where: str) -> float:
    value = row.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RecordError(f"{where}: field {name!r} must be a number, got {value!r}")
    return float(value)


def from_trl(rows: Iterable[Any], id_prefix: str = "trl", drop_empty: bool = True) -> list[Record]:
    """TRL-style prompt/chosen/rejected rows (see the module docstring)."""
    records = []
    for i, row in enumerate(rows):
        _field(row, "chosen", i, (str, list))
        _field(row, "rejected", i, (str, list))
        where = _where(i, row)
        lead_c, chosen = _answer(row["chosen"], where, "chosen")
        lead_r, rejected = _answer(row["rejected"], where, "rejected")
        if lead_c != lead_r:
            raise RecordError(f"{where}: fields 'chosen' and 'rejected' differ before their final message")
        prompt: Prompt
        if "prompt" in row:
            prompt = _field(row, "prompt", i, (str, list))
            if isinstance(prompt, list):
                prompt = _check_messages(prompt, where, "prompt")
            prompt = _with_leading(prompt, lead_c or [])
        elif lead_c:
            prompt = lead_c
        else:
            raise RecordError(f"{where}: field 'prompt' is missing and chosen/rejected have no leading messages")
        responses = [
            Response(chosen, "chosen", _score(row, "score_chosen", 1.0, where)),
            Response(rejected, "rejected", _score(row, "score_rejected", 0.0, where)),
        ]
        records.append(Record(_row_id(i, row, id_prefix), prompt, responses))
    return _finish(records, drop_empty, "trl")


def _with_leading(prompt: Prompt, leading: list[dict[str, str]]) -> Prompt:
    """Append chat turns that chosen/rejected repeat before their answer (TRL's multi-turn form)."""
    if not leading:
        return prompt
    base = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return base + leading


def split_hh_transcript(text: str, where: str = "transcript") -> list[dict[str, str]]:
    """``\\n\\nHuman: a\\n\\nAssistant: b`` -> [{"role": "user", "content": "a"}, {"role": "assistant", …}]."""
    messages = []
    rest = text
    if not rest.startswith(HUMAN):
        raise RecordError(f"{where} must start with {HUMAN!r}")
    while rest:
        role = "user" if rest.startswith(HUMAN) else "assistant"
        rest = rest[len(HUMAN if role == "user" else ASSISTANT):]
        ends = [j for j in (rest.find(HUMAN), rest.find(ASSISTANT)) if j >= 0]
        end = min(ends) if ends else len(rest)
        messages.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    return messages


def from_hh_rlhf(rows: Iterable[Any], id_prefix: str = "hh", drop_empty: bool = True) -> list[Record]:
    """Raw HH-RLHF transcripts (see the module docstring)."""
    records = []
    for i, row in enumerate(rows):
        chosen = _field(row, "chosen", i, str)
        rejected = _field(row, "rejected", i, str)
        where = _where(i, row)
        cut = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
        if cut < 0:
            raise RecordError(f"{where}: fields 'chosen'/'rejected' share no prefix ending in {ASSISTANT!r}")
        prompt = split_hh_transcript(chosen[:cut], f"{where}: field 'chosen'")
        answers = [text[cut + len(ASSISTANT):].strip() for text in (chosen, rejected)]
        for name, answer in zip(("chosen", "rejected"), answers, strict=True):
            if HUMAN in answer:
                raise RecordError(f"{where}: field {name!r} continues past its final assistant turn")
        responses = [Response(answers[0], "chosen", 1.0), Response(answers[1], "rejected", 0.0)]
        records.append(Record(_row_id(i, row, id_prefix), prompt, responses))
    return _finish(records, drop_empty, "hh")


def from_alpaca_eval(
    outputs: Iterable[Any], target: str, id_prefix: str = "alpaca", drop_empty: bool = True
) -> list[Record]:
    """AlpacaEval model_outputs rows of several generators joined on instruction (see the module docstring)."""
    by_generator: dict[str, dict[str, str]] = {}
    position: dict[str, int] = {}  # instruction -> first appearance; gives ids that do not depend on the join
    for i, row in enumerate(outputs):
        instruction = _field(row, "instruction", i, str)
        output = _field(row, "output", i, str)
        generator = _field(row, "generator", i, str)
        answers = by_generator.setdefault(generator, {})
        if instruction in answers:
            raise RecordError(f"{_where(i, row)}: field 'instruction' repeats for generator {generator!r}")
        answers[instruction] = output
        position.setdefault(instruction, len(position))
    if target not in by_generator:
        raise UserValueError(f"target generator {target!r} not found; generators: {sorted(by_generator)}")
    if len(by_generator) < 2:
        raise UserValueError(f"need outputs of at least 2 generators to join, got {sorted(by_generator)}")
    generators = [target, *sorted(g for g in by_generator if g != target)]
    common = [ins for ins in position if all(ins in by_generator[g] for g in generators)]
    if len(common) < len(position):
        warnings.warn(f"alpaca: dropped {len(position) - len(common)} instruction(s) not answered by every "
                      "generator", stacklevel=2)
    records = [
        Record(f"{id_prefix}-{position[ins]:06d}", ins, [Response(by_generator[g][ins], g) for g in generators],
               meta={"target": target})
        for ins in common
    ]
    return _finish(records, drop_empty, "alpaca")


def from_authors(rows: Iterable[Any], id_prefix: str = "dora", drop_empty: bool = True) -> list[Record]:
    """The DoRA authors' released rows with h̃ from ``probs`` (see the module docstring)."""
    from dora_engine.data.weights import h_tilde

    records = []
    for i, row in enumerate(rows):
        query = _field(row, "query", i, (str, list))
        texts = _field(row, "responses", i, list)
        scores = _field(row, "scores", i, list)
        probs = _field(row, "probs", i, list)
        where = _where(i, row)
        sources = row.get("sources", [f"slot{k}" for k in range(len(texts))])
        for name, values in (("scores", scores), ("probs", probs), ("sources", sources)):
            if not isinstance(values, list) or len(values) != len(texts):
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise RecordError(f"{where}: field {name!r} must have one entry per response "
                                  f"({len(texts)}), got {got}")
        _check_items(texts, str, where, "responses")
        _check_items(sources, str, where, "sources")
        _check_items(scores, (int, float), where, "scores")
        _check_items(probs, (int, float), where, "probs")
        outside = [k for k, c in enumerate(probs) if not 0.0 <= c <= 1.0]
        if outside:
            raise RecordError(f"{where}: field 'probs[{outside[0]}]' = {probs[outside[0]]!r} is outside [0, 1]")
        prompt = _check_messages(query, where, "query") if isinstance(query, list) else query
        responses = [Response(t, s, float(v)) for t, s, v in zip(texts, sources, scores, strict=True)]
        records.append(Record(_row_id(i, row, id_prefix), prompt, responses, h_tilde=float(h_tilde(probs))))
    return _finish(records, drop_empty, "authors")


def _check_items(values: list, kinds: type | tuple[type, ...], where: str, name: str) -> None:
    for k, v in enumerate(values):
        if not isinstance(v, kinds) or isinstance(v, bool):
            raise RecordError(f"{where}: field '{name}[{k}]' has the wrong type ({type(v).__name__})")


FORMATS: dict[str, Callable[..., list[Record]]] = {
    "trl": from_trl,
    "hh": from_hh_rlhf,
    "alpaca": from_alpaca_eval,
    "authors": from_authors,
}


def convert_files(
    fmt: str, paths: Sequence[str | os.PathLike], target: str | None = None, drop_empty: bool = True
) -> list[Record]:
    """Read ``paths`` (all rows concatenated) and convert them with the converter of ``fmt``.

    ``target`` is required for ``alpaca`` (the target generator) and refused for the other formats.
    """
    if fmt not in FORMATS:
        raise UserValueError(f"unknown format {fmt!r}; valid: {sorted(FORMATS)}")
    if not paths:
        raise UserValueError("no input files given")
    if fmt == "alpaca" and target is None:
        raise UserValueError("format 'alpaca' needs target= (the generator whose outputs are the target source)")
    if fmt != "alpaca" and target is not None:
        raise UserValueError(f"target= applies to format 'alpaca' only, not {fmt!r}")
    rows = [row for path in paths for row in read_rows(path)]
    if fmt == "alpaca":
        return from_alpaca_eval(rows, target, drop_empty=drop_empty)
    return FORMATS[fmt](rows, drop_empty=drop_empty)
