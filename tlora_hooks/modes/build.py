"""Building the mode a name asks for: which of a denoiser's modules each mode takes, and "auto" resolved."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..discovery import peft_wrapped_layers
from ..errors import TLoRAError
from .auto import resolve_auto
from .chain import ChainLink, HookNesting
from .combined import CombinedMode, NestedMode
from .factors import base_layer, foldable, has_offload_hook, takes_fast_mode
from .fold import FoldMode
from .low_memory import LowMemoryMode
from .lycoris import LycorisMode
from .protocol import GroupModules, MaskMode, ModeFactory, by_group, group_of
from .training import TrainingMode

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


def split(modules: list[TLoraModule], denoiser: nn.Module | None) -> tuple[list, list, list]:
    """(foldable, other fast-mode modules, modules left to LyCORIS's forward).

    A layer is folded with all of its modules (one per adapter on it), or not at all: then its fast-mode modules
    run beside it.
    """
    offloaded = denoiser is not None and any(has_offload_hook(m) for m in denoiser.modules())
    by_layer: dict[int, list[TLoraModule]] = {}
    for module in modules:
        by_layer.setdefault(id(base_layer(module)), []).append(module)
    # A layer (or a weight tied between layers) is folded once; the modules of the other one bypass. A layer a PEFT
    # LoRA wraps is never folded: fusing that LoRA writes its weight through `.data`, which the fold cannot see.
    seen: set[int] = set(peft_wrapped_layers(denoiser)) if denoiser is not None else set()
    fold, bypass, rest = [], [], []
    for layer_modules in by_layer.values():
        layer = base_layer(layer_modules[0])
        ids = {id(layer), id(getattr(layer, "weight", None))}
        fast = [module for module in layer_modules if takes_fast_mode(module)]
        rest += [module for module in layer_modules if not takes_fast_mode(module)]
        folds = (
            len(fast) == len(layer_modules) and not offloaded and not ids & seen
            and all(foldable(module) and ChainLink.slot(module) is not None for module in fast)
        )
        (fold if folds else bypass).extend(fast)
        seen |= ids
    return fold, bypass, rest


def _mask_group(groups: GroupModules, rest: list[TLoraModule]) -> LycorisMode:
    """LyCORIS's mask API for every module: it runs `rest` (modules no fast mode takes) and publishes each call's
    masks in the adapters' mask groups, so `get_timestep_mask(group)` means the same in every mode."""
    return LycorisMode(groups, runs=rest)


def _all(groups: GroupModules) -> list[TLoraModule]:
    return [module for modules in groups.values() for module in modules]


def _lycoris(groups, denoiser=None) -> MaskMode:
    return LycorisMode(groups)


def _low_memory(groups, denoiser=None) -> MaskMode:
    modules = _all(groups)
    fold, bypass, rest = split(modules, denoiser)
    fast = fold + bypass
    parts = [LowMemoryMode(by_group(fast, group_of(groups)), denoiser)] if fast else []
    return TrainingMode(CombinedMode(parts + [_mask_group(groups, rest)]), modules, list(groups))


def _fold(groups, denoiser=None) -> MaskMode:
    modules = _all(groups)
    fold, bypass, rest = split(modules, denoiser)
    parts = [FoldMode(by_group(fold, group_of(groups)), denoiser)] if fold else []
    if bypass:
        parts.append(LowMemoryMode(by_group(bypass, group_of(groups)), denoiser))
    return TrainingMode(CombinedMode(parts + [_mask_group(groups, rest)]), modules, list(groups))


MODES: dict[str, ModeFactory] = {
    "lycoris": _lycoris,
    "low_memory": _low_memory,
    "fold": _fold,
}


def check_mode(mode: str) -> None:
    """Raise for a mode name this version does not have."""
    if mode != "auto" and mode not in MODES:
        raise TLoRAError(f"Unknown mode {mode!r}: use 'auto' (the default) or one of {sorted(MODES)}.")


def build_mode(mode: str, groups: GroupModules, denoiser: nn.Module | None = None) -> MaskMode:
    """The mode `mode` names over the active adapters' modules (`groups`: by mask group), with "auto" resolved for
    them (and their denoiser's offloading hooks); with no active adapter, a mode that does nothing.

    A module LyCORIS applied over an accelerate hook is first put inside it, so removing the hook keeps the module
    in the forward (undone when the mode is removed)."""
    check_mode(mode)
    modules = _all(groups)
    if not modules:
        return TrainingMode(CombinedMode([]), [], [])
    nestings = HookNesting.wherever_needed(modules)
    try:
        if mode == "auto":
            mode = resolve_auto(split(modules, denoiser)[0])
        built = MODES[mode](groups, denoiser)
    except BaseException:
        for nesting in nestings:
            nesting.undo()
        raise
    return NestedMode(built, nestings) if nestings else built
