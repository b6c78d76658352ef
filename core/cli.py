"""The command line: each core.cli_* module registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ["core.cli_data", "core.cli_models", "core.cli_jobs", "core.cli_sources", "core.cli_annotations"]


class UsageError(Exception):
    """A wrong path or unusable input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Binsight: count objects in bin photos.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.dataset import DatasetError
    from core.abid import LabelError
    from core.images import ImageError
    from core.s3 import S3Error

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (UsageError, DatasetError, LabelError, ImageError, S3Error, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
