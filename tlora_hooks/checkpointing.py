"""Gradient checkpointing that recomputes with the masks of its own forward.

diffusers' `enable_gradient_checkpointing()` sets `_gradient_checkpointing_func` on every submodule with a
`gradient_checkpointing` attribute; the blocks call it as `func(block, *args)`. The recompute runs during `backward`,
after the denoiser call's post-hook cleared its masks: unmasked, LyCORIS would use every rank there (wrong gradients,
silently). Each such function gets a wrapper that captures the masks of the call it runs in and hands the checkpoint
function a callable that sets them again around the block, whenever it is called: the forward itself, the
non-reentrant recompute, the reentrant one, or a user's function that calls the block it is given. The wrappers are
put in place on every training call (so enabling checkpointing after `enable_tlora` is followed) and removed, leaving
the original functions, by `disable_tlora`.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from torch import nn

from .errors import TLoRAError

FUNCTION_ATTRIBUTE = "_gradient_checkpointing_func"


class ReplayingCall:
    """The block handed to the checkpoint function: calls it with the captured masks set, and reads through to it
    for anything else (a user's function may look at the module it is given)."""

    def __init__(self, block: Callable, hook: Any, call_masks: Any) -> None:
        self.block = block
        self.hook_ref = weakref.ref(hook)
        self.call_masks = call_masks

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hook = _live_hook(self.hook_ref)
        if hook is None:
            raise TLoRAError(
                "T-LoRA was disabled (or enabled again) between a checkpointed forward and its backward: the "
                "recompute cannot set that forward's masks. Run backward before changing the T-LoRA setup."
            )
        with hook.mode.replaying(self.call_masks):
            return self.block(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "block":
            raise AttributeError(name)
        return getattr(self.block, name)


class MaskReplayingCheckpoint:
    """Wraps one `_gradient_checkpointing_func` for one hook."""

    def __init__(self, original: Callable, hook: Any) -> None:
        self.original = original
        self.hook_ref = weakref.ref(hook)

    def __call__(self, block: Callable, *args: Any, **kwargs: Any) -> Any:
        hook = _live_hook(self.hook_ref)
        if hook is None:
            return self.original(block, *args, **kwargs)
        return self.original(ReplayingCall(block, hook, hook.mode.call_masks()), *args, **kwargs)


class CheckpointWrappers:
    """The checkpointing submodules of one denoiser, and the wrappers one hook puts on their functions."""

    def __init__(self, denoiser: nn.Module, hook: Any) -> None:
        self.hook_ref = weakref.ref(hook)
        self._modules = [weakref.ref(m) for m in denoiser.modules() if hasattr(m, "gradient_checkpointing")]

    def wrap(self) -> None:
        """Wrap every function set since the last call (cheap: a dict lookup per checkpointing submodule)."""
        hook = self.hook_ref()
        for module in self._live():
            function = module.__dict__.get(FUNCTION_ATTRIBUTE)
            if function is None or self._ours(function):
                continue
            if isinstance(function, MaskReplayingCheckpoint) and not _live_hook(function.hook_ref):
                function = function.original  # left by a hook that was removed without unwrapping
            setattr(module, FUNCTION_ATTRIBUTE, MaskReplayingCheckpoint(function, hook))

    def unwrap(self) -> None:
        """Give back the original functions this hook wrapped (a function set since is left alone)."""
        for module in self._live():
            function = module.__dict__.get(FUNCTION_ATTRIBUTE)
            if self._ours(function):
                setattr(module, FUNCTION_ATTRIBUTE, function.original)

    def _ours(self, function: Any) -> bool:
        return isinstance(function, MaskReplayingCheckpoint) and function.hook_ref() is self.hook_ref()

    def _live(self) -> list[nn.Module]:
        return [module for module in (ref() for ref in self._modules) if module is not None]


def _live_hook(hook_ref: weakref.ref) -> Any:
    """The hook, while it is installed; None once removed."""
    hook = hook_ref()
    return hook if hook is not None and hook.active else None
