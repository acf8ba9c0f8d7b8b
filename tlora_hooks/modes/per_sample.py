"""The forward of a training call: each sample masked by the rank of its own timestep, differentiable.

For a T-LoRA module with rank r and a (B, max_rank) mask, one row m_b per sample,

    out = org(x) + s·[P((Qx) ⊙ λ ⊙ m_b) − P₀((Q₀x) ⊙ λ₀ ⊙ m_b)],

computed as one matmul into a 2r-wide hidden, h = x·Aᵀ with A = [Q; Q − Q₀], masked per sample, and one out of it,
h·Bᵀ with B = s·[Pλ − P₀λ₀, P₀λ₀] (`factors.stacked_factors`, built with autograd on every call). The mask row of
sample b broadcasts over its tokens: rank on the last dim for Linear inputs (B, C) and (B, N, C), on dim 1 for 1×1
convolutions (B, C, H, W).

The masks are kept per LyCORIS mask group, as LyCORIS keys its own (1, max_rank) mask: each adapter of a denoiser has
its own group, so each module is masked by its own adapter's schedule and strength.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..errors import TLoRAError
from .factors import factor_terms, stacked_factors

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule


class SampleMasks:
    """One training call's masks, (rows, max_rank) with rows = 1 (one rank for every sample) or the batch size;
    the doubled [m, m] columns of each module rank are built once per call, not once per layer."""

    def __init__(self, masks: torch.Tensor) -> None:
        self.masks = masks
        self.rows = masks.shape[0]
        self._doubled: dict[tuple, torch.Tensor] = {}
        self._uniform: bool | None = None

    def doubled(self, rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(rows, 2·rank): each row's first `rank` ranks, twice (the two halves of A and B)."""
        key = (rank, dtype, device)
        if key not in self._doubled:
            rows = self.masks[:, :rank].to(device, dtype)
            self._doubled[key] = torch.cat([rows, rows], dim=1)
        return self._doubled[key]

    def uniform(self) -> bool:
        """Whether every sample has the same rank (reads the masks back once per call: a device sync)."""
        if self._uniform is None:
            self._uniform = self.rows == 1 or bool((self.masks == self.masks[:1]).all())
        return self._uniform

    def ranks(self) -> list[int]:
        """Each row's rank: its nonzero entries (a strength scales the ones)."""
        return [int(rank) for rank in (self.masks != 0).sum(dim=1).tolist()]


_sample_masks: dict[int, SampleMasks] = {}


def set_sample_masks(masks: SampleMasks, group_id: int) -> None:
    _sample_masks[group_id] = masks


def get_sample_masks(group_id: int) -> SampleMasks | None:
    return _sample_masks.get(group_id)


def clear_sample_masks(group_id: int) -> None:
    _sample_masks.pop(group_id, None)


class PerSampleForward:
    """A module's layer output plus its per-sample masked delta; reached through LyCORIS's forward (its
    `bypass_mode` branch calls `bypass_forward(x, scale=multiplier)`), which keeps LyCORIS's module dropout.

    Args:
        module: The LyCORIS T-LoRA module.
        base_forward: The layer's own output for x, without this module's delta.
        dropout: Whether to apply the module's `dropout` to the delta, as LyCORIS does in its bypass mode only.
    """

    __slots__ = ("module", "base_forward", "dropout", "spatial_dims")

    def __init__(self, module: TLoraModule, base_forward: Callable, dropout: bool) -> None:
        self.module = module
        self.base_forward = base_forward
        self.dropout = module.dropout if dropout else None
        self.spatial_dims = len(module.shape) - 2 if module.isconv else None

    def __call__(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        module = self.module
        out = self.base_forward(x)
        a, b = stacked_factors(*factor_terms(module), scale=module.scale * scale)
        masks = get_sample_masks(module.mask_group_id)
        if self.spatial_dims is None:
            hidden = F.linear(x, a.to(x.dtype))
            if masks is not None:
                hidden = hidden * self._rank_mask(masks, hidden, channel_dim=hidden.dim() - 1)
            delta = F.linear(hidden, b.to(hidden.dtype))
        else:
            kernel = (1,) * self.spatial_dims
            hidden = module.op(x, a.to(x.dtype).view(*a.shape, *kernel), None, **module.kw_dict)
            if masks is not None:
                batched = hidden.dim() == self.spatial_dims + 2
                hidden = hidden * self._rank_mask(masks, hidden, channel_dim=1 if batched else 0)
            delta = module.op(hidden, b.to(hidden.dtype).view(*b.shape, *kernel))
        if self.dropout is not None:
            delta = self.dropout(delta)
        return out + delta

    def _rank_mask(self, masks: SampleMasks, hidden: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """The doubled mask shaped to broadcast over `hidden`: one row per sample along dim 0, rank along
        `channel_dim`, ones elsewhere."""
        doubled = masks.doubled(self.module.lora_dim, hidden.dtype, hidden.device)
        trailing = [1] * (hidden.dim() - channel_dim - 1)
        if masks.rows > 1 and channel_dim > 0 and hidden.shape[0] == masks.rows:
            return doubled.view(masks.rows, *[1] * (channel_dim - 1), -1, *trailing)
        if masks.rows == 1 or masks.uniform():
            return doubled[0].view(-1, *trailing)
        raise TLoRAError(
            f"T-LoRA module {self.module.lora_name} received an input whose first dim ({hidden.shape[0]}) is not the "
            f"batch size ({masks.rows}), while the samples need different ranks {masks.ranks()}. Which rows belong to "
            "which sample cannot be told from the shape (a batch-major (b, f) and a frame-major (f, b) flattening "
            "look alike), so no per-sample mask is applied here. Give the samples of a batch the same timestep for "
            "this denoiser, or train it at batch size 1."
        )
