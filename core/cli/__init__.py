"""The command line (`python -m core`): each module of this package registers one group of subcommands."""
from __future__ import annotations

import argparse
import importlib
import sys

from core.errors import BinsightError

COMMAND_MODULES = ["core.cli.data", "core.cli.models", "core.cli.jobs", "core.cli.sources", "core.cli.annotations",
                   "core.cli.shards", "core.cli.serve", "core.cli.container", "core.cli.health"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Binsight: count objects in bin photos.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except BinsightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
