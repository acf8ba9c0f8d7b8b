"""Modes over disjoint sets of one denoiser's modules, driven as one."""

from __future__ import annotations

import torch

from .protocol import GroupMasks


class CombinedMode:
    """Several modes, each over its own modules, set and cleared together."""

    def __init__(self, parts: list) -> None:
        self.parts = [part for part in parts if part is not None]

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts if getattr(part, "runs_modules", True)) or "none"

    @property
    def mask_dtype(self) -> torch.dtype:
        return self.parts[0].mask_dtype if self.parts else torch.float32

    @property
    def extra_memory_bytes(self) -> int:
        return sum(part.extra_memory_bytes for part in self.parts)

    def set_masks(self, masks: GroupMasks) -> None:
        for part in self.parts:
            dtype = part.mask_dtype
            part.set_masks({group: mask if mask.dtype == dtype else mask.to(dtype) for group, mask in masks.items()})

    def clear_masks(self) -> None:
        for part in self.parts:
            part.clear_masks()

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

    def set_masks(self, masks: GroupMasks) -> None:
        self.mode.set_masks(masks)

    def clear_masks(self) -> None:
        self.mode.clear_masks()

    def remove(self) -> None:
        self.mode.remove()
        while self.nestings:
            self.nestings.pop().undo()
