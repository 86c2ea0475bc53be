"""The `kiln` command: one subcommand module per area, each adding its own parser.

Subcommand modules import their heavy dependencies inside their handlers, so `kiln --help`
and `kiln config ...` start fast and never load torch.

Errors: a handler raises a `KilnError` for what the user can fix (a bad configuration, a
missing file, a scheduler that does not answer); `main` catches it, once, and prints one line,
`kiln COMMAND: MESSAGE`, with exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from data_pipeline.errors import KilnError

from . import (
    cluster_commands,
    config_commands,
    dashboard_commands,
    data_commands,
    model_commands,
    train_commands,
)

SUBCOMMANDS = (
    config_commands,
    data_commands,
    train_commands,
    model_commands,
    cluster_commands,
    dashboard_commands,
)


def kiln_version() -> str:
    try:
        return version("kiln")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln: prepare data for, pretrain, and export language models.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {kiln_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """`kiln data prepare`: the words that chose the handler, to start its error line."""
    words = (args.command, getattr(args, "action", None))  # `kiln data` and `kiln config`
    return " ".join(["kiln", *filter(None, words)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        return args.handler(args)
    except KilnError as error:  # what the user can fix: one line; anything else is a bug
        print(error.line(command_name(args)), file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
