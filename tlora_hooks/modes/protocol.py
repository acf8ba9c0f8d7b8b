"""What the hooks need from a mode, and what builds one."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

# Each active adapter's mask by its LyCORIS mask group: (1, max_rank) for an inference call, (rows, max_rank) for a
# training call, scaled by the adapter's strength.
GroupMasks = dict[int, torch.Tensor]
# Each active adapter's modules by its LyCORIS mask group.
GroupModules = dict[int, list["TLoraModule"]]


class MaskMode(Protocol):
    """A way to run the masked forward of one denoiser's active adapters: takes each adapter's mask per inference
    call (`set_masks`), the per-sample masks of a training call (`set_sample_masks`), clears them, undoes everything.
    `call_masks()` captures what the running call set and `replaying(...)` sets it again, for a
    gradient-checkpointing recompute during backward."""

    name: str
    mask_dtype: torch.dtype
    extra_memory_bytes: int
    modules: list[TLoraModule]

    def set_masks(self, masks: GroupMasks) -> None: ...

    def set_sample_masks(self, masks: GroupMasks) -> None: ...

    def call_masks(self) -> Any: ...

    def replaying(self, call_masks: Any) -> AbstractContextManager[None]: ...

    def clear_masks(self) -> None: ...

    def remove(self) -> None: ...


# (modules by mask group, their denoiser or None) -> the mode over those modules.
ModeFactory = Callable[[GroupModules, "nn.Module | None"], MaskMode]


def group_of(groups: GroupModules) -> dict[int, int]:
    """Each module's mask group, by id of the module."""
    return {id(module): group for group, modules in groups.items() for module in modules}


def by_group(modules: list[TLoraModule], groups: dict[int, int]) -> GroupModules:
    """`modules` by the mask group `groups` (from `group_of`) gives each."""
    chosen: GroupModules = {}
    for module in modules:
        chosen.setdefault(groups[id(module)], []).append(module)
    return chosen
