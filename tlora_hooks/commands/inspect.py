"""`tlora-hooks inspect FILE`: what a T-LoRA file holds: format, ranks, module names, settings, likely model."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .file_source import INPUT_HELP, add_source_arguments, file_source

if TYPE_CHECKING:
    from ..formats import TLoraFile

DIGITS = re.compile(r"\d+")
# TLoraFile.base_source -> what `inspect` says.
BASE_TERMS = {
    "saved": "saved in the file",
    "rebuilt": "rebuilt from the model's weights at load",
    "none": "none: the format has no base term (lambda = 1, a LoRA up(down(x) * mask))",
}


@dataclass(frozen=True)
class FamilySignature:
    """How a file shows which model family it was trained on.

    A module-name pattern (LyCORIS form) that must occur, one that must not, and optionally one layer whose input
    width names the variant.
    """

    name: str
    pattern: str
    absent: str | None = None
    width_layer: str | None = None
    widths: tuple[tuple[int, str], ...] = ()


FAMILY_SIGNATURES = (
    FamilySignature("Flux (FluxTransformer2DModel)", r"single_transformer_blocks_\d+_attn_to_q",
                    width_layer=r"single_transformer_blocks_\d+_attn_to_q$", widths=((3072, "FLUX.1"),)),
    FamilySignature("SD3-style MM-DiT (SD3Transformer2DModel)", r"transformer_blocks_\d+_attn_add_q_proj",
                    absent=r"single_transformer_blocks"),
    FamilySignature("UNet (UNet2DConditionModel)", r"(down|up)_blocks_\d+_attentions_\d+_transformer_blocks",
                    width_layer=r"attn2_to_k$", widths=((2048, "SDXL"), (1024, "SD 2.x"), (768, "SD 1.x"))),
    FamilySignature("Wan (WanTransformer3DModel)", r"blocks_\d+_attn1_to_q", absent=r"transformer_blocks"),
)


def name_patterns(names: list[str]) -> list[tuple[str, int]]:
    """Module names with every number replaced by `*`, most common first.

    Args:
        names (`list[str]`): the module names, e.g. a file's LyCORIS names.

    Returns:
        `list[tuple[str, int]]`: each pattern and how many names it covers.
    """
    return Counter(DIGITS.sub("*", name) for name in names).most_common()


def likely_family(tlora_file: TLoraFile) -> str:
    """The first family whose signature the file's module names match, with its variant if one layer's width says it.

    Args:
        tlora_file (`TLoraFile`): the file, as `read_tlora_file` returns it.

    Returns:
        `str`: e.g. "UNet (UNet2DConditionModel), SDXL", or "unknown".
    """
    names = list(tlora_file.modules)
    for family in FAMILY_SIGNATURES:
        if not any(re.search(family.pattern, name) for name in names):
            continue
        if family.absent and any(re.search(family.absent, name) for name in names):
            continue
        widths = [
            module.in_features for name, module in tlora_file.modules.items()
            if family.width_layer and re.search(family.width_layer, name)
        ]
        width = widths[0] if widths else None
        variant = dict(family.widths).get(width)
        return f"{family.name}, {variant}" if variant else family.name
    return "unknown"


def summarise(tlora_file: TLoraFile) -> dict[str, Any]:
    """Everything `inspect` prints, as plain data (what `--json` prints).

    Args:
        tlora_file (`TLoraFile`): the file, as `read_tlora_file` returns it.
    """
    settings = tlora_file.settings
    return {
        "file": tlora_file.path,
        "format": tlora_file.format,
        "modules": len(tlora_file.modules),
        "ranks": tlora_file.ranks,
        "scales": tlora_file.scales,
        "lora_alphas": sorted({m.alpha for m in tlora_file.modules.values()}),
        "base_terms": BASE_TERMS.get(tlora_file.base_source, tlora_file.base_source),
        "min_rank": settings.min_rank,
        "alpha": settings.alpha,
        "linear_dim": settings.linear_dim,
        "preset": settings.preset,
        "invalid_metadata": settings.invalid,
        "name_patterns": name_patterns(list(tlora_file.modules)),
        "family": likely_family(tlora_file),
        "unused_keys": len(tlora_file.unused_keys),
        "unknown_keys": len(tlora_file.unknown_keys),
    }


def _run(args: argparse.Namespace) -> None:
    from ..formats import read_tlora_file

    summary = summarise(read_tlora_file(args.file, file_source(args)))
    if args.json:
        print(json.dumps(summary))
        return
    print(f"file:          {summary['file']}")
    print(f"format:        {summary['format']}")
    print(f"modules:       {summary['modules']}" + _skipped(summary))
    print(f"rank:          {', '.join(map(str, summary['ranks']))}")
    alphas = ", ".join(map(str, summary["lora_alphas"]))
    print(f"scale:         {', '.join(map(str, summary['scales']))} (LoRA alpha {alphas} / rank)")
    print(f"base terms:    {summary['base_terms']}")
    print(f"min_rank:      {_setting(summary, 'min_rank')} (tlora_min_rank)")
    print(f"alpha:         {_setting(summary, 'alpha')} (tlora_alpha, the schedule exponent)")
    print(f"model family:  {summary['family']}")
    print("module names:")
    for pattern, count in summary["name_patterns"]:
        print(f"  {count:5d}  {pattern}")


def _setting(summary: dict, name: str) -> Any:
    if name in summary["invalid_metadata"]:
        return f"invalid: {summary['invalid_metadata'][name]}"
    return "not recorded" if summary[name] is None else summary[name]


def _skipped(summary: dict) -> str:
    notes = []
    if summary["unused_keys"]:
        notes.append(f"{summary['unused_keys']} keys its trainer never used, skipped")
    if summary["unknown_keys"]:
        notes.append(f"{summary['unknown_keys']} keys of no T-LoRA module")
    return f" ({'; '.join(notes)})" if notes else ""


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `inspect` and its options.

    Args:
        subparsers (`argparse._SubParsersAction`): what `ArgumentParser.add_subparsers` returned.
    """
    parser = subparsers.add_parser("inspect", help="show what a T-LoRA file holds: format, rank, modules, settings")
    parser.add_argument("file", help=INPUT_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_source_arguments(parser)
    parser.set_defaults(run=_run)
