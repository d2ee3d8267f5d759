"""Tables of configuration keys in launch/README.md, written from the fields of a config dataclass: each
field's type, default and ``metadata["help"]`` (the config's module is the one place to edit).

    python -m dora_engine.training.config_docs [README] [--check]

rewrites the table of ``TrainingConfig`` between the ``config-keys`` marker comments of README (default:
launch/README.md, run from the repository root); with ``--check`` it writes nothing and exits 1 when the
table is out of date. Another config's table is a ``KeyTable`` with markers of its own, written by its own
module's ``main`` (``python -m dora_engine.iterate.config_docs`` for ``dora-engine iterate``'s config).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dora_engine.atomic import atomic_write
from dora_engine.training.config import TrainingConfig

DEFAULT_README = Path("launch") / "README.md"


@dataclasses.dataclass(frozen=True)
class KeyTable:
    """One generated table: the dataclass it documents, the name of its marker comments, the module whose
    ``main`` writes it and the file that holds the fields' help."""

    config_class: type
    marker: str
    module: str
    source: str

    @property
    def start(self) -> str:
        return f"<!-- {self.marker}:start -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.marker}:end -->"

    @property
    def command(self) -> str:
        return f"python -m {self.module}"


TRAINING = KeyTable(TrainingConfig, "config-keys", "dora_engine.training.config_docs", "dora_engine/training/config.py")
START, END, COMMAND = TRAINING.start, TRAINING.end, TRAINING.command


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted, as in a ``key=value`` override
    type: str  # the annotation as written; "section" for a group of keys
    default: Any
    help: str


def config_keys(cls: type = TrainingConfig, prefix: str = "") -> Iterator[ConfigKey]:
    """Every key of ``cls`` in field order, a section before its own keys."""
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if "help" not in f.metadata:
            raise ValueError(f"config key {key!r} has no metadata['help'] (dora_engine/training/config.py)")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield ConfigKey(key, "section", None, f.metadata["help"])
            yield from config_keys(type(default), f"{key}.")
        else:
            yield ConfigKey(key, str(f.type), default, f.metadata["help"])


def yaml_value(value: Any) -> str:
    """``value`` as it would be written in the YAML config."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        return f"{mantissa}e{int(exponent)}" if exponent else text
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def key_table(table: KeyTable = TRAINING) -> str:
    """The Markdown table of every key of ``table``'s config, markers included."""
    lines = [
        table.start,
        f"<!-- written by `{table.command}` from the fields' help in {table.source}: edit it there -->",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for k in config_keys(table.config_class):
        if k.type == "section":
            lines.append(f"| **`{k.key}`** | section | | {_cell(k.help)} |")
        else:
            lines.append(f"| `{k.key}` | `{_cell(k.type)}` | `{_cell(yaml_value(k.default))}` | {_cell(k.help)} |")
    lines.append(table.end)
    return "\n".join(lines)


def with_key_table(text: str, table: KeyTable = TRAINING) -> str:
    """``text`` with the part from ``table``'s start marker to its end marker replaced by ``key_table(table)``."""
    start, end = text.find(table.start), text.find(table.end)
    if start < 0 or end < start:
        raise ValueError(f"no {table.start} ... {table.end} block to write the config keys into")
    return text[:start] + key_table(table) + text[end + len(table.end):]


def main(argv: list[str] | None = None, table: KeyTable = TRAINING) -> int:
    parser = argparse.ArgumentParser(prog=table.command, description=f"Write the table of {table.source}'s config "
                                                                     "keys into README.")
    parser.add_argument("readme", nargs="?", type=Path, default=DEFAULT_README)
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is out of date; write nothing")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    updated = with_key_table(text, table)
    if args.check:
        if updated != text:
            print(f"{args.readme}: the config keys are out of date; run `{table.command}`", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        with atomic_write(args.readme) as out:
            out.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
