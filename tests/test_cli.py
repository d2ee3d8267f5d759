"""The command's error handling: bad input is one line and exit code 2, a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dora_engine import cli
from dora_engine.data import corrupt
from dora_engine.data.schema import Record, RecordError, Response, write_records
from dora_engine.errors import TrainingError, UserError, UserImportError, UserValueError
from dora_engine.eval.http_judge import JudgeEndpointError
from dora_engine.ops.builder import OpLoadError
from dora_engine.training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    write_records(path, [Record(f"r{i}", "p", [Response("a", "s", 1.0), Response("b", "s", 0.0)]) for i in range(3)])
    return path


def _corrupt(dataset: Path, out: Path, rate: str = "0.5") -> list[str]:
    return ["data", "corrupt", str(dataset), "--out", str(out), "--rate", rate]


def _one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    prefix = f"dora-engine {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix) :].strip()


def test_user_error_types_keep_their_builtin_bases():
    for error, builtin in (
        (RecordError, ValueError),
        (ConfigError, ValueError),
        (UserValueError, ValueError),
        (TrainingError, RuntimeError),
        (OpLoadError, RuntimeError),
        (JudgeEndpointError, RuntimeError),
        (UserImportError, ImportError),
    ):
        assert issubclass(error, UserError) and issubclass(error, builtin), error


def test_bad_option_value_is_one_line_exit_2(dataset, tmp_path, capsys):
    assert cli.main(_corrupt(dataset, tmp_path / "o.jsonl", rate="1.5")) == 2
    assert _one_error_line(capsys, "data corrupt") == "rate must lie in [0, 1], got 1.5"
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_input_file_names_the_file(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli.main(_corrupt(missing, tmp_path / "o.jsonl")) == 2
    assert str(missing) in _one_error_line(capsys, "data corrupt")


def test_output_under_a_file_is_bad_input(dataset, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    assert cli.main(_corrupt(dataset, blocker / "o.jsonl")) == 2
    assert str(blocker) in _one_error_line(capsys, "data corrupt")


def test_a_model_that_cannot_be_loaded_is_named(dataset, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert cli.main(["data", "score", str(dataset), "--out", str(tmp_path / "o.jsonl"), "--model", str(missing)]) == 2
    assert _one_error_line(capsys, "data score").startswith(f"cannot load {str(missing)!r}: ")


def test_malformed_option_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "calibration", "--model", "no-equals-sign", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "expected NAME=PATH, got 'no-equals-sign'" in capsys.readouterr().err


def test_a_bug_propagates(dataset, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("a bug in the command")

    monkeypatch.setattr(corrupt, "corrupt_records", bug)
    with pytest.raises(TypeError, match="a bug in the command"):
        cli.main(_corrupt(dataset, tmp_path / "o.jsonl"))


def test_a_missing_file_the_user_did_not_name_is_a_bug(dataset, tmp_path, monkeypatch):
    internal = tmp_path / "internal" / "state.json"

    def reads_internal_state(*args, **kwargs):
        return internal.read_text()

    monkeypatch.setattr(corrupt, "corrupt_records", reads_internal_state)
    with pytest.raises(FileNotFoundError):
        cli.main(_corrupt(dataset, tmp_path / "o.jsonl"))


def test_debug_shows_the_user_error(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_ENGINE_DEBUG", "1")
    with pytest.raises(UserValueError, match="rate must lie"):
        cli.main(_corrupt(dataset, tmp_path / "o.jsonl", rate="-1"))


def test_interrupt_exits_130(dataset, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corrupt, "corrupt_records", interrupted)
    assert cli.main(_corrupt(dataset, tmp_path / "o.jsonl")) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_bug_exits_1_with_its_traceback(dataset, tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from dora_engine import cli\n"
        "from dora_engine.data import corrupt\n"
        "def bug(*args, **kwargs): raise TypeError('a bug in the command')\n"
        "corrupt.corrupt_records = bug\n"
        "sys.exit(cli.main(sys.argv[2:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), *_corrupt(dataset, tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("TypeError: a bug in the command")
