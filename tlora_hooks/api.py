"""`enable_tlora` / `disable_tlora`: the public verbs."""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable, Collection

from torch import nn

from .conventions import (
    ConventionChoice,
    TimestepFn,
    TimestepReader,
    convention_for,
    for_timestep_fn,
    known_denoiser_classes,
)
from .discovery import find_denoisers, is_pipeline, pipeline_modules, scheduler_attribute, unwrap
from .errors import TLoRAError
from .hooks import DenoiserHook, TLoRAHandle, installed_hook, next_mask_group
from .logging_utils import get_logger
from .modes import build_path, check_mode
from .schedule import RankSchedule

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

    `target` is a pipeline or a bare denoiser. `max_rank`, `min_rank` and `alpha` are the LyCORIS
    `linear_dim`, `tlora_min_rank` and `tlora_alpha` the adapter was trained with (`max_rank=None`
    reads it from the modules). `timestep_fn(module, args, kwargs)` overrides where the timestep is
    read from: it returns the noise-ward timestep (num_train_timesteps = pure noise) and takes
    precedence over the convention table, whose scheduler-side map still snaps it. `scheduler`
    overrides the scheduler whose `timesteps` received values are snapped to (for a bare denoiser
    there is none otherwise).
    `components` limits a pipeline to the named denoisers (e.g. `["transformer_2"]`), leaving the others' hooks alone.
    Enabling again replaces the previous hooks. Returns a handle; `handle.remove()` or
    `disable_tlora(target)` undoes everything.
    """
    check_mode(mode)
    if timestep_fn is not None and not callable(timestep_fn):
        raise TLoRAError(f"timestep_fn must be a callable (module, args, kwargs) -> timestep, got {timestep_fn!r}.")
    if scheduler is not None and not (hasattr(scheduler, "timesteps") and hasattr(scheduler, "config")):
        raise TLoRAError(
            f"scheduler must be a Diffusers scheduler (with `timesteps` and `config.num_train_timesteps`), "
            f"got {type(scheduler).__name__}. Pass the pipeline's own, e.g. scheduler=pipe.scheduler."
        )
    found = find_denoisers(target)
    if components is not None:
        found = _only_components(found, components)
    schedule = _schedule_for(found, max_rank, min_rank, alpha)
    pipeline = target if is_pipeline(target) else None
    plans = {
        name: _plan(name, denoiser, pipeline, timestep_fn)
        for name, (denoiser, _) in found.items()
    }
    # Everything is validated: from here on the pipeline changes.
    if components is None:
        disable_tlora(target)
    for denoiser, _ in found.values():  # with `components`, only the named denoisers are replaced
        previous = installed_hook(denoiser)
        if previous is not None:
            previous.remove()
    hooks = {}
    for name, (denoiser, modules) in found.items():
        convention, reader = plans[name]
        hooks[name] = DenoiserHook(
            name=name,
            denoiser=denoiser,
            schedule=schedule,
            convention=convention,
            read_timestep=reader,
            scheduler_source=_scheduler_source(pipeline, name, scheduler),
            path=build_path(mode, modules, next_mask_group(), denoiser=denoiser),
        )
        if convention.video:
            _warn_video_once()
    logger.info(
        "T-LoRA enabled on %s: ranks %d..%d, alpha %s, mode %s",
        ", ".join(f"{name} ({len(found[name][1])} modules)" for name in hooks),
        schedule.min_rank, schedule.max_rank, schedule.alpha,
        ", ".join(sorted({hook.path.name for hook in hooks.values()})),
    )
    return TLoRAHandle(hooks)


def disable_tlora(target: Any) -> None:
    """Remove what `enable_tlora` installed on a pipeline or denoiser; a no-op where nothing is installed."""
    if isinstance(target, nn.Module):
        modules = [target]
    elif is_pipeline(target):
        modules = list(pipeline_modules(target).values())
    else:
        raise TLoRAError(
            f"disable_tlora expects a Diffusers pipeline or a denoiser nn.Module, got {type(target).__name__}."
        )
    for module in modules:
        hook = installed_hook(unwrap(module))
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
        logger.info("T-LoRA modules have ranks %s; smaller ones use the first ranks of the mask, as in training", ranks)
    return schedule


def _plan(
    name: str, denoiser: nn.Module, pipeline: Any, timestep_fn: TimestepFn | None
) -> tuple[ConventionChoice, Callable]:
    """The convention and timestep reader for one denoiser; raises for an unknown or unsupported class.

    `timestep_fn` takes precedence over every row: its value is the noise-ward timestep.
    """
    convention = convention_for(denoiser, pipeline)
    if timestep_fn is not None:
        return for_timestep_fn(convention), timestep_fn
    if convention is not None and convention.default.unsupported:
        raise TLoRAError(f"T-LoRA cannot be enabled on {name}: {convention.default.unsupported}")
    if convention is None:
        cls = type(denoiser).__name__
        raise TLoRAError(
            f"No timestep convention is known for denoiser class {cls} ({name}). Pass "
            "`timestep_fn=lambda module, args, kwargs: <timestep on the scheduler's scale>` to enable_tlora, "
            f"or register one with tlora_hooks.register_convention({cls!r}, param=..., to_timestep=...). "
            f"Known classes: {', '.join(known_denoiser_classes())}."
        )
    parameters = inspect.signature(type(denoiser).forward).parameters
    takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if convention.param not in parameters and not takes_any_keyword:
        raise TLoRAError(
            f"The convention for {type(denoiser).__name__} reads `{convention.param}`, but its forward has no such "
            "parameter. Register the right one with register_convention(...) or pass timestep_fn=."
        )
    return convention, TimestepReader.for_module(denoiser, convention.param)


def _scheduler_source(pipeline: Any, component: str, scheduler: Any) -> Callable[[], Any]:
    """Where the hook finds the scheduler at call time (users swap `pipe.scheduler`), without keeping the pipeline alive.

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
def _warn_video_once() -> None:
    logger.warning(
        "T-LoRA on video denoisers is experimental: temporal compression mixes frames across timestep boundaries. "
        "Per-frame or per-token timesteps are reduced to the noisiest one, so every token gets the same rank."
    )
