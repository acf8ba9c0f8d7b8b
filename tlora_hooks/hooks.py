"""The per-denoiser pre/post hooks that set the T-LoRA masks for every call, and the handle that removes them.

A hook only reads the call (its timestep value, its device, the scheduler at that moment) and hands the masks that
`call_rank.CallRank` chooses, one per active adapter, to the denoiser's mode; `thread_guard.ThreadGuard` keeps other
threads out meanwhile. One hook serves every T-LoRA adapter of its denoiser: the timestep is read once per call, and
each adapter keeps its own schedule, strength and LyCORIS mask group.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from .block_guard import BlockGuard
from .call_rank import CallRank, RankTable
from .checkpointing import CheckpointWrappers
from .discovery import applied_tlora_modules
from .errors import TLoRAError
from .fused_projections import FusedProjectionCheck
from .modes import MaskMode, build_mode
from .modes.chain import OutOfChain
from .modes.lycoris import set_group_mask
from .modes.per_sample import clear_sample_masks
from .schedule import RankSchedule
from .thread_guard import ThreadGuard, hooked_copy_message

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

STATE_ATTRIBUTE = "_tlora_hooks_state"

_group_ids = itertools.count(1)


def next_mask_group() -> int:
    """A LyCORIS mask group no other enabled denoiser uses (SimpleTuner's training loop uses 0)."""
    return next(_group_ids)


def clear_groups(group_ids: list[int]) -> None:
    """Drop whatever masks a call left in mask groups (LyCORIS's, and the per-sample masks of training calls)."""
    for group_id in group_ids:
        set_group_mask(None, group_id)
        clear_sample_masks(group_id)


@dataclass
class AdapterSettings:
    """An adapter's strength and whether it runs (`set_tlora_adapters`). Shared by its load record and its hook, so a
    load or unload of another adapter, which installs the hooks again, keeps them."""

    weight: float = 1.0
    active: bool = True


@dataclass
class HookedAdapter:
    """One T-LoRA adapter of a hooked denoiser: its modules, its schedule and strength (as device tables), and its own
    LyCORIS mask group, in which its masks are set."""

    name: str
    modules: list[TLoraModule]
    schedule: RankSchedule
    settings: AdapterSettings = field(default_factory=AdapterSettings)
    group_id: int = field(default_factory=next_mask_group)

    def __post_init__(self) -> None:
        self.table = RankTable(self.schedule, self.settings.weight)


def compute_device(args: tuple, kwargs: dict, fallback: torch.device) -> torch.device:
    """Where the call will run: the device of its first floating-point input."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.device
    return fallback


# The denoiser parameters that hold the noisy latents, whose first dim is a training call's batch size: diffusers'
# UNets name it `sample`, its transformers `hidden_states`.
LATENTS_PARAMETERS = ("sample", "hidden_states")


def batch_size(module: nn.Module, args: tuple, kwargs: dict, timestep: Any) -> int:
    """A training call's batch size: the first dim of the denoiser's latents (a `LATENTS_PARAMETERS` argument, by
    keyword or position; keyword order says nothing: Flux's `img_ids` has no batch dim), else of its first
    floating-point tensor input other than the timestep (a denoiser of another kind), else of the timestep itself."""
    position = _latents_position(type(module))
    named = [kwargs.get(name) for name in LATENTS_PARAMETERS]
    positional = [args[position]] if position is not None and position < len(args) else []
    for value in itertools.chain(named, positional, args, kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() and value is not timestep:
            return value.shape[0]
    return timestep.shape[0] if isinstance(timestep, torch.Tensor) and timestep.dim() else 1


@functools.cache
def _latents_position(cls: type) -> int | None:
    """Where the class's `forward` takes its latents positionally (not `module.forward`, which offloading rewraps)."""
    names = [
        p.name for p in inspect.signature(cls.forward).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return next((names.index(name) for name in LATENTS_PARAMETERS if name in names), None)


class DenoiserHook:
    """Reads one denoiser's timestep on every call and sets each active adapter's T-LoRA mask; clears them afterwards.

    Args:
        name: The component's name, for messages.
        denoiser: The hooked module.
        call_rank: Reads the call's timestep and gives each adapter's mask.
        read_timestep: `(module, args, kwargs) -> timestep` value of a call.
        scheduler_source: The scheduler at the time of a call.
        adapters: The denoiser's T-LoRA adapters, in load order.
        mode: The requested mode name (`"auto"` is resolved for the active adapters, again when they change).
    """

    def __init__(
        self,
        name: str,
        denoiser: nn.Module,
        call_rank: CallRank,
        read_timestep: Callable[[nn.Module, tuple, dict], Any],
        scheduler_source: Callable[[], Any],
        adapters: list[HookedAdapter],
        mode: str,
    ) -> None:
        self.name = name
        self.call_rank = call_rank
        self.read_timestep = read_timestep
        self.scheduler_source = scheduler_source
        self.adapters = {adapter.name: adapter for adapter in adapters}
        self.requested_mode = mode
        self.denoiser_ref = weakref.ref(denoiser)
        self.guard = ThreadGuard(name)
        self._install(denoiser)

    def _install(self, denoiser: nn.Module) -> None:
        """Build the mode and register the hooks on the denoiser."""
        self._build_mode(denoiser)
        self.in_block = False  # owned by an open `with` block, which only its exit may end
        self.checkpoints = CheckpointWrappers(denoiser, self)
        self._handles = [
            denoiser.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
            denoiser.register_forward_hook(self.post_forward, with_kwargs=True, always_call=True),
        ]
        # A block run while no call of this denoiser runs was reached around its hooks (an xDiT wrapper): raise.
        layers = [module.org_module[0] for module in applied_tlora_modules(denoiser)]
        self._handles += BlockGuard(self.name, denoiser, layers, self.guard.running).handles
        self.fused_check = FusedProjectionCheck(self.name, denoiser, layers)
        # A mask left set by an interrupted call must not outlive the denoiser in LyCORIS's global storage
        # (the finalizer holds the group number only, so the modules are freed with the denoiser).
        groups = [adapter.group_id for adapter in self.adapters.values()]
        self._finalizer = weakref.finalize(denoiser, clear_groups, groups)
        setattr(denoiser, STATE_ATTRIBUTE, self)

    def __deepcopy__(self, memo: dict) -> DenoiserHook:
        raise TLoRAError(hooked_copy_message(self.name))

    # -- the active adapters --------------------------------------------------------------------------------------
    def _build_mode(self, denoiser: nn.Module | None) -> None:
        """The mode over the active adapters; the inactive ones' modules out of the forward (they cost nothing)."""
        active = [adapter for adapter in self.adapters.values() if adapter.settings.active]
        inactive = [module for adapter in self.adapters.values() if not adapter.settings.active
                    for module in adapter.modules]
        self.out_of_chain = OutOfChain(inactive, f"{self.name}'s inactive adapters")
        try:
            self.mode: MaskMode | None = build_mode(
                self.requested_mode, {adapter.group_id: adapter.modules for adapter in active}, denoiser
            )
        except BaseException:
            self.out_of_chain.restore()
            raise
        self.tables = {adapter.group_id: adapter.table for adapter in active}

    def check_between_calls(self) -> None:
        """Raise while a call of this denoiser runs: its mode must not change under it."""
        if self.guard.in_call():
            raise TLoRAError(
                f"A call of {self.name} is running (in another thread, or this change comes from inside it); change "
                "its T-LoRA adapters between calls."
            )

    def follow_settings(self) -> None:
        """Take the adapters' settings as they are now: a new strength rewrites its small mask tables only; a new set
        of active adapters rebuilds the mode (as enabling does)."""
        for adapter in self.adapters.values():
            adapter.table.set_weight(adapter.settings.weight)
        active = {adapter.group_id for adapter in self.adapters.values() if adapter.settings.active}
        if active == set(self.tables) and self.mode is not None:
            return
        if self.mode is not None:
            self.mode.remove()
            self.out_of_chain.restore()
            self.mode = None  # until rebuilt: a failed rebuild leaves no mode to remove twice
        self._build_mode(self.denoiser_ref())

    # -- per call -------------------------------------------------------------------------------
    # Under torch.compile(denoiser) the hooks run eagerly: the graph breaks only here. Traced, the hook's Python
    # state (tables, thread guard) would become guards that recompile as it changes; eager, a new rank reaches
    # the layers as device data and recompiles nothing.
    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.fused_check.check()  # fuse_qkv_projections() after enabling
        self.guard.claim()
        if not self.tables:  # no active adapter: nothing runs, nothing to mask
            return
        value = self.read_timestep(module, args, kwargs)
        device = compute_device(args, kwargs, fallback=_parameter_device(module))
        # Autograd recording: the exact per-sample forward, whether or not the adapter trains (gradients reach the
        # inputs and whatever else trains; a fast mode's state would not survive a checkpointed recompute).
        if torch.is_grad_enabled():
            batch = batch_size(module, args, kwargs, value)
            scheduler = self.scheduler_source()
            self.mode.set_sample_masks(self.call_rank.sample_masks(value, scheduler, self.tables, device, batch))
            self.checkpoints.wrap()
        else:
            self.mode.set_masks(self.masks_for(value, device))

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.guard.release():
            self.mode.clear_masks()

    def masks_for(self, value: Any, device: torch.device) -> dict[int, torch.Tensor]:
        """Each active adapter's (1, max_rank) mask, by its mask group, for a received timestep value, against the
        scheduler the pipeline holds now."""
        return self.call_rank.masks(value, self.scheduler_source(), self.tables, device, self.mode.mask_dtype)

    # -- removal --------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def reinstall(self) -> bool:
        """Hook the denoiser again as before `remove()`: the end of a `with enable_tlora(...)` block that replaced
        these hooks. Nothing happens (False) where the denoiser is gone, holds other hooks now, or no longer holds
        every module of these adapters (unloaded or replaced meanwhile)."""
        denoiser = self.denoiser_ref()
        if self.active or denoiser is None or installed_hook(denoiser) is not None:
            return False
        applied = {id(module) for module in applied_tlora_modules(denoiser)}
        if any(id(module) not in applied for adapter in self.adapters.values() for module in adapter.modules):
            return False
        self._install(denoiser)
        return True

    def remove(self) -> None:
        """Unhook and give the modules back exactly as they were."""
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._finalizer.detach()
        self.checkpoints.unwrap()
        if self.mode is not None:
            self.mode.remove()
            self.out_of_chain.restore()
        for adapter in self.adapters.values():
            adapter.table.clear()
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
    `load_tlora`, unloads the adapter it loaded; the denoiser's other adapters keep their hooks), then puts back the
    hooks its `enable_tlora` replaced (a plain `enable_tlora` or `load_tlora` before the block). While the block is
    open it owns those denoisers' hooks: enabling or loading on them again raises TLoRAError rather than leave the
    rest of the block unmasked. It holds its own hooks weakly, so a handle that is kept does not keep a removed or
    replaced denoiser's hooks alive; a denoiser whose hooks a later `enable_tlora` replaced drops out of it.

    Args:
        hooks: The installed hook of each denoiser, by component name.
        replaced: The hooks that installing these removed, put back at the end of a `with` block.
    """

    def __init__(self, hooks: dict[str, DenoiserHook], replaced: Iterable[DenoiserHook] = ()) -> None:
        self._hooks = {name: weakref.ref(hook) for name, hook in hooks.items()}
        self._exit_actions: list[Callable[[], None]] = []
        self._replaced = list(replaced)

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
        """The LyCORIS mask group of each hooked denoiser's adapter (`lycoris.modules.tlora.get_timestep_mask(group)`);
        with several adapters, of the first one loaded (`get_tlora_adapters` gives each adapter's)."""
        return {name: next(iter(hook.adapters.values())).group_id for name, hook in self._live().items()}

    @property
    def extra_memory_bytes(self) -> int:
        """Memory the chosen modes hold beyond the model and its T-LoRA modules (the fold copy, the factors)."""
        return sum(hook.mode.extra_memory_bytes for hook in self._live().values())

    def remove(self) -> None:
        """Unhook every denoiser still hooked by this handle and give its modules back as they were."""
        for hook in self._live().values():
            hook.remove()

    def add_exit_action(self, action: Callable[[], None]) -> None:
        """Run `action` after the hooks are removed at the end of a `with` block (`load_tlora`: unload its adapter,
        and hook the denoiser's other adapters again).

        Args:
            action: Called with no arguments; the actions run last added first.
        """
        self._exit_actions.append(action)

    def __enter__(self) -> "TLoRAHandle":
        for hook in self._live().values():
            hook.in_block = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()
        while self._exit_actions:
            self._exit_actions.pop()()
        replaced, self._replaced = self._replaced, []
        for hook in replaced:  # else the modules of a plain enable or a load before the block would run unmasked
            hook.reinstall()

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
