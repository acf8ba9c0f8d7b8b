"""The reference mode: LyCORIS's own T-LoRA forward, driven through its mask API."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import TLoRAError
from .chain import ForwardPathCheck
from .per_sample import SampleMasks
from .protocol import GroupMasks, GroupModules

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


class LycorisMode:
    """Keeps LyCORIS's module forward and sets each adapter's mask in its own LyCORIS mask group."""

    name = "lycoris"
    def __init__(self, groups: GroupModules, runs: list[TLoraModule] | None = None) -> None:
        self.groups = groups
        # False where the fast modes run every module and this one only publishes the masks in the groups.
        self.runs_modules = runs is None or bool(runs)
        self.modules = [module for modules in groups.values() for module in modules]
        # The modules whose LyCORIS forward this mode runs must stay in their layers' forward chains.
        self.path_check = ForwardPathCheck(self.modules if runs is None else runs, "the lycoris mode")
        self._original_groups = [module.mask_group_id for module in self.modules]
        for group, modules in groups.items():
            for module in modules:
                module.mask_group_id = group

    @property
    def mask_dtype(self) -> torch.dtype:
        """The dtype of the modules' singular values, so `lambda * mask` keeps their dtype."""
        return self.modules[0].lambda_layer.dtype

    @property
    def extra_memory_bytes(self) -> int:
        """No copies: LyCORIS rebuilds the delta inside each call."""
        return 0

    def set_masks(self, masks: GroupMasks) -> None:
        self.path_check.check()
        set_group_masks(masks)

    def set_sample_masks(self, masks: GroupMasks) -> None:
        """A training call: LyCORIS holds one mask per call, so every sample must have the same rank."""
        for mask in masks.values():
            sample = SampleMasks(mask)
            if not sample.uniform():
                raise TLoRAError(
                    "mode='lycoris' runs LyCORIS's own forward, which holds one mask per call (set_timestep_mask), "
                    f"but the samples of this batch need ranks {sample.ranks()}. The default mode trains with one "
                    "mask per sample: enable_tlora(..., mode='auto'). Or give every sample of a batch the same "
                    "timestep."
                )
        self.set_masks({group: mask[:1].to(self.mask_dtype) for group, mask in masks.items()})

    def clear_masks(self) -> None:
        set_group_masks(dict.fromkeys(self.groups))

    def refresh(self) -> None:
        """Nothing to rebuild: LyCORIS reads its parameters on every call."""

    def training_routes(self) -> list:
        """None of its own: inside a fast mode, `TrainingMode` routes the modules this part runs."""
        return []

    def leave_training(self) -> None:
        """Nothing to undo."""

    def call_masks(self) -> dict[int, torch.Tensor | None]:
        """The masks of the running call, for a recompute during backward to set again."""
        return {group: group_mask(group) for group in self.groups}

    @contextmanager
    def replaying(self, call_masks: dict[int, torch.Tensor | None]) -> Iterator[None]:
        previous = self.call_masks()
        set_group_masks(call_masks)
        try:
            yield
        finally:
            set_group_masks(previous)

    def remove(self) -> None:
        """Give the modules back their original mask groups."""
        self.clear_masks()
        for module, group in zip(self.modules, self._original_groups):
            module.mask_group_id = group


def group_mask(group_id: int) -> torch.Tensor | None:
    """The mask set for a group in LyCORIS's storage (imported on first use: LyCORIS is slow to import)."""
    from lycoris.modules.tlora import get_timestep_mask

    return get_timestep_mask(group_id)


def set_group_mask(mask: torch.Tensor | None, group_id: int) -> None:
    """Set (or, for None, clear) a mask group in LyCORIS's storage."""
    from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

    if mask is None:
        clear_timestep_mask(group_id)
    else:
        set_timestep_mask(mask, group_id)


def set_group_masks(masks: dict[int, torch.Tensor | None]) -> None:
    """Set (or clear, for None) several groups in LyCORIS's storage."""
    for group, mask in masks.items():
        set_group_mask(mask, group)
