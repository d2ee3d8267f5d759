"""Converters: TRL, raw HH-RLHF, AlpacaEval multi-generator and the authors' format (docs/design.md section 3)."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

from dora_engine.cli import main as cli_main
from dora_engine.data.converters import (
    convert_files,
    from_alpaca_eval,
    from_authors,
    from_hh_rlhf,
    from_trl,
    read_rows,
    split_hh_transcript,
)
from dora_engine.data.schema import RecordError, read_records

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILE = DATA / "hh-rlhf-harmless-base-test.jsonl.gz"
ALPACA_FILES = sorted((DATA / "alpaca_eval").glob("outputs-*.jsonl.gz"))


def _gz_rows(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.skipif(not HH_FILE.exists(), reason="../shared/data is absent")
def test_hh_rlhf_real_file():
    rows = _gz_rows(HH_FILE)
    assert len(rows) == 2312
    expected = [i for i, r in enumerate(rows)
                if not any(t.rstrip().endswith("\n\nAssistant:") for t in (r["chosen"], r["rejected"]))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = convert_files("hh", [HH_FILE])
    assert len(records) == len(expected) < 2312
    assert any("empty response" in str(w.message) for w in caught)
    for rec, i in zip(records, expected, strict=True):
        assert rec.id == f"hh-{i:06d}"
        assert [r.source for r in rec.responses] == ["chosen", "rejected"]
        assert [r.score for r in rec.responses] == [1.0, 0.0]
        assert all(r.text for r in rec.responses) and rec.prompt[-1]["role"] == "user"
        # the transcripts rebuild from prompt turns + final answer (up to whitespace) ...
        turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in rec.prompt)
        for response, transcript in zip(rec.responses, (rows[i]["chosen"], rows[i]["rejected"]), strict=True):
            assert (turns + "\n\nAssistant: " + response.text).split() == transcript.split()
        # ... and the split is at the last turn boundary before the transcripts diverge
        a, b = (r.text for r in rec.responses)
        common = a[: next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))]
        assert "\n\nAssistant:" not in common


@pytest.mark.skipif(len(ALPACA_FILES) != 7, reason="../shared/data/alpaca_eval is absent")
def test_alpaca_eval_real_files_join_seven_generators(tmp_path, capsys):
    per_file = [_gz_rows(p) for p in ALPACA_FILES]
    generators = sorted(rows[0]["generator"] for rows in per_file)
    empty = {r["instruction"] for rows in per_file for r in rows if not r["output"].strip()}
    assert cli_main(["data", "convert", "--format", "alpaca", "--target", "gpt4_1106_preview",
                         *map(str, ALPACA_FILES), "--out", str(tmp_path / "a.jsonl")]) == 0
    assert f"warning: alpaca: dropped {len(empty)} record" in capsys.readouterr().err
    records = read_records(tmp_path / "a.jsonl")
    assert len(records) == 805 - len(empty)
    others = sorted(g for g in generators if g != "gpt4_1106_preview")
    outputs = {(r["generator"], r["instruction"]): r["output"] for rows in per_file for r in rows}
    for rec in records:
        assert [r.source for r in rec.responses] == ["gpt4_1106_preview", *others]
        assert all(r.text.strip() and r.score is None for r in rec.responses)
        assert all(outputs[(r.source, rec.prompt)] == r.text for r in rec.responses)
        assert rec.meta == {"target": "gpt4_1106_preview"}


def test_trl_string_chat_and_implicit_prompt_forms():
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": [{"role": "user", "content": "Hi?"}],
         "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "No."}], "score_chosen": 8.5, "score_rejected": 2},
        {"id": "implicit", "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]},
    ]
    recs = from_trl(rows)
    assert [r.id for r in recs] == ["trl-000000", "trl-000001", "implicit"]
    assert recs[0].prompt == "Hi?" and [r.text for r in recs[0].responses] == ["Hello.", "Go away."]
    assert [r.score for r in recs[0].responses] == [1.0, 0.0]
    assert [r.score for r in recs[1].responses] == [8.5, 2.0]
    assert recs[2].prompt == [{"role": "user", "content": "Q"}]
    assert [r.text for r in recs[2].responses] == ["A", "B"]


def test_hh_split_and_prompt_turns():
    row = {"chosen": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: Yes sure",
           "rejected": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant: Yes no"}
    rec = from_hh_rlhf([row])[0]
    assert rec.prompt == [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."},
                          {"role": "user", "content": "c?"}]
    assert [r.text for r in rec.responses] == ["Yes sure", "Yes no"]
    assert split_hh_transcript("\n\nHuman: x") == [{"role": "user", "content": "x"}]


def test_authors_format_h_tilde_is_mean_of_n_times_c():
    rows = [{"query": "q", "responses": ["a", "b", "c"], "scores": [0.5, 0.1, 0.9], "probs": [0.9, 0.2, 0.4]},
            {"query": "q2", "responses": ["a", "b"], "scores": [1, 0], "probs": [1.0, 0.0],
             "sources": ["golden", "mistral"]}]
    recs = from_authors(rows)
    assert recs[0].h_tilde == pytest.approx((3 * 0.9 + 3 * 0.2 + 3 * 0.4) / 3)
    assert [r.source for r in recs[0].responses] == ["slot0", "slot1", "slot2"]
    assert [r.score for r in recs[0].responses] == [0.5, 0.1, 0.9]
    # c clamped to [1e-6, 1 - 1e-6]: term = n c for beta = 1/n, gamma = 1
    assert recs[1].h_tilde == pytest.approx((2 * (1 - 1e-6) + 2 * 1e-6) / 2)
    assert [r.source for r in recs[1].responses] == ["golden", "mistral"]


def test_read_rows_json_list_and_jsonl(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(rows[0]) + "\n")
    assert read_rows(tmp_path / "a.json") == rows == read_rows(tmp_path / "b.jsonl.gz")


@pytest.mark.parametrize(
    "converter, row, match",
    [
        (from_trl, {"prompt": "p", "rejected": "r"}, r"row 0: field 'chosen' is missing"),
        (from_trl, {"id": 7, "prompt": 3, "chosen": "c", "rejected": "r"}, r"row 0 \(id=7\): field 'prompt' must"),
        (from_trl, {"chosen": "c", "rejected": "r"}, "field 'prompt' is missing"),
        (from_trl, {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"}, r"chosen\[-1\]"),
        (from_trl, {"prompt": " ", "chosen": "c", "rejected": "r"}, r"record 0 \(id='trl-000000'\): field 'prompt'"),
        (from_hh_rlhf, {"chosen": "hello", "rejected": "world"}, "share no prefix"),
        (from_authors, {"query": "q", "responses": ["a", "b"], "scores": [1.0], "probs": [0.1, 0.2]},
         r"field 'scores' must have one entry per response \(2\), got 1"),
        (from_authors, {"query": "q", "responses": ["a", "b"], "scores": [1, 0], "probs": [0.1, 1.5]},
         r"probs\[1\]"),
        (from_authors, {"query": "q", "responses": ["a", 2], "scores": [1, 0], "probs": [0.1, 0.5]},
         r"responses\[1\]"),
        (from_authors, {"query": "q", "responses": ["a", "b"], "scores": [1, float("nan")], "probs": [0.1, 0.5]},
         r"responses\[1\]\.score' must be a finite number"),
    ],
)
def test_bad_rows_name_the_row_and_field(converter, row, match):
    with pytest.raises(RecordError, match=match):
        converter([row])


def test_duplicate_ids_are_refused():
    row = {"id": "same", "prompt": "p", "chosen": "c", "rejected": "r"}
    with pytest.raises(RecordError, match=r"record 1 \(id='same'\): duplicate id"):
        from_trl([row, row])


def test_alpaca_bad_input():
    rows = [{"instruction": "i", "output": "o", "generator": "g1"},
            {"instruction": "i", "output": "o2", "generator": "g2"}]
    with pytest.raises(ValueError, match="target generator 'x' not found"):
        from_alpaca_eval(rows, "x")
    with pytest.raises(RecordError, match="row 2: field 'instruction' repeats"):
        from_alpaca_eval([*rows, rows[0]], "g1")
    with pytest.raises(RecordError, match="row 1: field 'output' is missing"):
        from_alpaca_eval([rows[0], {"instruction": "i", "generator": "g2"}], "g1")
    with pytest.raises(ValueError, match="needs target"):
        convert_files("alpaca", ["unused"])
