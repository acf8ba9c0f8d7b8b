"""diffusers' `fuse_qkv_projections()` concatenates an attention's q/k/v weights into one new layer that the fused
attention runs instead of them: a T-LoRA on the separate layers would silently stop running. Found when enabling and
before every call."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .errors import TLoRAError

# The layer `fuse_projections()` adds -> the layers whose weights it concatenates (and whose forwards it bypasses).
FUSED_LAYERS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
# The attention processors of the older `Attention` class that run the fused layers; its `unfuse_qkv_projections()`
# only swaps the processors back (the flag and the fused layers stay). Newer attention classes read the flag.
FUSED_PROCESSOR_PREFIX = "Fused"


class FusedProjectionCheck:
    """Watches the attention modules whose q/k/v layers hold T-LoRA modules; `check()` raises if one runs fused.

    Args:
        name: The denoiser's component name, for messages.
        denoiser: The denoiser.
        layers: The layers that hold T-LoRA modules (PEFT's base layer where a PEFT LoRA wraps one).
    """

    def __init__(self, name: str, denoiser: nn.Module, layers: Iterable[nn.Module]) -> None:
        self.name = name
        held = {id(layer) for layer in layers}
        self.watched = [
            (attention_name, module, names)
            for attention_name, module in denoiser.named_modules()
            if hasattr(module, "fused_projections") and (names := _tlora_layer_names(module, held))
        ]

    def check(self) -> None:
        """Raise TLoRAError if an attention whose q/k/v layers hold T-LoRA modules runs its fused projections (one
        dict lookup per watched attention while none is fused)."""
        for attention_name, attention, names in self.watched:
            if not (attention.__dict__.get("fused_projections", False) and _runs_fused(attention)):
                continue
            bypassed = [
                f"{', '.join(name for name in separate if name in names)} -> {fused}"
                for fused, separate in FUSED_LAYERS.items()
                if getattr(attention, fused, None) is not None and set(separate) & set(names)
            ]
            if bypassed:  # else only layers the fused path still runs (to_q beside a cross-attention's to_kv)
                raise TLoRAError(
                    f"{self.name}.{attention_name} runs fused q/k/v projections ({'; '.join(bypassed)}) since "
                    "fuse_qkv_projections(): the fused layer runs instead of the layers that hold the T-LoRA, so it "
                    "would silently not apply. Call unfuse_qkv_projections() on the pipeline or the denoiser, or do "
                    "not fuse, while a T-LoRA is loaded."
                )


def _tlora_layer_names(attention: nn.Module, held: set[int]) -> list[str]:
    """The attention's fusable layers that hold T-LoRA modules (directly, or as a PEFT wrapper's base layer)."""
    found = []
    for name in dict.fromkeys(name for separate in FUSED_LAYERS.values() for name in separate):
        layer = getattr(attention, name, None)
        if layer is not None and (id(layer) in held or id(getattr(layer, "base_layer", None)) in held):
            found.append(name)
    return found


def _runs_fused(attention: nn.Module) -> bool:
    """Whether a fused attention runs its fused layers: newer attention classes (a class-level flag) whenever fused,
    the older `Attention` only under a fused processor."""
    legacy = not hasattr(type(attention), "fused_projections")
    return not legacy or type(attention.__dict__.get("processor")).__name__.startswith(FUSED_PROCESSOR_PREFIX)
