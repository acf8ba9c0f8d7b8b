"""Where each T-LoRA layer runs, so the fast modes keep its state there: a denoiser split across devices (a
model-level `device_map`, run by accelerate's hooks) then copies no factor per layer per call.

A layer runs on the execution device of the nearest accelerate hook on it or above it (`AlignDevicesHook`,
`CpuOffload`), or the onload device of a diffusers group-offloading hook; otherwise where its weight is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def hook_device(module: nn.Module) -> torch.device | None:
    """The device a hook on `module` runs it on, if one says."""
    hook = module.__dict__.get("_hf_hook")
    for candidate in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook holds several
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return _as_device(device)
    hooks = getattr(module.__dict__.get("_diffusers_hook"), "hooks", {})
    for candidate in hooks.values():
        device = getattr(getattr(candidate, "group", None), "onload_device", None)
        if device is not None:
            return _as_device(device)
    return None


def execution_devices(denoiser: nn.Module | None, layers: list[nn.Module]) -> list[torch.device | None]:
    """Each layer's execution device; None where neither a hook nor a real weight says (a meta weight)."""
    hooked: dict[int, torch.device] = {}
    if denoiser is not None:
        inherited: dict[str, torch.device | None] = {}
        for path, module in denoiser.named_modules():  # parents before children
            parent = inherited.get(path.rpartition(".")[0]) if path else None
            inherited[path] = hook_device(module) or parent
            if inherited[path] is not None:
                hooked[id(module)] = inherited[path]
    devices = []
    for layer in layers:
        weight = getattr(layer, "weight", None)
        own = weight.device if isinstance(weight, torch.Tensor) and weight.device.type != "meta" else None
        devices.append(hooked.get(id(layer), own))
    return devices


def _as_device(device: Any) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)
