"""`tlora-hooks support`: print the support matrix of pipeline families, or rewrite its page's generated section."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> None:
    from ..support import support_matrix, update_matrix_page

    if args.write:
        changed = update_matrix_page(args.write)
        print(f"{args.write}: support matrix {'updated' if changed else 'already current'}")
    else:
        print(support_matrix(), end="")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `support` and its options.

    Args:
        subparsers (`argparse._SubParsersAction`): what `ArgumentParser.add_subparsers` returned.
    """
    parser = subparsers.add_parser("support", help="print the support matrix of pipeline families")
    parser.add_argument(
        "--write", metavar="PAGE", help="rewrite the generated section of this page (docs/supported-pipelines.md)"
    )
    parser.set_defaults(run=_run)
