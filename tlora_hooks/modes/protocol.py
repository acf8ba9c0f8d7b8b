"""What the hooks need from a mode, and what builds one."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


class MaskMode(Protocol):
    """A way to run the masked forward: takes a (1, max_rank) mask per inference call, the (batch, max_rank) masks
    of a training call (`set_sample_masks`), clears them, undoes everything. `call_masks()` captures what the running
    call set and `replaying(...)` sets it again, for a gradient-checkpointing recompute during backward."""

    name: str
    mask_dtype: torch.dtype
    extra_memory_bytes: int
    group_id: int
    modules: list[TLoraModule]

    def set_mask(self, mask: torch.Tensor) -> None: ...

    def set_sample_masks(self, masks: torch.Tensor) -> None: ...

    def call_masks(self) -> Any: ...

    def replaying(self, call_masks: Any) -> AbstractContextManager[None]: ...

    def clear_mask(self) -> None: ...

    def remove(self) -> None: ...


# (modules, LyCORIS mask group, their denoiser or None) -> the mode over those modules.
ModeFactory = Callable[[list["TLoraModule"], int, "nn.Module | None"], MaskMode]
