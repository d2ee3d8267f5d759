"""launch/README.md's table of configuration keys is the one written from the fields of ``TrainingConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dora_engine.training import config_docs
from dora_engine.training.config import TrainingConfig
from dora_engine.training.config_docs import COMMAND, END, START, config_keys, main, with_key_table, yaml_value

README = Path(__file__).resolve().parents[1] / "launch" / "README.md"


def test_the_config_key_table_is_up_to_date() -> None:
    text = README.read_text(encoding="utf-8")
    assert with_key_table(text) == text, f"launch/README.md's config keys are out of date: run `{COMMAND}`"


def test_every_key_is_in_the_table_with_its_default() -> None:
    table = README.read_text(encoding="utf-8").split(START)[1].split(END)[0]
    leaves = [k for k in config_keys() if k.type != "section"]
    assert len(leaves) > 50
    for key in leaves:
        assert f"| `{key.key}` |" in table
    assert "| `train.lr` | `float` | `5e-7` |" in table
    assert "| `lora.target_modules` | `list[str]` | `[q_proj, k_proj, v_proj, o_proj]` |" in table
    assert "| `model.tokenizer` | `str \\| None` | `null` |" in table  # a pipe inside a cell is escaped


def test_sections_come_before_their_keys_in_field_order() -> None:
    keys = [k.key for k in config_keys()]
    top = [f.name for f in dataclasses.fields(TrainingConfig)]
    assert [k for k in keys if "." not in k] == top
    assert keys.index("model") < keys.index("model.path") < keys.index("data")


def test_a_field_without_help_is_refused() -> None:
    @dataclass
    class Section:
        documented: int = field(default=1, metadata={"help": "has help"})
        undocumented: int = 2

    with pytest.raises(ValueError, match="'section.undocumented' has no metadata"):
        list(config_keys(Section, "section."))


def test_check_fails_on_a_stale_table_and_passes_once_written(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{START}\n| stale |\n{END}\n\nafter\n", encoding="utf-8")
    assert main([str(readme), "--check"]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main([str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n\n") and text.endswith("\n\nafter\n") and "| stale |" not in text
    assert main([str(readme), "--check"]) == 0


def test_a_file_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="config-keys"):
        with_key_table("no markers here")


@pytest.mark.parametrize("value,written", [
    (None, "null"), (True, "true"), (False, "false"), (5e-7, "5e-7"), (1.0, "1.0"), (1e20, "1e20"), (256, "256"),
    ("auto", "auto"), ("", '""'), ([], "[]"), (["a", "b"], "[a, b]"), ({}, "{}"), ({"k": 1}, "{k: 1}"),
])
def test_defaults_are_written_as_yaml(value, written) -> None:
    assert yaml_value(value) == written


def test_the_module_is_the_documented_command() -> None:
    assert COMMAND == f"python -m {config_docs.__name__}"
