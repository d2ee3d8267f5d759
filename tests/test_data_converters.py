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
    from_tldr,
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


# ----------------------------------------------------------------------------------- the hub's layouts

TRL_STANDARD = [{"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green.", "score_chosen": None,
                 "score_rejected": None},
                {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five.", "score_chosen": 9.0,
                 "score_rejected": 3.5}]


def _convert(tmp_path: Path, capsys, fmt: str, source: Path, *extra: str) -> tuple[int, str, list]:
    out = tmp_path / f"{source.name}.{fmt}.out.jsonl"
    rc = cli_main(["data", "convert", str(source), "--format", fmt, "--out", str(out), *extra])
    err = capsys.readouterr().err
    return rc, err, [r.to_dict() for r in read_records(out)] if rc == 0 else []


def _datasets_files(tmp_path: Path, rows: list[dict], csv: bool = True) -> dict[str, Path]:
    """``rows`` as Parquet, an Arrow file, a save_to_disk folder, JSONL, a JSON list (and CSV)."""
    import datasets

    tmp_path.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(rows)
    out = {"parquet": tmp_path / "d.parquet", "folder": tmp_path / "saved", "jsonl": tmp_path / "d.jsonl",
           "json": tmp_path / "d.json"}
    ds.to_parquet(str(out["parquet"]))
    ds.save_to_disk(str(out["folder"]))
    out["arrow"] = sorted(out["folder"].glob("*.arrow"))[0]
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out["json"].write_text(json.dumps(rows), encoding="utf-8")
    if csv:
        out["csv"] = tmp_path / "d.csv"
        ds.to_csv(str(out["csv"]), index=False)
    return out


def test_trl_reads_every_source_datasets_loads(tmp_path, capsys):
    expected = [r.to_dict() for r in from_trl(TRL_STANDARD)]
    for kind, source in _datasets_files(tmp_path, TRL_STANDARD).items():
        rc, err, records = _convert(tmp_path, capsys, "trl", source)
        assert rc == 0 and records == expected, (kind, err)


def test_trl_conversational_and_implicit_prompt_forms(tmp_path, capsys):
    user, bot = ({"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."})
    rude = {"role": "assistant", "content": "Go away."}
    implicit = [{"chosen": [user, bot], "rejected": [user, rude]}]
    explicit = [{"prompt": [user], "chosen": [bot], "rejected": [rude]}]
    # UltraFeedback-binarized: a string prompt that chosen/rejected also hold as their user turn
    repeated = [{"prompt": "Hi?", "chosen": [user, bot], "rejected": [user, rude], "score_chosen": 8.0,
                 "score_rejected": 2.0}]
    for rows, scores in ((implicit, [1.0, 0.0]), (explicit, [1.0, 0.0]), (repeated, [8.0, 2.0])):
        sources = _datasets_files(tmp_path / str(len(list(tmp_path.iterdir()))), rows, csv=False)
        for kind in ("parquet", "folder", "jsonl"):
            rc, err, records = _convert(tmp_path, capsys, "trl", sources[kind])
            assert rc == 0, (kind, err)
            assert records[0]["prompt"] == [user], (rows, kind)
            assert [(r["text"], r["score"]) for r in records[0]["responses"]] == list(zip(["Hello.", "Go away."],
                                                                                           scores, strict=True))
    # standard form with the prompt implicit in the texts: cut at the last whitespace they share
    rec = from_trl([{"chosen": "The sky is blue.", "rejected": "The sky is bright green."}])[0]
    assert rec.prompt == "The sky is" and [r.text for r in rec.responses] == [" blue.", " bright green."]
    with pytest.raises(RecordError, match="share no leading words"):
        from_trl([{"chosen": "Blue sky.", "rejected": "Bluer sky."}])


def test_hf_format_points_trl_layout_to_trl(tmp_path, capsys):
    source = _datasets_files(tmp_path, TRL_STANDARD)["parquet"]
    rc, err, _ = _convert(tmp_path, capsys, "hf", source)
    assert rc == 2
    assert (f"{source}: this looks like TRL's layout (prompt/chosen/rejected): use --format trl"
            in err.strip().splitlines()[-1]), err


def _undecodable(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Damaged files, each with the format the error must name."""
    files = {"list.json": (b"[\xff\xfe]", "a JSON list or JSONL file"),
             "lines.jsonl": (b'{"a": 1}\n\xff\xfe\n', "JSONL"),
             "damaged.jsonl.gz": (gzip.compress(b'{"a": 1}\n')[:-12], "a JSON list or JSONL file, gzipped"),
             "renamed.parquet": (b'{"a": 1}\n', "Parquet"),
             "latin1.csv": (b"prompt,chosen\n\xe9t\xe9,x\n", "CSV"),
             "junk.arrow": (b"not arrow at all", "an Arrow file")}
    out = {}
    for name, (data, fmt) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, fmt)
    return out


@pytest.mark.parametrize("fmt", ["trl", "hh", "tldr", "authors", "alpaca", "hf"])
def test_undecodable_input_is_one_line_naming_the_file_and_format(tmp_path, capsys, fmt):
    extra = ["--target", "g"] if fmt == "alpaca" else []
    for name, (path, expected) in _undecodable(tmp_path).items():
        if fmt == "hf" and name.endswith((".json", ".jsonl", ".gz")):
            expected = "cannot be read as JSON"  # --format hf reads any JSON through datasets
        rc, err, _ = _convert(tmp_path, capsys, fmt, path, *extra)
        last = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err, (name, err)
        assert last.startswith(f"dora-engine data convert: error: {path}: ") and expected in last, (name, last)


# ----------------------------------------------------------------------------------- recipes (README)


def test_recipe_ultrafeedback_columns(tmp_path, capsys):
    """openbmb/UltraFeedback: one instruction, completions of several models with ratings."""
    rows = [{"source": "evol_instruct", "instruction": f"Write a haiku about {topic}.",
             "models": ["gpt-4", "alpaca-7b", "llama-2-7b-chat", "wizardlm-13b"],
             "completions": [{"model": m, "principle": "helpfulness", "custom_system_prompt": "Be helpful.",
                              "response": f"{topic} haiku by {m}", "annotations": {"helpfulness": {"Rating": "4"}},
                              "fine-grained_score": 4.25, "overall_score": score, "critique": "fine"}
                             for m, score in zip(["gpt-4", "alpaca-7b", "llama-2-7b-chat", "wizardlm-13b"],
                                                 [8.5, 5.0, 7.0, 6.5], strict=True)],
             "correct_answers": ["None"], "incorrect_answers": ["None"]} for topic in ("rain", "snow")]
    source = _datasets_files(tmp_path, rows, csv=False)["parquet"]
    rc, err, records = _convert(tmp_path, capsys, "hf", source, "--columns", "prompt=instruction",
                                "responses=completions", "responses.text=response", "responses.source=model",
                                "responses.score=overall_score")
    assert rc == 0, err
    assert [r["prompt"] for r in records] == ["Write a haiku about rain.", "Write a haiku about snow."]
    assert records[1]["responses"][1] == {"text": "snow haiku by alpaca-7b", "source": "alpaca-7b", "score": 5.0}
    assert [len(r["responses"]) for r in records] == [4, 4]


def test_recipe_hh_rlhf_in_trl_form(tmp_path, capsys):
    """trl-lib's HH-RLHF: chosen/rejected as full conversations, the prompt implicit in them."""
    turns = [{"role": "user", "content": "How do I bake bread?"},
             {"role": "assistant", "content": "Flour, water, yeast, salt."}, {"role": "user", "content": "How long?"}]
    rows = [{"chosen": [*turns, {"role": "assistant", "content": "About 40 minutes at 230 C."}],
             "rejected": [*turns, {"role": "assistant", "content": "Figure it out."}]}]
    rc, err, records = _convert(tmp_path, capsys, "trl", _datasets_files(tmp_path, rows, csv=False)["parquet"])
    assert rc == 0, err
    assert records == [{"id": "trl-000000", "prompt": turns, "responses": [
        {"text": "About 40 minutes at 230 C.", "source": "chosen", "score": 1.0},
        {"text": "Figure it out.", "source": "rejected", "score": 0.0}]}]


TLDR_ROWS = [
    {"info": {"id": "t3_abc", "post": "My cat will not eat.", "title": "Cat trouble", "subreddit": "pets",
              "site": None, "article": None},
     "summaries": [{"text": " Cat refuses food.", "policy": "sup2", "note": None},
                   {"text": " Cat is picky about food.", "policy": "ppo_xl", "note": None}],
     "choice": 1, "worker": "w1", "batch": "batch3", "split": "train", "extra": {"confidence": 7}},
    {"info": {"id": "cnn-1", "post": None, "title": "Storm hits coast", "subreddit": None, "site": "cnn",
              "article": "A storm hit the coast on Monday."},
     "summaries": [{"text": " Storm on Monday.", "policy": "ref", "note": None},
                   {"text": " A storm.", "policy": "ref", "note": None}],
     "choice": 0, "worker": "w2", "batch": "cnndm1", "split": "valid2", "extra": {"confidence": None}},
]


def test_recipe_tldr_comparisons(tmp_path, capsys):
    """openai/summarize_from_feedback comparisons: a post, two summaries, the labeller's choice."""
    files = _datasets_files(tmp_path, TLDR_ROWS, csv=False)
    for kind in ("jsonl", "parquet"):
        rc, err, records = _convert(tmp_path, capsys, "tldr", files[kind])
        assert rc == 0, (kind, err)
        assert records[0] == {
            "id": "tldr-000000",
            "prompt": "SUBREDDIT: r/pets\nTITLE: Cat trouble\nPOST: My cat will not eat.\nTL;DR:",
            "responses": [{"text": " Cat refuses food.", "source": "sup2", "score": 0.0},
                          {"text": " Cat is picky about food.", "source": "ppo_xl", "score": 1.0}],
            "meta": {"post_id": "t3_abc"}}, kind
        assert records[1]["prompt"] == "TITLE: Storm hits coast\nARTICLE: A storm hit the coast on Monday.\nTL;DR:"
        assert [r["score"] for r in records[1]["responses"]] == [1.0, 0.0]
    with pytest.raises(RecordError, match=r"row 0: field 'choice' = 2 is not the index"):
        from_tldr([{**TLDR_ROWS[0], "choice": 2}])


@pytest.mark.skipif(not HH_FILE.exists(), reason="../shared/data is absent")
def test_real_hh_rlhf_as_trl_parquet_converts_like_the_raw_file(tmp_path):
    """The real harmless-base pairs, rewritten in TRL's conversational form as Parquet, give the records
    that the raw transcripts give."""
    import datasets

    raw = convert_files("hh", [HH_FILE], drop_empty=False)
    rows = [{"chosen": [*r.prompt, {"role": "assistant", "content": r.responses[0].text}],
             "rejected": [*r.prompt, {"role": "assistant", "content": r.responses[1].text}]} for r in raw]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "hh.parquet"))
    trl = convert_files("trl", [tmp_path / "hh.parquet"], drop_empty=False)
    assert [(r.prompt, r.responses) for r in trl] == [(r.prompt, r.responses) for r in raw]


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "missing.jsonl.gz"])
def test_a_missing_file_is_named_not_looked_up_on_the_hub(tmp_path, capsys, name):
    rc, err, _ = _convert(tmp_path, capsys, "trl", tmp_path / name)
    assert rc == 2 and err.strip().splitlines() == [
        f"dora-engine data convert: error: [Errno 2] No such file or directory: '{tmp_path / name}'"]
