"""`tlora-hooks inspect FILE` and `tlora-hooks convert IN OUT`: look into a T-LoRA file, or rewrite it as LyCORIS tlora."""

from __future__ import annotations

import argparse
import json
import os

from .errors import TLoRAError
from .formats import check_one_rank, lycoris, read_tlora_file
from .inspection import summarise
from .schedule import RankSchedule


def _inspect(args: argparse.Namespace) -> None:
    summary = summarise(read_tlora_file(args.file))
    if args.json:
        print(json.dumps(summary))
        return
    recorded = lambda value: "not recorded" if value is None else value  # noqa: E731
    print(f"file:          {summary['file']}")
    print(f"format:        {summary['format']}")
    print(f"modules:       {summary['modules']}" + _skipped(summary))
    print(f"rank:          {', '.join(map(str, summary['ranks']))}")
    alphas = ", ".join(map(str, summary["lora_alphas"]))
    print(f"scale:         {', '.join(map(str, summary['scales']))} (LoRA alpha {alphas} / rank)")
    print(f"base terms:    {summary['base_terms']}")
    print(f"min_rank:      {recorded(summary['min_rank'])} (tlora_min_rank)")
    print(f"alpha:         {recorded(summary['alpha'])} (tlora_alpha, the schedule exponent)")
    print(f"model family:  {summary['family']}")
    print("module names:")
    for pattern, count in summary["name_patterns"]:
        print(f"  {count:5d}  {pattern}")


def _skipped(summary: dict) -> str:
    notes = []
    if summary["unused_keys"]:
        notes.append(f"{summary['unused_keys']} keys its trainer never used, skipped")
    if summary["unknown_keys"]:
        notes.append(f"{summary['unknown_keys']} keys of no T-LoRA module")
    return f" ({'; '.join(notes)})" if notes else ""


def _convert(args: argparse.Namespace) -> None:
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise TLoRAError("convert writes a new file; give an output path other than the input.")
    tlora_file = read_tlora_file(args.input)
    rank = check_one_rank(tlora_file)
    min_rank = args.min_rank if args.min_rank is not None else tlora_file.settings.min_rank
    if min_rank is None:
        raise TLoRAError(
            f"{tlora_file.path} does not record tlora_min_rank: pass --min-rank with the value it was trained with "
            "(the official SD-XL recipe uses half the rank, the official FLUX recipe 1)."
        )
    alpha = args.alpha if args.alpha is not None else tlora_file.settings.alpha
    if alpha is None:
        alpha = 1.0
        print("note: the input does not record tlora_alpha; writing 1.0 (the official formula's; pass --alpha to change)")
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


def add_inspect(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help="show what a T-LoRA file holds: format, rank, modules, settings")
    parser.add_argument("file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=_inspect)


def add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="rewrite a T-LoRA file as LyCORIS tlora safetensors with its schedule in the metadata"
    )
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--min-rank", type=int, default=None, help="tlora_min_rank (default: the file's)")
    parser.add_argument("--alpha", type=float, default=None, help="tlora_alpha (default: the file's, else 1.0)")
    parser.set_defaults(run=_convert)
