"""Catching calls that reach a hooked denoiser's blocks without calling the denoiser, so no mask was set.

xDiT (`xDiTParallel`) replaces `pipe.transformer` with a wrapper whose `forward` runs the original blocks itself:
the original transformer is never called, its hooks never run, and its T-LoRA layers would run with no mask (all
ranks), or in the fold mode with whatever mask the last call folded. A forward pre-hook on each block that holds
T-LoRA layers raises then. It costs one attribute test per block per call, and no work per layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import TLoRAError

CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # never called themselves: their children are the blocks


def entry_blocks(denoiser: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """For each layer, the outermost module below the denoiser on its path that something calls: a child of the
    denoiser, or an element of a `ModuleList` (a transformer block)."""
    paths = {id(module): path for path, module in denoiser.named_modules()}
    blocks: dict[str, nn.Module] = {}
    for layer in layers:
        path = paths.get(id(layer))
        if not path:
            continue
        module, prefix = denoiser, []
        for part in path.split("."):
            module = module.get_submodule(part)
            prefix.append(part)
            if not isinstance(module, CONTAINERS):
                blocks.setdefault(".".join(prefix), module)
                break
    return list(blocks.values())


def in_backward() -> bool:
    """Whether autograd is running a backward pass: gradient checkpointing re-runs blocks there, outside the call."""
    return torch._C._current_graph_task_id() != -1


class BlockGuard:
    """A pre-hook on a denoiser's blocks that raises when one runs while no hooked call of the denoiser does."""

    def __init__(self, name: str, denoiser: nn.Module, layers: list[nn.Module], calling: Callable[[], bool]) -> None:
        self.name = name
        self.denoiser_class = type(denoiser).__name__
        self.calling = calling
        self.handles = [block.register_forward_pre_hook(self.check) for block in entry_blocks(denoiser, layers)]

    def check(self, block: nn.Module, args: tuple) -> None:
        if self.calling() or in_backward():
            return
        raise TLoRAError(
            f"A {type(block).__name__} block of {self.name} ({self.denoiser_class}) ran outside a call of "
            f"{self.denoiser_class}, so T-LoRA set no mask for it. A wrapper that runs the blocks from its own "
            "forward (xDiT's xDiTParallel replaces pipe.transformer with one) bypasses the denoiser's hooks. Call "
            "enable_tlora(pipe, ...) again after wrapping (with the values load_tlora used, if it loaded the file): "
            "the hooks then go on the module the pipeline calls. Blocks run by hand, outside any call of the "
            "denoiser, need disable_tlora first."
        )
