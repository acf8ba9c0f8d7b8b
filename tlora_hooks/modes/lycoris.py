"""The reference mode: LyCORIS's own T-LoRA forward, driven through its mask API."""

from __future__ import annotations

import torch
from lycoris.modules.tlora import TLoraModule, clear_timestep_mask, set_timestep_mask

from .chain import ForwardPathCheck


class LycorisMode:
    """Keeps LyCORIS's module forward and sets its mask for one denoiser's private mask group."""

    name = "lycoris"
    # False where the fast modes run every module and this one only publishes the mask in the group.
    runs_modules = True

    def __init__(self, modules: list[TLoraModule], group_id: int, runs: list[TLoraModule] | None = None) -> None:
        self.modules = modules
        self.group_id = group_id
        # The modules whose LyCORIS forward this mode runs must stay in their layers' forward chains.
        self.path_check = ForwardPathCheck(modules if runs is None else runs, "the lycoris mode")
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
        self.path_check.check()
        set_timestep_mask(mask, self.group_id)

    def clear_mask(self) -> None:
        clear_timestep_mask(self.group_id)

    def remove(self) -> None:
        """Give the modules back their original mask groups."""
        self.clear_mask()
        for module, group in zip(self.modules, self._original_groups):
            module.mask_group_id = group
