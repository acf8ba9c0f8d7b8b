"""The per-denoiser pre/post hooks that set the T-LoRA mask for every call, and the handle that removes them.

A hook only reads the call (its timestep value, its device, the scheduler at that moment) and hands the mask that
`call_rank.CallRank` chooses to the denoiser's mode; `thread_guard.ThreadGuard` keeps other threads out meanwhile.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .block_guard import BlockGuard
from .call_rank import CallRank
from .checkpointing import CheckpointWrappers
from .discovery import applied_tlora_modules
from .errors import TLoRAError
from .modes import MaskMode
from .modes.lycoris import set_group_mask
from .modes.per_sample import clear_sample_masks
from .thread_guard import ThreadGuard

STATE_ATTRIBUTE = "_tlora_hooks_state"

_group_ids = itertools.count(1)


def next_mask_group() -> int:
    """A LyCORIS mask group no other enabled denoiser uses (SimpleTuner's training loop uses 0)."""
    return next(_group_ids)


def clear_group(group_id: int) -> None:
    """Drop whatever masks a call left in a mask group (LyCORIS's, and the per-sample masks of training calls)."""
    set_group_mask(None, group_id)
    clear_sample_masks(group_id)


def compute_device(args: tuple, kwargs: dict, fallback: torch.device) -> torch.device:
    """Where the call will run: the device of its first floating-point input."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.device
    return fallback


def batch_size(args: tuple, kwargs: dict, timestep: Any) -> int:
    """A training call's batch size: the first dim of its first floating-point tensor input other than the timestep
    (`sample` / `hidden_states` in diffusers' denoisers), else of the timestep itself."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() and value is not timestep:
            return value.shape[0]
    return timestep.shape[0] if isinstance(timestep, torch.Tensor) and timestep.dim() else 1


class DenoiserHook:
    """Reads one denoiser's timestep on every call and sets its T-LoRA mask; clears it afterwards."""

    def __init__(
        self,
        name: str,
        denoiser: nn.Module,
        call_rank: CallRank,
        read_timestep: Callable[[nn.Module, tuple, dict], Any],
        scheduler_source: Callable[[], Any],
        mode: MaskMode,
    ) -> None:
        self.name = name
        self.call_rank = call_rank
        self.read_timestep = read_timestep
        self.scheduler_source = scheduler_source
        self.mode = mode
        self.denoiser_ref = weakref.ref(denoiser)
        self.guard = ThreadGuard(name)
        self.in_block = False  # owned by an open `with` block, which only its exit may end
        self.checkpoints = CheckpointWrappers(denoiser, self)
        self._handles = [
            denoiser.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
            denoiser.register_forward_hook(self.post_forward, with_kwargs=True, always_call=True),
        ]
        # A block run while no call of this denoiser runs was reached around its hooks (an xDiT wrapper): raise.
        layers = [module.org_module[0] for module in applied_tlora_modules(denoiser)]
        self._handles += BlockGuard(name, denoiser, layers, self.guard.running).handles
        # A mask left set by an interrupted call must not outlive the denoiser in LyCORIS's global storage
        # (the finalizer holds the group number only, so the modules are freed with the denoiser).
        self._finalizer = weakref.finalize(denoiser, clear_group, mode.group_id)
        setattr(denoiser, STATE_ATTRIBUTE, self)

    # -- per call -------------------------------------------------------------------------------
    # Under torch.compile(denoiser) the hooks run eagerly: the graph breaks only here. Traced, the hook's Python
    # state (tables, thread guard) would become guards that recompile as it changes; eager, a new rank reaches
    # the layers as device data and recompiles nothing.
    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.guard.claim()
        value = self.read_timestep(module, args, kwargs)
        device = compute_device(args, kwargs, fallback=_parameter_device(module))
        # Autograd recording: the exact per-sample forward, whether or not the adapter trains (gradients reach the
        # inputs and whatever else trains; a fast mode's state would not survive a checkpointed recompute).
        if torch.is_grad_enabled():
            batch = batch_size(args, kwargs, value)
            self.mode.set_sample_masks(self.call_rank.sample_masks(value, self.scheduler_source(), device, batch))
            self.checkpoints.wrap()
        else:
            self.mode.set_mask(self.mask_for(value, device))

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.guard.release():
            self.mode.clear_mask()

    def mask_for(self, value: Any, device: torch.device) -> torch.Tensor:
        """The (1, max_rank) mask for a received timestep value, against the scheduler the pipeline holds now."""
        return self.call_rank.mask(value, self.scheduler_source(), device, self.mode.mask_dtype)

    # -- removal --------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Unhook and give the modules back exactly as they were."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._finalizer.detach()
        self.checkpoints.unwrap()
        self.mode.remove()
        self.call_rank.clear()
        self.guard.reset()
        denoiser = self.denoiser_ref()
        if denoiser is not None and denoiser.__dict__.get(STATE_ATTRIBUTE) is self:
            delattr(denoiser, STATE_ATTRIBUTE)


def _parameter_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class TLoRAHandle:
    """What `enable_tlora` (and `load_tlora`) returns: a view of the hooks it installed, and the way to undo them.

    Usable as a context manager (`with enable_tlora(pipe) as handle:`), which removes the hooks on exit (and, for
    `load_tlora`, unloads the file). While the block is open it owns those denoisers' hooks: enabling or loading on
    them again raises TLoRAError rather than leave the rest of the block unmasked. It holds the hooks weakly, so a
    handle that is kept does not keep a removed or replaced denoiser's hooks alive; a denoiser whose hooks a later
    `enable_tlora` replaced drops out of it.

    Args:
        hooks: The installed hook of each denoiser, by component name.
    """

    def __init__(self, hooks: dict[str, DenoiserHook]) -> None:
        self._hooks = {name: weakref.ref(hook) for name, hook in hooks.items()}
        self._exit_actions: list[Callable[[], None]] = []

    def _live(self) -> dict[str, DenoiserHook]:
        live = {name: ref() for name, ref in self._hooks.items()}
        return {name: hook for name, hook in live.items() if hook is not None and hook.active}

    @property
    def denoisers(self) -> list[str]:
        """Names of the components still hooked by this handle."""
        return list(self._live())

    @property
    def mode(self) -> dict[str, str]:
        """The mode each hooked denoiser runs, after "auto" was resolved (e.g. `"fold"`, `"low_memory+lycoris"`
        where LyCORIS's forward keeps the modules no fast mode takes)."""
        return {name: hook.mode.name for name, hook in self._live().items()}

    @property
    def mask_groups(self) -> dict[str, int]:
        """The LyCORIS mask group of each hooked denoiser (`lycoris.modules.tlora.get_timestep_mask(group)`)."""
        return {name: hook.mode.group_id for name, hook in self._live().items()}

    @property
    def extra_memory_bytes(self) -> int:
        """Memory the chosen modes hold beyond the model and its T-LoRA modules (the fold copy, the factors)."""
        return sum(hook.mode.extra_memory_bytes for hook in self._live().values())

    def remove(self) -> None:
        """Unhook every denoiser still hooked by this handle and give its modules back as they were."""
        for hook in self._live().values():
            hook.remove()

    def add_exit_action(self, action: Callable[[], None]) -> None:
        """Run `action` after the hooks are removed at the end of a `with` block (`load_tlora`: unload the file)."""
        self._exit_actions.append(action)

    def __enter__(self) -> "TLoRAHandle":
        for hook in self._live().values():
            hook.in_block = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()
        while self._exit_actions:
            self._exit_actions.pop()()

    def __repr__(self) -> str:
        return f"TLoRAHandle(denoisers={self.denoisers}, mode={self.mode})"


def installed_hook(module: nn.Module) -> DenoiserHook | None:
    """The hook a previous `enable_tlora` left on this module, if any."""
    return module.__dict__.get(STATE_ATTRIBUTE)


def refuse_inside_open_block(denoisers: Iterable[nn.Module], verb: str) -> None:
    """Nested `with` blocks on one denoiser are an error, not a stack: raise if an open block owns its hooks.

    A stack would have to rebuild the outer block's mode (the fold's copy of the weights) at every inner exit, and
    could not bring back what an inner `load_tlora` replaced; without either, the rest of the outer block would run
    unmasked in silence.
    """
    for denoiser in denoisers:
        hook = installed_hook(denoiser)
        if hook is not None and hook.active and hook.in_block:
            raise TLoRAError(
                f"{verb} on {hook.name}, whose T-LoRA hooks belong to an open `with enable_tlora(...)` / "
                f"`with load_tlora(...)` block: replacing them would leave the rest of that block unmasked. Call it "
                "after the block, or end the block's hooks first with disable_tlora / unload_tlora."
            )
