"""`tlora-hooks convert IN OUT`: rewrite a T-LoRA file as LyCORIS tlora safetensors, its schedule in the metadata."""

from __future__ import annotations

import argparse
import os

from ..errors import TLoRAError
from ..schedule import RankSchedule
from .file_source import INPUT_HELP, add_source_arguments, file_source


def _run(args: argparse.Namespace) -> None:
    from ..formats import check_one_rank, lycoris, read_tlora_file

    tlora_file = read_tlora_file(args.input, file_source(args))
    if os.path.realpath(tlora_file.path) == os.path.realpath(args.output):
        raise TLoRAError("convert writes a new file; give an output path other than the input.")
    rank = check_one_rank(tlora_file)
    invalid = tlora_file.settings.invalid
    for label, option in (("min_rank", args.min_rank), ("alpha", args.alpha)):
        if option is None and label in invalid:
            raise TLoRAError(f"{tlora_file.path}: {invalid[label]}. Pass --{label.replace('_', '-')} to override it.")
    min_rank = args.min_rank if args.min_rank is not None else tlora_file.settings.min_rank
    if min_rank is None:
        raise TLoRAError(
            f"{tlora_file.path} does not record tlora_min_rank: pass --min-rank with the value it was trained with "
            "(the official SD-XL recipe uses half the rank, the official FLUX recipe 1)."
        )
    alpha = args.alpha if args.alpha is not None else tlora_file.settings.alpha
    if alpha is None:
        alpha = 1.0
        print(
            "note: the input does not record tlora_alpha; writing 1.0 (the official formula's; pass --alpha to change)"
        )
    RankSchedule(max_rank=rank, min_rank=min_rank, alpha=alpha)
    lycoris.write(tlora_file, args.output, min_rank=min_rank, alpha=alpha)
    print(
        f"wrote {args.output}: LyCORIS tlora, {len(tlora_file.modules)} modules, rank {rank}, "
        f"min_rank {min_rank}, alpha {alpha} (from {tlora_file.format})"
    )
    dropped = len(tlora_file.unused_keys) + len(tlora_file.unknown_keys)
    if dropped:
        print(f"note: {dropped} keys that belong to no (used) T-LoRA module were not written")
    if tlora_file.base_source == "saved":
        print(
            "note: the base terms are saved as base_q/base_p/base_lambda, so load_tlora reproduces the original "
            "exactly; LyCORIS's create_lycoris_from_weights ignores them and rebuilds a different base."
        )


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `convert` and its options.

    Args:
        subparsers (`argparse._SubParsersAction`): what `ArgumentParser.add_subparsers` returned.
    """
    parser = subparsers.add_parser(
        "convert", help="rewrite a T-LoRA file as LyCORIS tlora safetensors with its schedule in the metadata"
    )
    parser.add_argument("input", help=INPUT_HELP)
    parser.add_argument("output", help="the LyCORIS tlora .safetensors file to write")
    parser.add_argument("--min-rank", type=int, default=None, help="tlora_min_rank (default: the file's)")
    parser.add_argument("--alpha", type=float, default=None, help="tlora_alpha (default: the file's, else 1.0)")
    add_source_arguments(parser)
    parser.set_defaults(run=_run)
