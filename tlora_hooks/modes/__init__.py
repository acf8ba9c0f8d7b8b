"""Ways to run the masked forward; each is tested against LyCORIS's own (`"lycoris"`)."""

from __future__ import annotations

from typing import Protocol

import torch
from lycoris.modules.tlora import TLoraModule

from ..errors import TLoRAError
from .lycoris import LycorisMaskPath


class MaskedForward(Protocol):
    """What the hooks need from a path: take a (1, max_rank) mask per call, clear it, undo everything."""

    name: str
    mask_dtype: torch.dtype
    extra_memory_bytes: int

    def set_mask(self, mask: torch.Tensor) -> None: ...

    def clear_mask(self) -> None: ...

    def remove(self) -> None: ...


MODES: dict[str, type] = {"lycoris": LycorisMaskPath}
# What "auto" means, in order of preference; the first path that accepts the modules wins.
AUTO_ORDER: tuple[str, ...] = ("lycoris",)


def check_mode(mode: str) -> None:
    """Raise for a mode name this version does not have."""
    if mode != "auto" and mode not in MODES:
        raise TLoRAError(f"Unknown mode {mode!r}: use 'auto' (the default) or one of {sorted(MODES)}.")


def build_path(mode: str, modules: list[TLoraModule], group_id: int) -> MaskedForward:
    """The path `mode` names, with "auto" resolved for these modules."""
    check_mode(mode)
    name = AUTO_ORDER[0] if mode == "auto" else mode
    return MODES[name](modules, group_id)
