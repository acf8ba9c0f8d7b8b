"""`tlora-hooks` / `python -m tlora_hooks`: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Callable

from .errors import TLoRAError
from .schedule_cli import add_schedule_command
from .file_commands import add_convert, add_inspect


def _quiet_dependencies() -> None:
    """The demo shows its own table; the stock pipelines' deprecation chatter would hide it."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)


def _demo(args: argparse.Namespace) -> None:
    _quiet_dependencies()
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(steps=args.steps, rank=args.rank, min_rank=args.min_rank, alpha=args.alpha, seed=args.seed))


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run a tiny stock SDXL pipeline with a random T-LoRA, offline")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--min-rank", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=_demo)


def _support(args: argparse.Namespace) -> None:
    from .support import support_matrix, update_readme

    if args.write:
        changed = update_readme(args.write)
        print(f"{args.write}: support matrix {'updated' if changed else 'already current'}")
    else:
        print(support_matrix(), end="")


def _add_support(subparsers) -> None:
    parser = subparsers.add_parser("support", help="print the support matrix of pipeline families")
    parser.add_argument("--write", metavar="README", help="rewrite the generated section of this README")
    parser.set_defaults(run=_support)


COMMANDS: list[Callable] = [_add_demo, _add_support, add_schedule_command, add_inspect, add_convert]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlora-hooks", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TLoRAError as error:
        print(f"tlora-hooks: {error}", file=sys.stderr)
        return 2
    return 0
