"""`tlora-hooks` / `python -m tlora_hooks`: one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from ..errors import TLoRAError
from . import convert, demo, inspect, schedule, support

# One module per subcommand, in the order `--help` lists them; each adds its parser with `add_command(subparsers)`.
# A new command is one new module and one entry here.
COMMANDS = (demo, support, schedule, inspect, convert)


def build_parser() -> argparse.ArgumentParser:
    """The `tlora-hooks` parser with every subcommand of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="tlora-hooks", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a `TLoRAError` is printed on stderr with exit status 2.

    Args:
        argv (`list[str]`, *optional*):
            The arguments after the program name; `sys.argv[1:]` when not given.

    Returns:
        `int`: the exit status, 0 on success.
    """
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TLoRAError as error:
        print(f"tlora-hooks: {error}", file=sys.stderr)
        return 2
    return 0
