"""`enable_tlora` / `disable_tlora`: the public verbs, and `hook_denoisers`, which installs the hooks of denoisers
with one or several adapters (`load_tlora` installs its adapters' hooks through it)."""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any, Callable, Collection

from .call_rank import CallRank
from .conventions import TimestepFn, plan_timestep_reading
from .discovery import components_of, find_denoisers, is_pipeline, scheduler_attribute, unrunnable_conv
from .errors import TLoRAError
from .fused_projections import FusedProjectionCheck
from .hooks import (
    AdapterSettings,
    DenoiserHook,
    HookedAdapter,
    TLoRAHandle,
    installed_hook,
    refuse_inside_open_block,
)
from .logging import get_logger
from .modes import check_mode
from .modes.chain import ForwardPathCheck
from .records import loaded_adapters
from .schedule import RankSchedule

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule
    from torch import nn

logger = get_logger(__name__)


def enable_tlora(
    target: Any,
    max_rank: int | None = 64,
    min_rank: int = 1,
    alpha: float = 1.0,
    *,
    mode: str = "auto",
    timestep_fn: TimestepFn | None = None,
    scheduler: Any = None,
    components: Collection[str] | None = None,
) -> TLoRAHandle:
    """Mask the T-LoRA ranks by timestep on every denoiser call of a stock Diffusers pipeline.

    Every denoiser holding applied LyCORIS T-LoRA modules gets a forward pre-hook that reads the call's timestep,
    snaps it to the scheduler's schedule and sets the mask of the rank T-LoRA was trained with at that timestep.
    One schedule masks every module of a denoiser: a denoiser holding several adapters that `load_tlora` or
    `create_tlora` put there, each with its own schedule, is an error (their hooks are `load_tlora`'s).
    Enabling again replaces the previous hooks, except those of an open `with enable_tlora(...)` block (a
    TLoRAError: nested blocks are not a stack); a `with` block puts the hooks it replaced back at its end. A failed
    call leaves the pipeline as it was.

    Args:
        target: A Diffusers pipeline (a `DiffusionPipeline` or a Modular Diffusers `ModularPipeline`), or a bare
            denoiser `nn.Module`.
        max_rank: The LyCORIS `linear_dim` the adapter was trained with; None reads it from the modules.
        min_rank: The LyCORIS `tlora_min_rank`: ranks kept at pure noise.
        alpha: The LyCORIS `tlora_alpha`, the schedule's exponent: rank = ((T - t) / T) ** alpha * (max_rank -
            min_rank) + min_rank, rounded down.
        mode: How the masked forward runs: `"auto"` (`"fold"` where the weights are plain float layers with no
            offloading hook and the device has room for a copy of them, else `"low_memory"`), `"fold"`,
            `"low_memory"` or `"lycoris"` (LyCORIS's own forward, the reference). All give LyCORIS's output; they
            differ in speed and memory.
        timestep_fn: `(module, args, kwargs) -> timestep` for a denoiser the convention table does not know, or
            calls it misreads: returns the noise-ward timestep (num_train_timesteps = pure noise). It replaces
            the table's reading and mapping; the table's scheduler-side map still snaps the value.
        scheduler: The scheduler whose `timesteps` received values are snapped to, and whose `num_train_timesteps`
            is T; defaults to the pipeline's (read on every call, so swapping `pipe.scheduler`, or
            `update_components(scheduler=...)` on a `ModularPipeline`, is followed). A bare denoiser has none
            otherwise.
        components: Only these denoisers of a pipeline (e.g. `["transformer_2"]`), leaving the others' hooks alone.

    Returns:
        A `TLoRAHandle`; `handle.remove()` or `disable_tlora(target)` undoes everything.
    """
    check_mode(mode)
    check_hook_options(timestep_fn, scheduler)
    found = find_denoisers(target)
    if components is not None:
        found = _only_components(found, components)
    _check_runnable(found)
    schedule = _schedule_for(found, max_rank, min_rank, alpha)
    adapters = {
        name: (denoiser, [_one_adapter(name, denoiser, modules, schedule)])
        for name, (denoiser, modules) in found.items()
    }
    return hook_denoisers(
        target, adapters, mode=mode, timestep_fn=timestep_fn, scheduler=scheduler, replace_all=components is None
    )


def hook_denoisers(
    target: Any,
    found: dict[str, tuple[nn.Module, list[HookedAdapter]]],
    *,
    mode: str,
    timestep_fn: TimestepFn | None,
    scheduler: Any,
    replace_all: bool,
) -> TLoRAHandle:
    """Hook each denoiser of `found` with its adapters, replacing its previous hooks (with `replace_all`, every hook
    on the target's components). Validates everything first: a failure changes nothing."""
    pipeline = target if is_pipeline(target) else None
    plans = {
        name: plan_timestep_reading(name, denoiser, pipeline, timestep_fn)
        for name, (denoiser, _) in found.items()
    }
    replaced = components_of(target).values() if replace_all else [d for d, _ in found.values()]
    refuse_inside_open_block(replaced, "enable_tlora")
    for name, (denoiser, adapters) in found.items():
        FusedProjectionCheck(name, denoiser, [m.org_module[0] for a in adapters for m in a.modules]).check()
        # Skipped where hooks are installed (on it, or on a denoiser it wraps): the fold mode and inactive adapters
        # take their modules out of the chain until removed.
        if not any(installed_hook(module) is not None for module in denoiser.modules()):
            modules = [module for adapter in adapters for module in adapter.modules]
            ForwardPathCheck(modules, f"{name} ({type(denoiser).__name__})")  # raises for a dropped module
    # The hooks replaced: with `replace_all` every component's, else these denoisers' (and hooks on a denoiser that a
    # wrapper, xDiT's, now holds).
    touched = [*replaced, *(module for denoiser, _ in found.values() for module in denoiser.modules())]
    previous = {id(hook): hook for hook in map(installed_hook, touched) if hook is not None and hook.active}
    # Everything is validated: from here on the pipeline changes.
    for hook in previous.values():
        hook.remove()
    hooks = {}
    for name, (denoiser, adapters) in found.items():
        convention, reader = plans[name]
        hooks[name] = DenoiserHook(
            name=name,
            denoiser=denoiser,
            call_rank=CallRank(name, convention),
            read_timestep=reader,
            scheduler_source=_scheduler_source(pipeline, name, scheduler),
            adapters=adapters,
            mode=mode,
        )
        if convention.video:
            warn_video_once()
    logger.info(
        "T-LoRA enabled on %s: %s; mode %s",
        ", ".join(f"{name} ({sum(len(a.modules) for a in found[name][1])} modules)" for name in hooks),
        "; ".join(sorted({describe(adapter) for _, adapters in found.values() for adapter in adapters})),
        ", ".join(sorted({hook.mode.name for hook in hooks.values()})),
    )
    return TLoRAHandle(hooks, replaced=previous.values())


def check_hook_options(timestep_fn: Any, scheduler: Any) -> None:
    if timestep_fn is not None and not callable(timestep_fn):
        raise TLoRAError(f"timestep_fn must be a callable (module, args, kwargs) -> timestep, got {timestep_fn!r}.")
    if scheduler is not None and not (hasattr(scheduler, "timesteps") and hasattr(scheduler, "config")):
        raise TLoRAError(
            f"scheduler must be a Diffusers scheduler (with `timesteps` and `config.num_train_timesteps`), "
            f"got {type(scheduler).__name__}. Pass the pipeline's own, e.g. scheduler=pipe.scheduler."
        )


def describe(adapter: HookedAdapter) -> str:
    """An adapter's schedule and settings, for a log line."""
    schedule, settings = adapter.schedule, adapter.settings
    state = "" if settings.active else ", inactive"
    return (f"adapter {adapter.name!r}: ranks {schedule.min_rank}..{schedule.max_rank}, alpha {schedule.alpha}, "
            f"weight {settings.weight}{state}")


def disable_tlora(target: Any) -> None:
    """Remove what `enable_tlora` installed on a pipeline or denoiser; a no-op where nothing is installed.

    The T-LoRA modules stay applied and run unmasked (all ranks), as LyCORIS runs them with no mask set;
    `unload_tlora` removes what `load_tlora` loaded.

    Args:
        target: The pipeline, or the denoiser, `enable_tlora` was called on.
    """
    for module in components_of(target).values():
        hook = installed_hook(module)
        if hook is not None:
            hook.remove()


def _only_components(found: dict, components: Collection[str]) -> dict:
    """The found denoisers that `components` names; each name must hold T-LoRA modules."""
    components = [components] if isinstance(components, str) else list(components)
    missing = sorted(set(components) - set(found))
    if missing:
        raise TLoRAError(
            f"components={sorted(components)}: {', '.join(missing)} holds no applied T-LoRA modules "
            f"(components with modules: {', '.join(found) or 'none'})."
        )
    return {name: value for name, value in found.items() if name in components}


def _one_adapter(
    name: str, denoiser: nn.Module, modules: list[TLoraModule], schedule: RankSchedule
) -> HookedAdapter:
    """Every module of a denoiser as one adapter: the one `load_tlora` or `create_tlora` put there, if they are
    exactly its modules (keeping its name and settings), else "default". Several such adapters are an error."""
    loaded = loaded_adapters(denoiser)
    records = list(loaded.records.values()) if loaded is not None else []
    if len(records) > 1:
        described = ", ".join(
            f"{record.adapter_name!r} (rank {record.schedule.max_rank}, min_rank {record.schedule.min_rank}, "
            f"alpha {record.schedule.alpha})" for record in records
        )
        raise TLoRAError(
            f"enable_tlora masks every T-LoRA module of a denoiser with one schedule, but {name} holds the adapters "
            f"{described}, each with its own. Their hooks are load_tlora's: load_tlora(..., adapter_name=...) again "
            "installs them with each adapter's own schedule (and mode=, timestep_fn=, scheduler= for all); "
            "set_tlora_adapters picks the active ones; delete_tlora_adapters removes one."
        )
    if records and {id(m) for m in records[0].network.loras} == {id(m) for m in modules}:
        return HookedAdapter(records[0].adapter_name, modules, schedule, records[0].settings, records[0].group_id)
    return HookedAdapter("default", modules, schedule, AdapterSettings())


def _check_runnable(found: dict) -> None:
    """Refuse modules whose LyCORIS forward would fail at the first call, before anything changes."""
    for _, modules in found.values():
        for module in modules:
            problem = unrunnable_conv(module.lora_name, module.org_module[0])
            if problem is not None:
                raise TLoRAError(
                    f"{problem}. Build the LyCORIS network without these modules (a preset that leaves out "
                    "ResnetBlock2D and other k x k convs), then enable T-LoRA."
                )


def _schedule_for(found: dict, max_rank: int | None, min_rank: int, alpha: float) -> RankSchedule:
    """The rank schedule, checked against the rank the modules were built with."""
    ranks = sorted({module.lora_dim for _, modules in found.values() for module in modules})
    module_rank = ranks[-1]
    if max_rank is None:
        max_rank = module_rank
    schedule = RankSchedule(max_rank=max_rank, min_rank=min_rank, alpha=alpha)
    if max_rank != module_rank:
        raise TLoRAError(
            f"max_rank={max_rank} but the T-LoRA modules have rank {module_rank}. Pass the LyCORIS `linear_dim` "
            f"the adapter was trained with (max_rank={module_rank}), or max_rank=None to read it from the modules."
        )
    if len(ranks) > 1:
        logger.info(
            "T-LoRA modules have ranks %s; smaller ones use the first ranks of the mask, as in training", ranks
        )
    return schedule


def _scheduler_source(pipeline: Any, component: str, scheduler: Any) -> Callable[[], Any]:
    """Where the hook finds the scheduler per call (users swap `pipe.scheduler`), without keeping the pipeline alive.

    Once the pipeline is gone, the last scheduler it had, while something else (`pipe = X.from_pipe(pipe)`) keeps it.
    """
    if scheduler is not None:
        return lambda: scheduler
    if pipeline is None:
        return lambda: None
    pipeline_ref = weakref.ref(pipeline)
    attribute = scheduler_attribute(component)
    at_enable = getattr(pipeline, attribute, None)
    last_seen = [weakref.ref(at_enable) if at_enable is not None else lambda: None]

    def current_scheduler() -> Any:
        current = pipeline_ref()
        if current is None:
            return last_seen[0]()
        found = getattr(current, attribute, None)
        if found is not None and last_seen[0]() is not found:
            last_seen[0] = weakref.ref(found)
        return found

    return current_scheduler


@functools.cache
def warn_video_once() -> None:
    logger.warning(
        "T-LoRA on video denoisers is experimental: temporal compression mixes frames across timestep boundaries. "
        "Per-frame or per-token timesteps are reduced to the noisiest one, so every token gets the same rank."
    )
