"""What `mode="auto"` picks: `"fold"` where the devices have room for the copy of the weights it keeps, else
`"low_memory"`. Decided at enable time, so every call, the first included, runs the same mode."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..logging import get_logger
from .factors import base_layer

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

logger = get_logger(__name__)

# "auto" folds only if the copy of W0 leaves this share of the device's memory free for activations.
FOLD_MEMORY_HEADROOM = 0.15


def resolve_auto(foldable: list[TLoraModule]) -> str:
    """The mode "auto" means for a denoiser whose foldable modules are `foldable`."""
    return "fold" if foldable and room_to_fold(foldable) else "low_memory"


def room_to_fold(modules: list[TLoraModule]) -> bool:
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
                "free); using the low_memory mode.", size / 2**30, device, free / 2**30, FOLD_MEMORY_HEADROOM * 100,
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
