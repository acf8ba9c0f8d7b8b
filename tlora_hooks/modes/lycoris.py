"""The reference mode: LyCORIS's own T-LoRA forward, driven through its mask API."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


class LycorisMode:
    """Keeps LyCORIS's module forward and sets its mask for one denoiser's private mask group."""

    name = "lycoris"
    # False where the fast modes run every module and this one only publishes the mask in the group.
    runs_modules = True

    def __init__(self, modules: list[TLoraModule], group_id: int) -> None:
        from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

        self._set_timestep_mask, self._clear_timestep_mask = set_timestep_mask, clear_timestep_mask
        self.modules = modules
        self.group_id = group_id
        self._original_groups = [module.mask_group_id for module in modules]
        for module in modules:
            module.mask_group_id = group_id

    @property
    def mask_dtype(self) -> torch.dtype:
        """The dtype of the modules' singular values, so `lambda * mask` keeps their dtype."""
        return self.modules[0].lambda_layer.dtype

    @property
    def extra_memory_bytes(self) -> int:
        """No copies: LyCORIS rebuilds the delta inside each call."""
        return 0

    def set_mask(self, mask: torch.Tensor) -> None:
        self._set_timestep_mask(mask, self.group_id)

    def clear_mask(self) -> None:
        self._clear_timestep_mask(self.group_id)

    def remove(self) -> None:
        """Give the modules back their original mask groups."""
        self.clear_mask()
        for module, group in zip(self.modules, self._original_groups):
            module.mask_group_id = group
