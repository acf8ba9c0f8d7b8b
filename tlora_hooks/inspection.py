"""What a T-LoRA file holds, summarised for `tlora-hooks inspect`: format, ranks, names, settings, likely model."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .formats import TLoraFile

DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Family:
    """A model family recognised by its module names (LyCORIS form) and, optionally, one layer's input width."""

    name: str
    pattern: str
    absent: str | None = None
    width_layer: str | None = None
    widths: tuple[tuple[int, str], ...] = ()


FAMILIES = (
    Family("Flux (FluxTransformer2DModel)", r"single_transformer_blocks_\d+_attn_to_q",
           width_layer=r"single_transformer_blocks_\d+_attn_to_q$", widths=((3072, "FLUX.1"),)),
    Family("SD3-style MM-DiT (SD3Transformer2DModel)", r"transformer_blocks_\d+_attn_add_q_proj",
           absent=r"single_transformer_blocks"),
    Family("UNet (UNet2DConditionModel)", r"(down|up)_blocks_\d+_attentions_\d+_transformer_blocks",
           width_layer=r"attn2_to_k$", widths=((2048, "SDXL"), (1024, "SD 2.x"), (768, "SD 1.x"))),
    Family("Wan (WanTransformer3DModel)", r"blocks_\d+_attn1_to_q", absent=r"transformer_blocks"),
)


def name_patterns(names: list[str]) -> list[tuple[str, int]]:
    """Module names with every number replaced by `*`, most common first."""
    return Counter(DIGITS.sub("*", name) for name in names).most_common()


def likely_family(tlora_file: TLoraFile) -> str:
    names = list(tlora_file.modules)
    for family in FAMILIES:
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
    """Everything `inspect` prints, as plain data."""
    settings = tlora_file.settings
    return {
        "file": tlora_file.path,
        "format": tlora_file.format,
        "modules": len(tlora_file.modules),
        "ranks": tlora_file.ranks,
        "scales": tlora_file.scales,
        "lora_alphas": sorted({m.alpha for m in tlora_file.modules.values()}),
        "base_terms": {"saved": "saved in the file", "rebuilt": "rebuilt from the model's weights at load"}.get(
            tlora_file.base_source, tlora_file.base_source
        ),
        "min_rank": settings.min_rank,
        "alpha": settings.alpha,
        "linear_dim": settings.linear_dim,
        "preset": settings.preset,
        "name_patterns": name_patterns(list(tlora_file.modules)),
        "family": likely_family(tlora_file),
        "unused_keys": len(tlora_file.unused_keys),
        "unknown_keys": len(tlora_file.unknown_keys),
    }
