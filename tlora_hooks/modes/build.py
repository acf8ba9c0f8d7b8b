"""Building the mode a name asks for: which of a denoiser's modules each mode takes, and "auto" resolved."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..discovery import peft_wrapped_layers
from ..errors import TLoRAError
from .auto import resolve_auto
from .chain import ChainLink, HookNesting, dropped_error
from .combined import CombinedMode, NestedMode
from .factors import base_layer, foldable, has_offload_hook, takes_fast_mode
from .fold import FoldMode
from .low_memory import LowMemoryMode
from .lycoris import LycorisMode
from .protocol import MaskMode, ModeFactory
from .training import TrainingMode

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


def split(modules: list[TLoraModule], denoiser: nn.Module | None) -> tuple[list, list, list]:
    """(foldable, other fast-mode modules, modules left to LyCORIS's forward)."""
    offloaded = denoiser is not None and any(has_offload_hook(m) for m in denoiser.modules())
    # A layer (or a weight tied between layers) is folded once; other modules on it bypass. A layer a PEFT LoRA
    # wraps is never folded: fusing that LoRA writes its weight through `.data`, which the fold cannot see.
    seen: set[int] = set(peft_wrapped_layers(denoiser)) if denoiser is not None else set()
    fold, bypass, rest = [], [], []
    for module in modules:
        layer = base_layer(module)
        ids = {id(layer), id(getattr(layer, "weight", None))}
        if not takes_fast_mode(module):
            rest.append(module)
        elif not offloaded and not ids & seen and foldable(module) and ChainLink.slot(module) is not None:
            fold.append(module)
        else:
            bypass.append(module)
        seen |= ids
    return fold, bypass, rest


def _mask_group(modules: list[TLoraModule], rest: list[TLoraModule], group_id: int) -> LycorisMode:
    """LyCORIS's mask API for every module: it runs `rest` (modules no fast mode takes) and publishes each call's
    mask in the denoiser's mask group, so `handle.mask_groups` and `get_timestep_mask(group)` mean the same in every
    mode."""
    mode = LycorisMode(modules, group_id, runs=rest)
    mode.runs_modules = bool(rest)
    return mode


def _lycoris(modules, group_id, denoiser=None) -> MaskMode:
    return LycorisMode(modules, group_id, runs=modules)


def _low_memory(modules, group_id, denoiser=None) -> MaskMode:
    fold, bypass, rest = split(modules, denoiser)
    fast = fold + bypass
    parts = [LowMemoryMode(fast, group_id, denoiser)] if fast else []
    return TrainingMode(CombinedMode(parts + [_mask_group(modules, rest, group_id)], group_id), modules, group_id)


def _fold(modules, group_id, denoiser=None) -> MaskMode:
    fold, bypass, rest = split(modules, denoiser)
    parts = [FoldMode(fold, group_id, denoiser)] if fold else []
    if bypass:
        parts.append(LowMemoryMode(bypass, group_id, denoiser))
    return TrainingMode(CombinedMode(parts + [_mask_group(modules, rest, group_id)], group_id), modules, group_id)


MODES: dict[str, ModeFactory] = {
    "lycoris": _lycoris,
    "low_memory": _low_memory,
    "fold": _fold,
}


def check_mode(mode: str) -> None:
    """Raise for a mode name this version does not have."""
    if mode != "auto" and mode not in MODES:
        raise TLoRAError(f"Unknown mode {mode!r}: use 'auto' (the default) or one of {sorted(MODES)}.")


def check_forward_path(modules: list[TLoraModule], where: str) -> None:
    """Raise if a module is no longer called by its layer's forward (a hook removed since dropped it)."""
    dropped = [module for module in modules if ChainLink.slot(module) is None]
    if dropped:
        raise dropped_error(dropped, where)


def build_mode(
    mode: str, modules: list[TLoraModule], group_id: int, denoiser: nn.Module | None = None
) -> MaskMode:
    """The mode `mode` names, with "auto" resolved for these modules (and their denoiser's offloading hooks).

    A module LyCORIS applied over an accelerate hook is first put inside it, so removing the hook keeps the module
    in the forward (undone when the mode is removed)."""
    check_mode(mode)
    nestings = HookNesting.wherever_needed(modules)
    try:
        if mode == "auto":
            mode = resolve_auto(split(modules, denoiser)[0])
        built = MODES[mode](modules, group_id, denoiser)
    except BaseException:
        for nesting in nestings:
            nesting.undo()
        raise
    return NestedMode(built, nestings) if nestings else built
