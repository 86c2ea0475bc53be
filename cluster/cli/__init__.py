"""The `kiln` command: one subcommand module per area, each adding its own parser.

Subcommand modules import their heavy dependencies inside their handlers, so `kiln --help`
and `kiln config ...` start fast and never load torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from pretrain.config import ConfigError

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
    except ConfigError as error:
        print(f"kiln: invalid configuration: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
