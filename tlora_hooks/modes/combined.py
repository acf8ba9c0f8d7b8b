"""Modes over disjoint sets of one denoiser's modules, driven as one."""

from __future__ import annotations

import torch


class CombinedMode:
    """Several modes, each over its own modules, set and cleared together."""

    def __init__(self, parts: list, group_id: int) -> None:
        self.parts = [part for part in parts if part is not None]
        self.group_id = group_id

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts if getattr(part, "runs_modules", True)) or "none"

    @property
    def mask_dtype(self) -> torch.dtype:
        return self.parts[0].mask_dtype if self.parts else torch.float32

    @property
    def extra_memory_bytes(self) -> int:
        return sum(part.extra_memory_bytes for part in self.parts)

    def set_mask(self, mask: torch.Tensor) -> None:
        for part in self.parts:
            part.set_mask(mask if mask.dtype == part.mask_dtype else mask.to(part.mask_dtype))

    def clear_mask(self) -> None:
        for part in self.parts:
            part.clear_mask()

    def refresh(self) -> None:
        for part in self.parts:
            part.refresh()

    def remove(self) -> None:
        while self.parts:
            self.parts.pop().remove()


class NestedMode:
    """A mode over modules that were put inside accelerate hooks (`chain.HookNesting`); its removal undoes that."""

    def __init__(self, mode, nestings: list) -> None:
        self.mode = mode
        self.nestings = nestings

    def __getattr__(self, name: str):
        return getattr(self.__dict__["mode"], name)

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mode.set_mask(mask)

    def clear_mask(self) -> None:
        self.mode.clear_mask()

    def remove(self) -> None:
        self.mode.remove()
        while self.nestings:
            self.nestings.pop().undo()
