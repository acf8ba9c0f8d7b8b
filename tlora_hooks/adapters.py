"""Which T-LoRA adapters of a pipeline run, and how strongly: `set_tlora_adapters`, `set_tlora_adapter_weight`,
`get_tlora_adapters`, shaped after diffusers' `set_adapters` and `get_list_adapters`.

A strength scales the adapter's mask (its delta is linear in the mask), so changing one rewrites a small table and
nothing else, in every mode; an inactive adapter's modules are out of the forward, and cost nothing per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .discovery import components_of
from .errors import TLoRAError
from .hooks import DenoiserHook, installed_hook
from .loading import adapter_name_list
from .schedule import RankSchedule


@dataclass(frozen=True)
class TLoRAAdapter:
    """One T-LoRA adapter as the hooks run it, from `get_tlora_adapters`.

    Args:
        name: The adapter name (`load_tlora(..., adapter_name=...)`; `"default"` unless named).
        active: Whether it runs (`set_tlora_adapters` names the active ones).
        weight: Its strength: its delta is scaled by it (on top of LyCORIS's `multiplier`).
        schedule: The rank schedule that masks it.
        mask_group: The LyCORIS mask group its masks are set in (`lycoris.modules.tlora.get_timestep_mask`).
    """

    name: str
    active: bool
    weight: float
    schedule: RankSchedule
    mask_group: int


def get_tlora_adapters(target: Any) -> dict[str, dict[str, TLoRAAdapter]]:
    """The T-LoRA adapters the hooks mask, per denoiser: like diffusers' `get_list_adapters` (by component), with
    each adapter's strength, whether it is active, and its schedule.

    Args:
        target: A pipeline, or a bare denoiser (keyed by its class name).

    Returns:
        `{component: {adapter_name: TLoRAAdapter}}`, adapters in load order; components without hooks are left out.
    """
    return {
        component: {
            name: TLoRAAdapter(name, adapter.settings.active, adapter.settings.weight, adapter.schedule,
                               adapter.group_id)
            for name, adapter in hook.adapters.items()
        }
        for component, hook in _hooks(target).items()
    }


def set_tlora_adapters(
    target: Any, adapter_names: str | list[str], adapter_weights: float | list[float | None] | None = None
) -> None:
    """Make the named T-LoRA adapters active with these strengths and every other one inactive, as diffusers'
    `pipe.set_adapters` does for LoRAs.

    A strength scales the adapter's delta (0 silences it, and it still runs); inactive adapters do not run at all.
    New strengths take effect at the next call without touching the weights or factors; a new set of active adapters
    rebuilds the denoiser's mode once (as enabling does). Names no hooked denoiser holds, weights of the wrong length
    or not finite raise TLoRAError and change nothing.

    Args:
        target: A pipeline or a bare denoiser with T-LoRA hooks (`load_tlora`, `create_tlora`, `enable_tlora`).
        adapter_names: The adapters to run, by name; on a pipeline, each denoiser runs those it holds.
        adapter_weights: Their strengths: one for all, or one per name (None: 1.0); default 1.0 each.
    """
    names = adapter_name_list(adapter_names, "set_tlora_adapters")
    weights = _weights(names, adapter_weights)
    hooks = _hooks(target)
    _check_known(hooks, names, "set_tlora_adapters")
    for hook in hooks.values():
        hook.check_between_calls()
    for hook in hooks.values():
        _change(hook, {
            name: (weights[name] if name in weights else adapter.settings.weight, name in weights)
            for name, adapter in hook.adapters.items()
        })


def set_tlora_adapter_weight(target: Any, adapter_name: str, weight: float) -> None:
    """Change one adapter's strength, leaving the other adapters (and which ones are active) as they are.

    diffusers' `set_adapters` sets every adapter at once; this changes one, the cheap case a strength slider needs:
    the next call reads it, and nothing is rebuilt. An inactive adapter keeps the strength for when it is active.

    Args:
        target: A pipeline or a bare denoiser with T-LoRA hooks.
        adapter_name: The adapter (on a pipeline, on every denoiser that holds one of that name).
        weight: Its strength: its delta is scaled by it.
    """
    (name,) = adapter_name_list([adapter_name], "set_tlora_adapter_weight")
    weights = _weights([name], weight)
    hooks = _hooks(target)
    _check_known(hooks, [name], "set_tlora_adapter_weight")
    holding = [hook for hook in hooks.values() if name in hook.adapters]
    for hook in holding:
        hook.check_between_calls()
    for hook in holding:
        _change(hook, {name: (weights[name], hook.adapters[name].settings.active)})


def _hooks(target: Any) -> dict[str, DenoiserHook]:
    """The installed hooks of the target's denoisers, by component."""
    hooks = {}
    for component, module in components_of(target).items():
        hook = installed_hook(module)
        if hook is not None and hook.active:
            hooks[component] = hook
    return hooks


def _check_known(hooks: dict[str, DenoiserHook], names: list[str], verb: str) -> None:
    unknown = [name for name in names if not any(name in hook.adapters for hook in hooks.values())]
    if not unknown:
        return
    held = "; ".join(f"{component}: {', '.join(map(repr, hook.adapters))}" for component, hook in hooks.items())
    raise TLoRAError(
        f"{verb}: no T-LoRA adapter named {', '.join(map(repr, unknown))} is hooked on the target (adapters: "
        f"{held or 'none; load_tlora or enable_tlora first'})."
    )


def _weights(names: list[str], adapter_weights: Any) -> dict[str, float]:
    """Each name's strength, as diffusers expands `adapter_weights`: one value for all, or one per name (None: 1)."""
    values = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
    if len(values) != len(names):
        raise TLoRAError(
            f"adapter_weights has {len(values)} values for {len(names)} adapter names ({names}): pass one weight, "
            "or one per name."
        )
    values = [1.0 if value is None else value for value in values]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TLoRAError(f"An adapter weight must be a finite number (1.0: as trained), got {value!r}.")
    return {name: float(value) for name, value in zip(names, values)}


def _change(hook: DenoiserHook, settings: dict[str, tuple[float, bool]]) -> None:
    """Give the hook's adapters these (weight, active) settings; if its mode cannot follow, put the previous back."""
    previous = {name: (hook.adapters[name].settings.weight, hook.adapters[name].settings.active) for name in settings}
    _apply(hook, settings)
    try:
        hook.follow_settings()
    except BaseException:
        _apply(hook, previous)
        hook.follow_settings()
        raise


def _apply(hook: DenoiserHook, settings: dict[str, tuple[float, bool]]) -> None:
    for name, (weight, active) in settings.items():
        hook.adapters[name].settings.weight = weight
        hook.adapters[name].settings.active = active
