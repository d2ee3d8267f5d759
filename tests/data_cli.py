"""Run ``dora-engine data …`` through the data command module alone (independent of the other phases)."""

from __future__ import annotations

import argparse

from dora_engine.data.commands import register


def run_data_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dora-engine")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return int(args.func(args) or 0)
