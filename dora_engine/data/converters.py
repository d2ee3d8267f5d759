"""Converters from public preference formats to the dataset schema (docs/design.md section 3).

Formats (``FORMATS``; each converter takes parsed rows and returns ``list[Record]``; the row-wise ones,
``ROW_CONVERTERS``, also turn one row into one record for a training run's ``data.format``):

``trl``      ``from_trl``: TRL's preference layout, ``prompt`` / ``chosen`` / ``rejected``. Standard form:
             strings; conversational form: chat lists whose last message is the assistant's answer.
             The prompt is explicit (a ``prompt`` string or chat list; a string prompt that chosen/rejected
             already repeat as a user turn is theirs) or implicit: without ``prompt``, the chat lists'
             shared leading messages, or for strings their shared leading text up to its last whitespace
             (the responses start at that whitespace). Sources ``chosen`` / ``rejected``; scores
             ``score_chosen`` / ``score_rejected`` when present, else 1 / 0.
``hh``       ``from_hh_rlhf``: raw HH-RLHF, ``chosen`` / ``rejected`` full transcripts
             (``\\n\\nHuman: … \\n\\nAssistant: …``). Their longest common prefix is cut at its last
             ``\\n\\nAssistant:``; what precedes is the prompt, kept as a chat list of
             ``{"role": "user" | "assistant", "content"}`` so that chat templates apply; what follows in
             each transcript is the response. Sources ``chosen`` / ``rejected``, scores 1 / 0.
``tldr``     ``from_tldr``: the TL;DR summarisation comparisons (``info`` with ``post`` or ``article`` and
             optionally ``subreddit`` / ``title`` / ``id``, ``summaries`` of ``{text, policy}``, ``choice``
             the index of the preferred summary). Prompt ``SUBREDDIT: r/… / TITLE: … / POST: … / TL;DR:``
             (one line each, absent parts left out; ``ARTICLE:`` for articles); responses the summaries,
             source = ``policy`` (else ``summary<k>``), score 1 for the chosen summary and 0 for the
             others; ``meta.post_id`` = ``info.id``.
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
index (and id) and the field at fault. ``iter_rows`` reads the rows of any source: JSON lists and
JSONL (gzipped or not) directly, and what ``datasets`` loads (Parquet, Arrow, CSV, a folder, a hub id)
through ``dora_engine.data.hf``; bytes that cannot be decoded are a one-line ``RecordError`` naming the
file and the format it was read as.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dora_engine.data.hf import is_hf_source, iter_dataset_rows, load_hf
from dora_engine.data.schema import GZIP_MAGIC, Record, RecordError, Response, iter_jsonl
from dora_engine.errors import UserValueError
from dora_engine.prompt import Prompt

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def iter_rows(
    path: str | os.PathLike, *, split: str | None = None, cache_dir: str | None = None
) -> Iterator[Any]:
    """The rows of a source: a JSON list or JSONL file (either may be gzipped) read directly, anything
    else ``datasets`` loads (``dora_engine.data.hf.is_hf_source``) as plain dicts, streamed."""
    if is_hf_source(path):
        yield from iter_dataset_rows(load_hf(path, split=split, cache_dir=cache_dir))
        return
    path = Path(path)
    expected = "a JSON list or JSONL file"
    with open(path, "rb") as raw:
        opener = gzip.open if raw.read(2) == GZIP_MAGIC else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
            if data.startswith(b"["):
                data += handle.read()
    except (OSError, EOFError) as err:  # a damaged or truncated gzip stream
        raise RecordError(f"{path}: cannot be decompressed ({err}); expected {expected}, gzipped") from None
    if not data.startswith(b"["):
        yield from (obj for _, obj in iter_jsonl(path))
        return
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not UTF-8 text (byte {err.start + 1} of the list); expected {expected}") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); expected {expected}") from None
    yield from rows


def read_rows(path: str | os.PathLike) -> list[Any]:
    """All rows of ``path`` (``iter_rows``)."""
    return list(iter_rows(path))


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
    value = row.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RecordError(f"{where}: field {name!r} must be a number, got {value!r}")
    return float(value)


def trl_record(row: Any, index: int, id_prefix: str = "trl") -> Record:
    """One TRL prompt/chosen/rejected row (see the module docstring)."""
    _field(row, "chosen", index, (str, list))
    _field(row, "rejected", index, (str, list))
    where = _where(index, row)
    lead_c, chosen = _answer(row["chosen"], where, "chosen")
    lead_r, rejected = _answer(row["rejected"], where, "rejected")
    if lead_c != lead_r:
        raise RecordError(f"{where}: fields 'chosen' and 'rejected' differ before their final message")
    prompt: Prompt
    if row.get("prompt") is not None:
        prompt = _field(row, "prompt", index, (str, list))
        if isinstance(prompt, list):
            prompt = _check_messages(prompt, where, "prompt")
        prompt = _explicit_prompt(prompt, lead_c or [])
    elif lead_c:
        prompt = lead_c
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        prompt, chosen, rejected = _split_shared_text(chosen, rejected, where)
    else:
        raise RecordError(f"{where}: field 'prompt' is missing and chosen/rejected have no leading messages")
    responses = [
        Response(chosen, "chosen", _score(row, "score_chosen", 1.0, where)),
        Response(rejected, "rejected", _score(row, "score_rejected", 0.0, where)),
    ]
    return Record(_row_id(index, row, id_prefix), prompt, responses)


def _explicit_prompt(prompt: Prompt, leading: list[dict[str, str]]) -> Prompt:
    """The prompt of a row with ``prompt`` whose chosen/rejected repeat ``leading`` chat turns before their
    answer: those turns when they already hold a string prompt as a user turn (UltraFeedback-binarized's
    layout), else the prompt followed by them (TRL's multi-turn form)."""
    if not leading:
        return prompt
    if isinstance(prompt, str) and any(m["role"] == "user" and m["content"].strip() == prompt.strip()
                                       for m in leading):
        return leading
    base = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return base + leading


def _split_shared_text(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of TRL's implicit-prompt standard form: the prompt is the texts' shared
    beginning up to its last whitespace; each response keeps the rest, that whitespace first."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = next((j for j in range(len(shared) - 1, -1, -1) if shared[j].isspace()), 0)
    if not shared[:cut].strip():
        raise RecordError(f"{where}: field 'prompt' is missing and 'chosen'/'rejected' share no leading words")
    return shared[:cut], chosen[cut:], rejected[cut:]


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


def hh_record(row: Any, index: int, id_prefix: str = "hh") -> Record:
    """One raw HH-RLHF row (see the module docstring)."""
    chosen = _field(row, "chosen", index, str)
    rejected = _field(row, "rejected", index, str)
    where = _where(index, row)
    cut = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
    if cut < 0:
        raise RecordError(f"{where}: fields 'chosen'/'rejected' share no prefix ending in {ASSISTANT!r}")
    prompt = split_hh_transcript(chosen[:cut], f"{where}: field 'chosen'")
    answers = [text[cut + len(ASSISTANT):].strip() for text in (chosen, rejected)]
    for name, answer in zip(("chosen", "rejected"), answers, strict=True):
        if HUMAN in answer:
            raise RecordError(f"{where}: field {name!r} continues past its final assistant turn")
    responses = [Response(answers[0], "chosen", 1.0), Response(answers[1], "rejected", 0.0)]
    return Record(_row_id(index, row, id_prefix), prompt, responses)


def tldr_prompt(info: dict[str, Any]) -> str:
    """``SUBREDDIT: r/<subreddit>``, ``TITLE: <title>``, ``POST: <post>`` (or ``ARTICLE: <article>``),
    ``TL;DR:`` on their own lines; parts that ``info`` lacks are left out."""
    is_post = info.get("post") is not None
    lines = [f"SUBREDDIT: r/{info['subreddit']}" if info.get("subreddit") else None,
             f"TITLE: {info['title']}" if info.get("title") else None,
             f"POST: {info['post']}" if is_post else f"ARTICLE: {info.get('article')}", "TL;DR:"]
    return "\n".join(line for line in lines if line is not None)


def tldr_record(row: Any, index: int, id_prefix: str = "tldr") -> Record:
    """One TL;DR comparison row (see the module docstring)."""
    info = _field(row, "info", index, dict)
    summaries = _field(row, "summaries", index, list)
    choice = _field(row, "choice", index, int)
    where = _where(index, row)
    body = info.get("post") if info.get("post") is not None else info.get("article")
    if not isinstance(body, str) or not body.strip():
        raise RecordError(f"{where}: field 'info.post' (or 'info.article') must be a non-empty string")
    for k, summary in enumerate(summaries):
        if not (isinstance(summary, dict) and isinstance(summary.get("text"), str)):
            raise RecordError(f"{where}: field 'summaries[{k}]' must be an object with a string 'text'")
    if not 0 <= choice < len(summaries):
        raise RecordError(f"{where}: field 'choice' = {choice} is not the index of one of the "
                          f"{len(summaries)} summaries")
    responses = [Response(s["text"], s.get("policy") or f"summary{k}", 1.0 if k == choice else 0.0)
                 for k, s in enumerate(summaries)]
    meta = {"post_id": str(info["id"])} if info.get("id") is not None else {}
    return Record(_row_id(index, row, id_prefix), tldr_prompt(info), responses, meta=meta)


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


def authors_record(row: Any, index: int, id_prefix: str = "dora") -> Record:
    """One row of the DoRA authors' released format with h̃ from ``probs`` (see the module docstring)."""
    from dora_engine.data.weights import h_tilde

    query = _field(row, "query", index, (str, list))
    texts = _field(row, "responses", index, list)
    scores = _field(row, "scores", index, list)
    probs = _field(row, "probs", index, list)
    where = _where(index, row)
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
    return Record(_row_id(index, row, id_prefix), prompt, responses, h_tilde=float(h_tilde(probs)))


def _check_items(values: list, kinds: type | tuple[type, ...], where: str, name: str) -> None:
    for k, v in enumerate(values):
        if not isinstance(v, kinds) or isinstance(v, bool):
            raise RecordError(f"{where}: field '{name}[{k}]' has the wrong type ({type(v).__name__})")


ROW_CONVERTERS: dict[str, Callable[[Any, int, str], Record]] = {
    "trl": trl_record,
    "hh": hh_record,
    "tldr": tldr_record,
    "authors": authors_record,
}
"""The formats whose rows convert one by one (a training run's ``data.format`` takes them)."""


def convert_rows(fmt: str, rows: Iterable[Any], id_prefix: str, drop_empty: bool = True) -> list[Record]:
    """The records of ``rows`` in the row-wise format ``fmt`` (ids default to ``<id_prefix>-<row index>``),
    validated, ids unique; records with an empty response dropped with a warning when ``drop_empty``."""
    convert = ROW_CONVERTERS[fmt]
    return _finish([convert(row, i, id_prefix) for i, row in enumerate(rows)], drop_empty, fmt)


def from_trl(rows: Iterable[Any], id_prefix: str = "trl", drop_empty: bool = True) -> list[Record]:
    """TRL-style prompt/chosen/rejected rows (``trl_record``)."""
    return convert_rows("trl", rows, id_prefix, drop_empty)


def from_hh_rlhf(rows: Iterable[Any], id_prefix: str = "hh", drop_empty: bool = True) -> list[Record]:
    """Raw HH-RLHF transcripts (``hh_record``)."""
    return convert_rows("hh", rows, id_prefix, drop_empty)


def from_tldr(rows: Iterable[Any], id_prefix: str = "tldr", drop_empty: bool = True) -> list[Record]:
    """TL;DR summarisation comparisons (``tldr_record``)."""
    return convert_rows("tldr", rows, id_prefix, drop_empty)


def from_authors(rows: Iterable[Any], id_prefix: str = "dora", drop_empty: bool = True) -> list[Record]:
    """The DoRA authors' released rows with h̃ from ``probs`` (``authors_record``)."""
    return convert_rows("authors", rows, id_prefix, drop_empty)


FORMATS: dict[str, Callable[..., list[Record]]] = {
    "trl": from_trl,
    "hh": from_hh_rlhf,
    "tldr": from_tldr,
    "alpaca": from_alpaca_eval,
    "authors": from_authors,
}


def iter_converted(fmt: str, source: str | os.PathLike, *, id_prefix: str, cache_dir: str | None = None
                   ) -> Iterator[Record]:
    """Validated records of one source in the row-wise format ``fmt``, streamed (a training run's
    ``data.format``); empty responses are kept for the run's own check, and duplicate ids are the
    caller's to refuse."""
    convert = ROW_CONVERTERS[fmt]
    for i, row in enumerate(iter_rows(source, cache_dir=cache_dir)):
        yield Record.from_dict(convert(row, i, id_prefix).to_dict(), index=i)


def convert_files(
    fmt: str, paths: Sequence[str | os.PathLike], target: str | None = None, drop_empty: bool = True,
    split: str | None = None,
) -> list[Record]:
    """Read ``paths`` (all rows concatenated; any source of ``iter_rows``, ``split`` naming the split of
    a ``datasets`` source) and convert them with the converter of ``fmt``.

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
    rows = [row for path in paths for row in iter_rows(path, split=split)]
    if fmt == "alpaca":
        return from_alpaca_eval(rows, target, drop_empty=drop_empty)
    return FORMATS[fmt](rows, drop_empty=drop_empty)
