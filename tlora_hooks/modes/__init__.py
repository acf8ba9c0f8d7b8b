"""Ways to run the masked forward; each is tested against LyCORIS's own (`"lycoris"`).

- `"lycoris"`: LyCORIS's own forward (rebuilds ΔW in every layer on every call): the reference.
- `"low_memory"`: y = layer(x) + (x·A_mᵀ)·B_mᵀ beside the untouched base layer, one factor of each shape group
  masked per call; any linear-like base (fp8, quantized, offloaded); extra memory: the thin factors only.
- `"fold"`: writes W0 + B·diag(m)·A into the weights once per call (one batched matmul per shape group), then the
  layers run at plain speed; extra memory: a copy of the folded weights.
- `"auto"` (default): `"fold"` when the weights are plain float `nn.Linear` with no offloading hook, on a device with
  room for the copy; `"low_memory"` otherwise. Decided at enable time, so every call, the first included, runs the
  same path. (A per-layer mix, folding many-token layers and bypassing few-token ones, measured slower on an H200
  for SDXL's 700 modules: the bypass costs Python per module per call. See benchmarks/RESULTS.md.)
Modules no fast path reproduces (convolutions, dropout active in training mode) stay on LyCORIS's forward.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

import torch
from lycoris.modules.tlora import TLoraModule
from torch import nn

from ..errors import TLoRAError
from ..logging_utils import get_logger
from .chain import ChainLink
from .factors import base_layer, foldable, has_offload_hook, takes_fast_path
from .fold import FoldPath
from .low_memory import LowMemoryPath
from .lycoris import LycorisMaskPath
from .mixed import MixedPath

logger = get_logger(__name__)

# "auto" folds only if the copy of W0 leaves this share of the device's memory free for activations.
FOLD_MEMORY_HEADROOM = 0.15


class MaskedForward(Protocol):
    """What the hooks need from a path: take a (1, max_rank) mask per call, clear it, undo everything."""

    name: str
    mask_dtype: torch.dtype
    extra_memory_bytes: int
    group_id: int

    def set_mask(self, mask: torch.Tensor) -> None: ...

    def clear_mask(self) -> None: ...

    def remove(self) -> None: ...


PathFactory = Callable[[list[TLoraModule], int, "nn.Module | None"], MaskedForward]


def _split(modules: list[TLoraModule], denoiser: nn.Module | None) -> tuple[list, list, list]:
    """(foldable, other fast-path modules, modules left to LyCORIS's forward)."""
    offloaded = denoiser is not None and any(has_offload_hook(m) for m in denoiser.modules())
    seen: set[int] = set()  # a layer (or a weight tied between layers) is folded once; other modules on it bypass
    fold, bypass, rest = [], [], []
    for module in modules:
        layer = base_layer(module)
        ids = {id(layer), id(getattr(layer, "weight", None))}
        if not takes_fast_path(module):
            rest.append(module)
        elif not offloaded and not ids & seen and foldable(module) and _reachable(module):
            fold.append(module)
        else:
            bypass.append(module)
        seen |= ids
    return fold, bypass, rest


def _reachable(module: TLoraModule) -> bool:
    return ChainLink.slot(module) is not None


def _mask_group(modules: list[TLoraModule], rest: list[TLoraModule], group_id: int) -> LycorisMaskPath:
    """LyCORIS's mask API for every module: it runs `rest` (modules no fast path takes) and publishes each call's mask
    in the denoiser's mask group, so `handle.mask_groups` and `get_timestep_mask(group)` mean the same in every mode."""
    path = LycorisMaskPath(modules, group_id)
    path.runs_modules = bool(rest)
    return path


def _lycoris(modules, group_id, denoiser=None) -> MaskedForward:
    return LycorisMaskPath(modules, group_id)


def _low_memory(modules, group_id, denoiser=None) -> MaskedForward:
    fold, bypass, rest = _split(modules, denoiser)
    fast = fold + bypass
    parts = [LowMemoryPath(fast, group_id)] if fast else []
    return MixedPath(parts + [_mask_group(modules, rest, group_id)], group_id)


def _fold(modules, group_id, denoiser=None) -> MaskedForward:
    fold, bypass, rest = _split(modules, denoiser)
    parts = [FoldPath(fold, group_id)] if fold else []
    if bypass:
        parts.append(LowMemoryPath(bypass, group_id))
    return MixedPath(parts + [_mask_group(modules, rest, group_id)], group_id)


def _auto(modules, group_id, denoiser=None) -> MaskedForward:
    fold, _, _ = _split(modules, denoiser)
    if fold and _room_to_fold(fold):
        return _fold(modules, group_id, denoiser)
    return _low_memory(modules, group_id, denoiser)


MODES: dict[str, PathFactory] = {
    "lycoris": _lycoris,
    "low_memory": _low_memory,
    "fold": _fold,
}


# What "auto" resolves to (tests that count LyCORIS's own mask reads point it at MODES["lycoris"]).
auto_policy: PathFactory = _auto


def check_mode(mode: str) -> None:
    """Raise for a mode name this version does not have."""
    if mode != "auto" and mode not in MODES:
        raise TLoRAError(f"Unknown mode {mode!r}: use 'auto' (the default) or one of {sorted(MODES)}.")


def build_path(
    mode: str, modules: list[TLoraModule], group_id: int, denoiser: nn.Module | None = None
) -> MaskedForward:
    """The path `mode` names, with "auto" resolved for these modules (and their denoiser's offloading hooks)."""
    check_mode(mode)
    factory = auto_policy if mode == "auto" else MODES[mode]
    return factory(modules, group_id, denoiser)


def _room_to_fold(modules: list[TLoraModule]) -> bool:
    """Whether each device holding these weights has room for their W0 copy, with headroom for activations."""
    needed: dict[torch.device, int] = {}
    for module in modules:
        weight = base_layer(module).weight
        needed[weight.device] = needed.get(weight.device, 0) + weight.numel() * weight.element_size()
    for device, size in needed.items():
        free, total = memory_info(device)
        if free is not None and size > free - FOLD_MEMORY_HEADROOM * total:
            logger.info(
                "T-LoRA auto: %.2f GiB for the fold copy exceeds the free memory of %s (%.2f GiB, keeping %d%% "
                "free); using the low-memory path.", size / 2**30, device, free / 2**30, FOLD_MEMORY_HEADROOM * 100,
            )
            return False
    return True


def memory_info(device: torch.device) -> tuple[int | None, int]:
    """(free, total) bytes where they can be read: CUDA from the driver (plus torch's cached blocks), CPU from
    /proc/meminfo; (None, 0) elsewhere."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        fields = {}
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        if "MemAvailable" in fields:
            return fields["MemAvailable"], fields.get("MemTotal", 0)
    return None, 0
