"""The options `inspect` and `convert` share for where their input is: a path, or a Hub repo id with `load_tlora`'s
keywords."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..formats import FileSource

INPUT_HELP = "a T-LoRA file, a folder holding one, or a Hugging Face Hub repo id (user/repo)"


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--weight-name`, `--subfolder`, `--revision`, `--cache-dir`, `--token` and `--local-files-only`.

    Args:
        parser (`argparse.ArgumentParser`): the subcommand's parser.
    """
    group = parser.add_argument_group("input in a folder or a Hub repo (as load_tlora's keywords)")
    group.add_argument("--weight-name", help="the file's name in the folder or repo (default: its only T-LoRA file)")
    group.add_argument("--subfolder", help="the folder inside the folder or repo that holds the file")
    group.add_argument("--revision", help="the repo's branch, tag or commit (default: main)")
    group.add_argument("--cache-dir", help="the Hub cache folder (default: HF_HUB_CACHE)")
    group.add_argument("--token", help="a Hub token for private or gated repos (default: HF_TOKEN or the saved login)")
    group.add_argument("--local-files-only", action="store_true", help="use the Hub cache only, never the network")


def file_source(args: argparse.Namespace) -> FileSource:
    """The `FileSource` the parsed options describe.

    Args:
        args (`argparse.Namespace`): the parsed arguments of a parser `add_source_arguments` extended.
    """
    from ..formats import FileSource

    return FileSource(
        weight_name=args.weight_name, subfolder=args.subfolder, revision=args.revision, cache_dir=args.cache_dir,
        token=args.token, local_files_only=args.local_files_only, option_spelling="flag",
    )
