"""Tokenised data as a memory-mapped Arrow cache, and data that `datasets` loads (docs/design.md section 3.2)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from multiproc import run_gloo
from training_toy import WORDS, build_tokenizer, make_records, make_toy, write_jsonl

from dora_engine.data.schema import RecordError, read_records
from dora_engine.training.config import load_config
from dora_engine.training.data import Sampler, check_token_range, collate, load_records, row_tokenizer, tokenise
from dora_engine.training.tokenised import checked_stamp, load_tokenised

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy(tmp_path_factory.mktemp("tok"), n_records=24)


def _tokenizer(toy: Path, **data):
    from transformers import AutoTokenizer

    cfg = load_config(toy, [f"data.{k}={v}" for k, v in data.items()])
    return row_tokenizer(AutoTokenizer.from_pretrained(cfg.model.path), cfg.model, cfg.data), cfg


def _load(files, tok, cache, **kw):
    args = dict(stage="align", target_source="chosen", num_responses=None, needs_h_tilde=True)
    args.update(kw)
    return load_tokenised([str(f) for f in files], tok, cache_dir=cache, **args)


def _plain(data) -> list:
    return [(e.record_index, [r.input_ids for r in e.rows], [r.prompt_len for r in e.rows], e.scores, e.h_tilde)
            for e in data.examples]


@pytest.mark.parametrize("stage", ["align", "sft"])
def test_rows_are_those_of_the_in_memory_tokeniser(toy, tmp_path, stage):
    tok, cfg = _tokenizer(toy)
    files = cfg.data.train
    mapped = _load(files, tok, tmp_path, stage=stage, target_source="synthetic1")
    memory = tokenise(load_records(files), tok, stage=stage, target_source="synthetic1", num_responses=None,
                      needs_h_tilde=True, data_hash="x")
    assert _plain(mapped) == _plain(memory) and mapped.num_responses == memory.num_responses
    assert mapped.num_records == 24 and len(mapped) == len(memory)
    if stage == "align":
        assert mapped.mean_h_tilde() == pytest.approx(memory.mean_h_tilde(), rel=1e-12)
    batch, expected = collate(mapped, [5, 0, 9], pad_id=0), collate(memory, [5, 0, 9], pad_id=0)
    assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
    check_token_range(mapped, 28, "data.train")
    with pytest.raises(RecordError, match=r"data.train: record \d+: token id \d+ is outside"):
        check_token_range(mapped, 10, "data.train")


def test_cache_hit_and_miss(toy, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok, cfg = _tokenizer(toy)
    data = write_jsonl(tmp_path / "d.jsonl", make_records(12))
    cache = tmp_path / "cache"
    first = _load([data], tok, cache)
    again = _load([data], tok, cache)
    assert first.built and not again.built and again.path == first.path
    assert again.token_hash == first.token_hash and _plain(again) == _plain(first)

    shorter, _ = _tokenizer(toy, max_response_tokens=2)
    other = _load([data], shorter, cache)
    assert other.built and other.path != first.path and other.token_hash != first.token_hash

    words = build_tokenizer(tmp_path / "tok2")  # same words, another vocabulary order
    vocab = words.get_vocab()
    core = words.backend_tokenizer
    from tokenizers.models import WordLevel

    order = ["<pad>", "<unk>", "<s>", "</s>", *reversed(WORDS)]
    core.model = WordLevel({w: i for i, w in enumerate(order)}, unk_token="<unk>")
    changed = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>")
    assert len(vocab) == len(changed)
    retok = _load([data], row_tokenizer(changed, cfg.model, cfg.data), cache)
    assert retok.built and retok.path not in (first.path, other.path)

    raw = data.read_bytes()
    data.write_bytes(raw.replace(b'"score": 1.0', b'"score": 2.0', 1))  # one byte of the data
    edited = _load([data], tok, cache)
    assert edited.built and edited.path not in (first.path, other.path, retok.path)
    assert edited.examples[0].scores[0] == 2.0
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_bad_rows_are_named_and_nothing_is_left(toy, tmp_path):
    tok, _ = _tokenizer(toy)
    records = make_records(40)
    records[33]["responses"][1]["text"] = " "
    records[35]["responses"][2].pop("score")
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    cache = tmp_path / "cache"
    # Two workers: the align check of record 35 still wins over the empty response of 33, as in `tokenise`.
    with pytest.raises(RecordError, match=r"bad.jsonl: record 35 \(id='toy-35'\): field 'responses\[2\].score' is"):
        _load([path], tok, cache, num_proc=2)
    records[35]["responses"][2]["score"] = 0.1
    write_jsonl(path, records)
    with pytest.raises(RecordError, match=r"record 33 \(id='toy-33'\): field 'responses\[1\].text' is empty"):
        _load([path], tok, cache)
    records[3]["h_tilde"] = -1
    write_jsonl(path, records)
    with pytest.raises(RecordError, match=r"bad.jsonl: record 3 \(id='toy-3'\): field 'h_tilde' must be a finite"):
        _load([path], tok, cache)
    assert not cache.exists()  # a failed build alone leaves nothing behind


def test_resume_after_a_stop_gives_the_same_batches(toy, tmp_path):
    tok, cfg = _tokenizer(toy)
    cache = tmp_path / "cache"
    sampler = Sampler(num_examples=24, micro=2, world=2, accum=2, seed=7)

    def batches(data, steps, rank):
        return [collate(data, idx, pad_id=0) for s in steps for idx in sampler.step_indices(s, rank)]

    memory = tokenise(load_records(cfg.data.train), tok, stage="align", target_source="chosen", num_responses=None,
                      needs_h_tilde=True, data_hash="x")
    run = _load(cfg.data.train, tok, cache)
    uninterrupted = {rank: batches(run, range(10), rank) for rank in (0, 1)}
    resumed = _load(cfg.data.train, tok, cache)  # a later process: maps the same files
    assert not resumed.built
    for rank in (0, 1):
        after = batches(resumed, range(4, 10), rank)
        reference = batches(memory, range(10), rank)
        for got, want, ref in zip(after, uninterrupted[rank][8:], reference[8:], strict=True):
            assert all(torch.equal(got[k], want[k]) and torch.equal(got[k], ref[k]) for k in got)


def _rank_loads(rank: int, config: str, cache: str, bad: str) -> tuple[bool, str, int, str]:
    from transformers import AutoTokenizer

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE="2")
    cfg = load_config(config)
    tok = row_tokenizer(AutoTokenizer.from_pretrained(cfg.model.path), cfg.model, cfg.data)
    kw = dict(stage="align", target_source="chosen", num_responses=None, needs_h_tilde=True, cache_dir=cache)
    data = load_tokenised(cfg.data.train, tok, **kw)
    try:  # local rank 0 fails to build: the waiting rank gets its error instead of waiting for ever
        load_tokenised([bad], tok, **kw)
        error = ""
    except RecordError as err:
        error = str(err)
    return data.built, data.token_hash, len(data), error


@pytest.mark.multiproc
def test_two_ranks_tokenise_once(toy, tmp_path):
    records = make_records(6)
    records[4]["responses"][0].pop("score")
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    results = run_gloo(_rank_loads, 2, str(toy), str(tmp_path / "cache"), str(bad))
    assert [r[0] for r in results] == [True, False]
    assert results[0][1:3] == results[1][1:3] and results[0][2] == 24
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("tokens-") and p.is_dir()]) == 1
    message = f"{bad}: record 4 (id='toy-4'): field 'responses[0].score' is missing"
    assert results[0][3].startswith(message) and results[1][3] == results[0][3]


# ----------------------------------------------------------------------------------- damaged cache folders


def _garble(path: Path) -> None:
    """Same-size garbling of the middle of a file (as a disk or a stray write would)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(b ^ 0x5A for b in raw[mid : mid + 64])
    path.write_bytes(bytes(raw))


def _edit_meta(folder: Path, **fields) -> None:
    meta = json.loads((folder / "dora_tokens.json").read_text())
    (folder / "dora_tokens.json").write_text(json.dumps(meta | fields))


DAMAGE = {
    "garbled tokens": (lambda f: _garble(next((f / "data").glob("*.arrow"))), "differs from dora_tokens.json"),
    "truncated arrow": (lambda f: os.truncate(next((f / "data").glob("*.arrow")), 1000), "has 1000 bytes"),
    "deleted record": (lambda f: (f / "dora_tokens.json").unlink(), "dora_tokens.json is missing"),
    "garbled record": (lambda f: (f / "dora_tokens.json").write_bytes(b"\x00{\xff"), "cannot be read"),
    "altered record": (lambda f: _edit_meta(f, num_responses=5), "was altered"),
    "older record": (lambda f: _edit_meta(f, files=None, digest=None), "lacks files, digest"),
    "extra file": (lambda f: (f / "data" / "x.arrow").write_bytes(b"x"), "data/x.arrow is not listed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_folder_is_tokenised_again_after_one_line(toy, tmp_path, capfd, damage):
    """Whatever is wrong with a cached folder, the next load says so in one line and tokenises again:
    never a traceback, never rows other than the data's, never a folder left that breaks later runs."""
    tok, cfg = _tokenizer(toy)
    cache = tmp_path / "cache"
    first = _load(cfg.data.train, tok, cache)
    expected, K = _plain(first), first.num_responses
    del first  # its memory map would show the garbling too
    folder = next(cache.glob("tokens-*"))
    spoil, reason = DAMAGE[damage]
    spoil(folder)
    capfd.readouterr()
    again = _load(cfg.data.train, tok, cache)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"[dora-engine] warning: tokenised data in {folder} cannot be used (")
    assert reason in lines[0] and lines[0].endswith("tokenising again")
    assert again.built and again.path == folder and _plain(again) == expected and again.num_responses == K
    later = _load(cfg.data.train, tok, cache)
    assert not later.built and _plain(later) == expected and not capfd.readouterr().err.strip()
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # nothing set aside is left


def test_waiting_ranks_map_the_folder_local_rank_0_replaces(toy, tmp_path):
    """A local rank that finds the folder damaged waits for the one local rank 0 builds in its place."""
    from concurrent.futures import ThreadPoolExecutor

    tok, cfg = _tokenizer(toy)
    cache = tmp_path / "cache"
    expected = _plain(_load(cfg.data.train, tok, cache))
    folder = next(cache.glob("tokens-*"))
    _garble(next((folder / "data").glob("*.arrow")))
    checked_stamp(folder).unlink()  # a new launch: its local rank 0 has not checked the folder yet
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_load, cfg.data.train, tok, cache, local_rank=1)
        time.sleep(1.0)
        assert not waiting.done()  # it found the folder damaged and waits
        rebuilt = _load(cfg.data.train, tok, cache, local_rank=0)
        mapped = waiting.result(timeout=60)
    assert rebuilt.built and not mapped.built and _plain(mapped) == _plain(rebuilt) == expected


# ----------------------------------------------------------------------------------- datasets input


def _hf_sources(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    """The records as Parquet, an Arrow file and a save_to_disk folder, with renamed columns."""
    import datasets

    rows = [{"uid": r["id"], "question": r["prompt"],
             "answers": [{"content": x["text"], "source": x["source"], "score": x["score"]} for x in r["responses"]],
             "weight": r["h_tilde"], "extra": 1} for r in records]
    tmp_path.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(rows)
    out = {"parquet": tmp_path / "d.parquet", "folder": tmp_path / "saved"}
    ds.to_parquet(str(out["parquet"]))
    ds.save_to_disk(str(out["folder"]))
    out["arrow"] = sorted(out["folder"].glob("*.arrow"))[0]
    return out


COLUMNS = {"id": "uid", "prompt": "question", "responses": "answers", "h_tilde": "weight",
           "responses.text": "content"}


def test_convert_hf_from_parquet_arrow_and_saved_folder(tmp_path, capsys):
    from dora_engine.cli import main

    records = make_records(6)
    sources = _hf_sources(tmp_path, records)
    columns = [f"{k}={v}" for k, v in COLUMNS.items()]
    for kind, source in sources.items():
        out = tmp_path / f"{kind}.jsonl"
        assert main(["data", "convert", str(source), "--format", "hf", "--out", str(out), "--columns", *columns]) == 0
        assert [r.to_dict() for r in read_records(out)] == records, kind
    bad = _hf_sources(tmp_path / "bad", [*records[:4], {**records[4], "h_tilde": -2.0}])
    assert main(["data", "convert", str(bad["parquet"]), "--format", "hf", "--out", str(tmp_path / "x.jsonl"),
                 "--columns", *columns]) == 2
    err = capsys.readouterr().err
    assert f"{bad['parquet']}: record 4 (id='toy-4'): field 'h_tilde' must be a finite number" in err, err
    assert main(["data", "convert", str(sources["parquet"]), "--format", "hf", "--out", str(tmp_path / "y.jsonl"),
                 "--columns", "answer=x"]) == 2
    assert "unknown field 'answer'" in capsys.readouterr().err


def test_training_reads_datasets_sources_directly(toy, tmp_path):
    tok, cfg = _tokenizer(toy)
    records = [json.loads(line) for line in Path(cfg.data.train[0]).read_text().splitlines()]
    expected = _plain(_load(cfg.data.train, tok, tmp_path / "jsonl"))
    for kind, source in _hf_sources(tmp_path, records).items():
        data = _load([source], tok, tmp_path / kind, columns=COLUMNS)
        assert _plain(data) == expected, kind


# ----------------------------------------------------------------------------------- streamed steps


def test_sharded_steps_stream_their_input_and_resume(tmp_path, monkeypatch):
    """A path input is read record by record (never loaded whole) and an interrupted run resumes."""
    import dora_engine.data.sharded as sharded
    from dora_engine.data.schema import Record

    source = write_jsonl(tmp_path / "in.jsonl", make_records(10))
    whole = sharded.read_records

    def no_whole_input(path):
        assert Path(path) != source, "the input was loaded whole"
        return whole(path)

    monkeypatch.setattr(sharded, "read_records", no_whole_input)
    calls = []

    def step(shard, index):
        calls.append(index)
        if index == 2 and len(calls) == 3:
            raise KeyboardInterrupt
        return [Record(r.id, r.prompt, r.responses, 2.0, r.meta) for r in shard]

    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        sharded.ShardedRun(str(source), out, settings={"step": "t"}, shard_size=3).run(step)
    result = sharded.ShardedRun(str(source), out, settings={"step": "t"}, shard_size=3).run(step)
    assert calls == [0, 1, 2, 2, 3]  # the finished shards were not redone
    assert len(result) == 10 and [r.id for r in result] == [f"toy-{i}" for i in range(10)]
    assert all(r.h_tilde == 2.0 for r in read_records(out))


def _as_trl(records: list[dict]) -> list[dict]:
    """TRL's conversational form (prompt implicit in chosen/rejected) of K = 2 records: the first response
    chosen, the last rejected."""
    def chat(rec: dict, k: int) -> list[dict]:
        answer = {"role": "assistant", "content": rec["responses"][k]["text"]}
        return [{"role": "user", "content": rec["prompt"]}, answer]

    return [{"chosen": chat(r, 0), "rejected": chat(r, -1)} for r in records]


def test_training_reads_trl_sources_directly_keyed_by_format(toy, tmp_path):
    """A conversational TRL JSONL and a save_to_disk folder train through the cache with data.format trl,
    giving the rows of the same records in the schema; the same file in another format is another key."""
    import datasets

    from dora_engine.training.config import load_config
    from dora_engine.training.loading import load_data

    tok, cfg = _tokenizer(toy)
    records = make_records(8, K=2)
    schema = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}],
               "responses": [{**x, "source": s, "score": v} for x, s, v in
                             zip(r["responses"], ("chosen", "rejected"), (1.0, 0.0), strict=True)]}
              for r in records]
    schema = [{k: v for k, v in r.items() if k != "h_tilde"} for r in schema]
    expected = _plain(_load([write_jsonl(tmp_path / "schema.jsonl", schema)], tok, tmp_path / "c0",
                            needs_h_tilde=False))
    trl_jsonl = write_jsonl(tmp_path / "trl.jsonl", _as_trl(records))
    datasets.Dataset.from_list(_as_trl(records)).save_to_disk(str(tmp_path / "trl_saved"))
    for source in (trl_jsonl, tmp_path / "trl_saved"):
        cfg = load_config(toy, [f"data.train=[{source}]", "data.format=trl", f"data.cache_dir={tmp_path / 'c1'}",
                                "robust.strategy=erm"])
        from transformers import AutoTokenizer

        data = load_data(cfg, AutoTokenizer.from_pretrained(cfg.model.path), cfg.data.train, progress=False)
        assert data.built and _plain(data) == expected, source
    with pytest.raises(RecordError, match=r"trl.jsonl: this looks like TRL's layout .*: use data.format: trl"):
        _load([trl_jsonl], tok, tmp_path / "c1", needs_h_tilde=False)


def test_waiting_ranks_read_no_digest_local_rank_0_checked_in_their_launch(toy, tmp_path, monkeypatch):
    """Local rank 0 reads every file's SHA-256 once; the other local ranks of its launch (children of the
    same launcher) then check the record and the sizes only. A stamp of another launch counts for nothing."""
    from dora_engine.training import tokenised

    tok, cfg = _tokenizer(toy)
    cache = tmp_path / "cache"
    expected = _plain(_load(cfg.data.train, tok, cache, local_rank=0))
    folder = next(cache.glob("tokens-*"))
    assert checked_stamp(folder).is_file()

    def unread(path):
        raise AssertionError(f"{path} read for its digest")

    monkeypatch.setattr(tokenised, "file_entry", unread)
    assert _plain(_load(cfg.data.train, tok, cache, local_rank=1)) == expected
    monkeypatch.setattr(tokenised.os, "getppid", lambda: -1)  # another launcher's ranks
    with pytest.raises(AssertionError, match="read for its digest"):
        _load(cfg.data.train, tok, cache, local_rank=1)
