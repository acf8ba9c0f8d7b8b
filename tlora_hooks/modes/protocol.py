"""What the hooks need from a mode, and what builds one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


class MaskMode(Protocol):
    """A way to run the masked forward: takes a (1, max_rank) mask per call, clears it, undoes everything."""

    name: str
    mask_dtype: torch.dtype
    extra_memory_bytes: int
    group_id: int

    def set_mask(self, mask: torch.Tensor) -> None: ...

    def clear_mask(self) -> None: ...

    def remove(self) -> None: ...


# (modules, LyCORIS mask group, their denoiser or None) -> the mode over those modules.
ModeFactory = Callable[[list["TLoraModule"], int, "nn.Module | None"], MaskMode]
