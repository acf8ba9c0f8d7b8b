"""The per-denoiser pre/post hooks that set the T-LoRA mask for every call, and the handle that removes them."""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from typing import Any, Callable

import torch
from lycoris.modules.tlora import clear_timestep_mask
from torch import nn

from .conventions import REDUCTIONS, ConventionChoice, TimestepConvention
from .errors import TLoRAError
from .logging_utils import get_logger
from .modes import MaskedForward
from .schedule import RankSchedule, masks_by_rank

logger = get_logger(__name__)

STATE_ATTRIBUTE = "_tlora_hooks_state"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
# Stays on the stack for a module's whole call (hooks and forward): tells a running call from an abandoned one.
_CALL_IMPL_CODE = nn.Module._call_impl.__code__

_group_ids = itertools.count(1)


def next_mask_group() -> int:
    """A LyCORIS mask group no other enabled denoiser uses (SimpleTuner's training loop uses 0)."""
    return next(_group_ids)


def scheduler_timesteps(scheduler: Any) -> torch.Tensor | None:
    """The scheduler's current `timesteps` as a 1-D tensor, or None before `set_timesteps`."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    timesteps = torch.as_tensor(timesteps)
    return timesteps.reshape(-1) if timesteps.numel() else None


def num_train_timesteps(scheduler: Any) -> int:
    """T in the rank formula: the scheduler's `num_train_timesteps`, as SimpleTuner passes it."""
    config = getattr(scheduler, "config", None)
    value = getattr(config, "num_train_timesteps", None) if config is not None else None
    return int(value) if value else DEFAULT_NUM_TRAIN_TIMESTEPS


def compute_device(args: tuple, kwargs: dict, fallback: torch.device) -> torch.device:
    """Where the call will run: the device of its first floating-point input."""
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.device
    return fallback


class DenoiserHook:
    """Reads one denoiser's timestep on every call and sets its T-LoRA mask; clears it afterwards."""

    def __init__(
        self,
        name: str,
        denoiser: nn.Module,
        schedule: RankSchedule,
        convention: TimestepConvention | ConventionChoice,
        read_timestep: Callable[[nn.Module, tuple, dict], Any],
        scheduler_source: Callable[[], Any],
        path: MaskedForward,
    ) -> None:
        self.name = name
        self.schedule = schedule
        self.convention = convention
        self.read_timestep = read_timestep
        self.scheduler_source = scheduler_source
        self.path = path
        self.denoiser_ref = weakref.ref(denoiser)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._owner_lock = threading.Lock()
        self._owner: int | None = None
        self._owner_call = None
        self._range_checks_left = 1  # accelerator values: one host sync per enable, on the first call
        self._handles = [
            denoiser.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
            denoiser.register_forward_hook(self.post_forward, with_kwargs=True, always_call=True),
        ]
        # A mask left set by an interrupted call must not outlive the denoiser in LyCORIS's global storage
        # (the finalizer holds the group number only, so the modules are freed with the denoiser).
        self._finalizer = weakref.finalize(denoiser, clear_timestep_mask, path.group_id)
        setattr(denoiser, STATE_ATTRIBUTE, self)

    # -- per call -------------------------------------------------------------------------------
    # Under torch.compile(denoiser) the hooks run eagerly: the graph breaks only here. Traced, the hook's Python
    # state (tables, thread guard) would become guards that recompile as it changes; eager, a new rank reaches
    # the layers as device data and recompiles nothing.
    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._claim()
        value = self.read_timestep(module, args, kwargs)
        device = compute_device(args, kwargs, fallback=_parameter_device(module))
        self.path.set_mask(self.mask_for(value, device))

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._release():
            self.path.clear_mask()

    def mask_for(self, value: Any, device: torch.device) -> torch.Tensor:
        """The (1, max_rank) mask for a received timestep value, built without leaving the device."""
        timestep, max_timestep = self.scheduler_timestep(value)
        rank_by_timestep, mask_by_rank = self._tables_for(timestep.device, max_timestep)
        index = timestep.floor().long().clamp(0, max_timestep)  # int(t), as SimpleTuner's pipelines take it
        mask = _take(mask_by_rank, _take(rank_by_timestep, index))
        return mask.to(device, non_blocking=True)

    def scheduler_timestep(self, value: Any) -> tuple[torch.Tensor, int]:
        """The noise-ward timestep on the scheduler's scale (a 0-d tensor), snapped to its schedule."""
        received = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
        scheduler = self.scheduler_source()
        convention = self.convention.for_scheduler(scheduler)  # EDM / continuous schedulers refine the row
        timesteps = convention.to_timestep(received.to(torch.float32))
        max_timestep = num_train_timesteps(scheduler)
        self._warn_if_out_of_range(timesteps, max_timestep)
        timestep = REDUCTIONS[convention.reduce](timesteps.reshape(-1))
        timestep = torch.nan_to_num(timestep, nan=float(max_timestep)).clamp(0, max_timestep)
        schedule = scheduler_timesteps(scheduler) if scheduler is not None else None
        if schedule is not None:
            schedule = convention.schedule_to_timestep(schedule.to(timestep.device, torch.float32))
            distance, nearest = (schedule - timestep).abs().min(dim=0)
            # Snap only what the received dtype's rounding explains (bf16 t/1000): a value from another
            # scheduler (a from_pipe'd pipeline sharing this denoiser) is used as received.
            rounding = distance <= _rounding_tolerance(convention, received)
            timestep = torch.where(rounding, _take(schedule, nearest).squeeze(0), timestep)
        return timestep, max_timestep

    def _warn_if_out_of_range(self, timesteps: torch.Tensor, max_timestep: int) -> None:
        """Warn once per enable when a timestep lies outside [0, T] (it is clamped, so the rank stays valid).

        Host values are checked on every call until one warns; values on an accelerator only on the first
        call after enabling, since reading them back would synchronise the device on every step.
        """
        if self._range_checks_left <= 0:
            return
        if timesteps.device.type != "cpu":
            self._range_checks_left -= 1
        low, high = (value.item() for value in torch.aminmax(timesteps))  # NaN propagates, and compares False
        if not (0 <= low and high <= max_timestep):
            self._range_checks_left = 0
            bad = low if not low >= 0 else high  # NaN or negative, else too large
            logger.warning(
                "T-LoRA %s received timestep %s on the scheduler's scale, outside [0, %d]; it is clamped, so the "
                "rank stays in [%d, %d]. If a stock pipeline passed it, its timestep convention is wrong: pass "
                "timestep_fn= to enable_tlora. (Warned once per enable_tlora.)",
                self.name, bad, max_timestep, self.schedule.min_rank, self.schedule.max_rank,
            )

    def _tables_for(self, device: torch.device, max_timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank per integer timestep and mask per rank, built once per device and T."""
        key = (device, max_timestep, self.path.mask_dtype)
        if key not in self._tables:
            ranks = torch.tensor(self.schedule.rank_table(max_timestep), dtype=torch.long, device=device)
            masks = masks_by_rank(self.schedule.max_rank, device=device, dtype=self.path.mask_dtype)
            self._tables[key] = (ranks, masks)
        return self._tables[key]

    # -- one denoiser, one thread at a time -----------------------------------------------------
    def _claim(self) -> None:
        me = threading.get_ident()
        call = _running_call_frame()
        with self._owner_lock:
            if self._owner is not None and self._owner != me and self._claim_is_live():
                raise TLoRAError(
                    f"The T-LoRA {self.name} was entered from two threads at once; their masks would mix. "
                    "Use one pipeline object per thread (each with its own enable_tlora)."
                )
            self._owner, self._owner_call = me, call

    def _claim_is_live(self) -> bool:
        """Whether the owning call still runs. One that ended without the post-hook (a KeyboardInterrupt:
        torch runs `always_call` hooks on `Exception` only) or whose thread died left a stale claim."""
        frame = sys._current_frames().get(self._owner)
        if frame is None:
            return False
        if self._owner_call is None:
            return True  # no frame to look for: assume it still runs
        while frame is not None:
            if frame is self._owner_call:
                return True
            frame = frame.f_back
        return False

    def _release(self) -> bool:
        with self._owner_lock:
            if self._owner != threading.get_ident():
                return False
            self._owner, self._owner_call = None, None
            return True

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
        self.path.remove()
        self._tables.clear()
        self._owner, self._owner_call = None, None
        denoiser = self.denoiser_ref()
        if denoiser is not None and denoiser.__dict__.get(STATE_ATTRIBUTE) is self:
            delattr(denoiser, STATE_ATTRIBUTE)


def _running_call_frame() -> Any:
    """The `Module._call_impl` frame of the call this hook runs in (None if called some other way)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _CALL_IMPL_CODE:
        frame = frame.f_back
    return frame


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`table[index]` for a 0-d index tensor, keeping a leading dim of 1; `table[index]` itself would read the
    index back to the host (a device synchronisation on every call)."""
    return table.index_select(0, index.reshape(1))


def _rounding_eps(dtype: torch.dtype) -> float:
    """Relative rounding of a timestep passed in `dtype`; integers are exact."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


# Below this (in timestep units, 0..num_train_timesteps) two schedules are the same schedule: float32
# arithmetic in a convention's map may move an exact received value by this much.
SNAP_FLOOR = 1e-3


def _rounding_tolerance(convention: TimestepConvention, received: torch.Tensor) -> torch.Tensor:
    """How far the received dtype's rounding can move the noise-ward timestep, through the row's own map.

    A map-aware width: bf16 c_noise (Cosmos 1) or fp16 t/1000 (AuraFlow) move it by different amounts.
    """
    value = received.to(torch.float32)
    eps = _rounding_eps(received.dtype)
    spread = (convention.to_timestep(value * (1 + eps)) - convention.to_timestep(value * (1 - eps))).abs()
    return spread.amax().clamp_min(SNAP_FLOOR)


def _parameter_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class TLoRAHandle:
    """What `enable_tlora` returns: `.remove()` undoes it; usable as a context manager."""

    def __init__(self, hooks: dict[str, DenoiserHook]) -> None:
        self._hooks = {name: weakref.ref(hook) for name, hook in hooks.items()}

    def _live(self) -> dict[str, DenoiserHook]:
        live = {name: ref() for name, ref in self._hooks.items()}
        return {name: hook for name, hook in live.items() if hook is not None and hook.active}

    @property
    def denoisers(self) -> list[str]:
        """Names of the components still hooked by this handle."""
        return list(self._live())

    @property
    def mode(self) -> dict[str, str]:
        """The path each hooked denoiser runs, after "auto" was resolved."""
        return {name: hook.path.name for name, hook in self._live().items()}

    @property
    def mask_groups(self) -> dict[str, int]:
        """The LyCORIS mask group of each hooked denoiser (`lycoris.modules.tlora.get_timestep_mask(group)`)."""
        return {name: hook.path.group_id for name, hook in self._live().items()}

    @property
    def extra_memory_bytes(self) -> int:
        """Memory the chosen paths hold beyond the model and its T-LoRA modules."""
        return sum(hook.path.extra_memory_bytes for hook in self._live().values())

    def remove(self) -> None:
        for hook in self._live().values():
            hook.remove()

    def __enter__(self) -> "TLoRAHandle":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"TLoRAHandle(denoisers={self.denoisers}, mode={self.mode})"


def installed_hook(module: nn.Module) -> DenoiserHook | None:
    """The hook a previous `enable_tlora` left on this module, if any."""
    return module.__dict__.get(STATE_ATTRIBUTE)
