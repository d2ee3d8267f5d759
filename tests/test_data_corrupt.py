"""Label corruption: flip rate, reproducibility, pairwise swap and listwise permutation."""

from __future__ import annotations

import math

import pytest

from dora_engine.cli import main as cli_main
from dora_engine.data.corrupt import corrupt_records
from dora_engine.data.schema import Record, RecordError, Response


def _records(n: int, k: int) -> list[Record]:
    return [
        Record(f"r{i}", f"prompt {i}", [Response(f"t{j}", f"s{j}", float(k - j)) for j in range(k)])
        for i in range(n)
    ]


@pytest.mark.parametrize("k", [2, 4])
def test_flip_rate_within_binomial_tolerance(k):
    n, rate = 2000, 0.3
    out = corrupt_records(_records(n, k), rate, seed=7)
    hits = sum(r.meta["corrupted"] for r in out)
    assert abs(hits - n * rate) < 4 * math.sqrt(n * rate * (1 - rate))
    for before, after in zip(_records(n, k), out, strict=True):
        old = [r.score for r in before.responses]
        new = [r.score for r in after.responses]
        assert sorted(new) == sorted(old)  # a permutation of the same scores
        assert (new != old) == after.meta["corrupted"]
        assert [r.text for r in after.responses] == [r.text for r in before.responses]
        if k == 2 and after.meta["corrupted"]:
            assert new == old[::-1]


def test_same_seed_same_output_and_independent_of_order():
    recs = _records(300, 3)
    a = [r.to_dict() for r in corrupt_records(recs, 0.4, seed=1)]
    b = [r.to_dict() for r in corrupt_records(recs, 0.4, seed=1)]
    c = [r.to_dict() for r in corrupt_records(recs, 0.4, seed=2)]
    assert a == b and a != c
    reversed_out = [r.to_dict() for r in corrupt_records(recs[::-1], 0.4, seed=1)]
    assert reversed_out[::-1] == a


def test_input_untouched_and_rate_extremes():
    recs = _records(50, 2)
    snapshot = [r.to_dict() for r in recs]
    assert not any(r.meta["corrupted"] for r in corrupt_records(recs, 0.0))
    assert all(r.meta["corrupted"] for r in corrupt_records(recs, 1.0))
    assert [r.to_dict() for r in recs] == snapshot


def test_bad_input():
    with pytest.raises(ValueError, match="rate"):
        corrupt_records(_records(2, 2), 1.5)
    unscored = [Record("x", "p", [Response("a", "s"), Response("b", "s")])]
    with pytest.raises(RecordError, match=r"record 0 \(id='x'\).*responses\[0\]\.score"):
        corrupt_records(unscored, 0.5)


def test_cli_corrupt_writes_atomically(tmp_path):
    from dora_engine.data.schema import read_records, write_records

    write_records(tmp_path / "in.jsonl", _records(100, 2))
    assert cli_main(["data", "corrupt", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                 "--rate", "0.5", "--seed", "3"]) == 0
    out = read_records(tmp_path / "out.jsonl")
    assert [r.to_dict() for r in out] == [r.to_dict() for r in corrupt_records(_records(100, 2), 0.5, seed=3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from dora_engine.data.schema import write_records

    unscored = [Record("x", "p", [Response("a", "s"), Response("b", "s")])]
    write_records(tmp_path / "in.jsonl", unscored)
    assert cli_main(["data", "corrupt", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                         "--rate", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dora-engine data corrupt: error: record 0 (id='x')") and err.count("\n") == 1
    assert cli_main(["data", "corrupt", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                         "--rate", "0.5"]) == 2
    assert not (tmp_path / "o.jsonl").exists()
