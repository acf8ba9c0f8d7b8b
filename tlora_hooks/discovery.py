"""Finding denoisers on a pipeline and the T-LoRA modules in a denoiser's forward path."""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import TLoRAError

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

# Pipeline attributes that hold a denoiser, and the scheduler attribute that steps it. Combined Kandinsky and
# Stable Cascade pipes hold the prior as `prior_prior`, stepped by `prior_scheduler` (tested: snapping to the
# other loop's schedule changes ranks). SkyReels-V2 diffusion forcing steps per-frame deep copies of `scheduler`
# that share its timesteps, so snapping to `scheduler.timesteps` is exact although `scheduler` is never stepped.
DENOISER_SCHEDULERS: dict[str, str] = {
    "unet": "scheduler",
    "transformer": "scheduler",
    "transformer_2": "scheduler",
    "prior": "scheduler",
    "decoder": "scheduler",
    "prior_prior": "prior_scheduler",
    "prior_unet": "prior_scheduler",
}


def unwrap(module: nn.Module) -> nn.Module:
    """The module itself under a `torch.compile` wrapper, where hooks and signatures live."""
    return getattr(module, "_orig_mod", module)


def is_pipeline(target: Any) -> bool:
    """A Diffusers pipeline, detected by its config and components rather than by import: a `DiffusionPipeline`
    (`register_modules`) or a Modular Diffusers `ModularPipeline` (`update_components`)."""
    return (
        hasattr(target, "config")
        and (hasattr(target, "register_modules") or is_modular_pipeline(target))
        and not isinstance(target, nn.Module)
    )


def is_modular_pipeline(target: Any) -> bool:
    """A Modular Diffusers `ModularPipeline`: its components are attributes, listed in `components`."""
    return hasattr(type(target), "update_components") and hasattr(type(target), "components")


def pipeline_modules(pipeline: Any) -> dict[str, nn.Module]:
    """Every `nn.Module` component of a pipeline, by attribute name.

    A `DiffusionPipeline` lists its components in its config; a `ModularPipeline` in `components` (its config holds
    only those loaded from a repo).
    """
    names = pipeline.components.keys() if is_modular_pipeline(pipeline) else pipeline.config.keys()
    modules = {}
    for name in names:
        if name.startswith("_"):
            continue
        value = getattr(pipeline, name, None)
        if isinstance(value, nn.Module):
            modules[name] = value
    return modules


def components_of(target: Any) -> dict[str, nn.Module]:
    """The modules a pipeline or a bare denoiser offers, unwrapped from `torch.compile`: a pipeline's `nn.Module`
    components by attribute name, or the denoiser itself by its class name. Raises for anything else."""
    if isinstance(target, nn.Module):
        return {type(unwrap(target)).__name__: unwrap(target)}
    if is_pipeline(target):
        return {name: unwrap(module) for name, module in pipeline_modules(target).items()}
    raise TLoRAError(
        f"T-LoRA expects a Diffusers pipeline or a denoiser nn.Module, got {type(target).__name__}. Pass a "
        "DiffusionPipeline, a Modular Diffusers ModularPipeline, or the denoiser itself (e.g. pipe.unet)."
    )


def peft_base_layer(module: nn.Module) -> nn.Module | None:
    """The layer a PEFT adapter layer (`peft.tuners.lora.Linear`, ...) wraps, or None for any other module.

    Without PEFT imported no such layer exists, so PEFT is never imported here.
    """
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None or not isinstance(module, tuners.BaseTunerLayer):
        return None
    return module.get_base_layer()


def peft_wrapped_layers(denoiser: nn.Module) -> dict[int, nn.Module]:
    """The PEFT adapter layer around each layer of `denoiser` that one wraps, by id of the wrapped layer."""
    if "peft.tuners.tuners_utils" not in sys.modules:
        return {}
    wrapped = {}
    for module in unwrap(denoiser).modules():
        base = peft_base_layer(module)
        if base is not None:
            wrapped[id(base)] = module
    return wrapped


def applied_tlora_modules(denoiser: nn.Module) -> list[TLoraModule]:
    """T-LoRA modules that LyCORIS `apply_to()` put in this module's forward path."""
    from lycoris.modules.tlora import TLoraModule

    found = []
    for layer in unwrap(denoiser).modules():
        for wrapper in layer.__dict__.get("_lycoris_wrappers", ()):
            if isinstance(wrapper, TLoraModule):
                found.append(wrapper)
    return found


def detached_tlora_modules(denoiser: nn.Module) -> list[TLoraModule]:
    """T-LoRA modules built for this module's layers but not in its forward path (merged or never applied).

    Only called to explain an error, so a scan of live objects is affordable.
    """
    from lycoris.modules.tlora import TLoraModule

    layers = {id(layer) for layer in unwrap(denoiser).modules()}
    return [
        obj
        for obj in gc.get_objects()
        if issubclass(type(obj), TLoraModule) and obj.org_module and id(obj.org_module[0]) in layers
    ]


def unrunnable_conv(name: str, layer: nn.Module) -> str | None:
    """Why LyCORIS's T-LoRA forward cannot run on `layer` (a conv larger than 1x1, or grouped), or None.

    Its masked delta is built with a 1x1 kernel, so any other conv fails inside LyCORIS at the first call.
    """
    if not isinstance(layer, nn.modules.conv._ConvNd):
        return None
    if all(size == 1 for size in layer.kernel_size) and layer.groups == 1:
        return None
    return (
        f"{name} wraps a {layer.kernel_size} conv (groups={layer.groups}); LyCORIS's T-LoRA forward only runs on "
        "1x1 convs without groups (its masked delta has a 1x1 kernel)"
    )


def refuse_unloaded_denoisers(target: Any) -> None:
    """A `ModularPipeline` holds its components only once `load_components()` ran: say that, not that it has no
    denoiser."""
    if not is_modular_pipeline(target):
        return
    unloaded = [name for name, value in target.components.items() if name in DENOISER_SCHEDULERS and value is None]
    if unloaded:
        raise TLoRAError(
            f"This {type(target).__name__} has not loaded its {' / '.join(unloaded)} yet: call "
            f"pipe.load_components(...) (or pipe.update_components({unloaded[0]}=...)) before adding a T-LoRA."
        )


def no_modules_error(where: str, seen: list[str], detached: int) -> TLoRAError:
    """The error for a target whose forward path holds no T-LoRA module."""
    if detached:
        return TLoRAError(
            f"{where} has {detached} LyCORIS T-LoRA modules, but none is in the forward path: the weights were merged "
            "with `merge_to()` (which bakes every rank in, so masking would do nothing) or never applied. Rebuild the "
            "denoiser from its original weights and call `network.apply_to()` without `merge_to()`, "
            "or use `tlora_hooks.load_tlora(pipe, path)`."
        )
    return TLoRAError(
        f"No T-LoRA modules found in {where} (components seen: {', '.join(seen) or 'none'}). "
        "Apply a LyCORIS `algo='tlora'` network first (`create_lycoris_from_weights(...)` then `apply_to()`, "
        "never `merge_to()`), or load the file with `tlora_hooks.load_tlora(pipe, path)`."
    )


def find_denoisers(target: Any) -> dict[str, tuple[nn.Module, list[TLoraModule]]]:
    """Every component of `target` with T-LoRA modules in its forward path, with those modules.

    Raises TLoRAError when there are none, naming what was seen.
    """
    components = components_of(target)
    found = {}
    for name, module in components.items():
        modules = applied_tlora_modules(module)
        if modules:
            found[name] = (module, modules)
    if not found:
        refuse_unloaded_denoisers(target)
        where = f"this {type(target).__name__}"
        detached = sum(len(detached_tlora_modules(m)) for m in components.values())
        raise no_modules_error(where, [f"{n} ({type(m).__name__})" for n, m in components.items()], detached)
    return found


def scheduler_attribute(component_name: str) -> str:
    """The pipeline attribute holding the scheduler that steps this component."""
    return DENOISER_SCHEDULERS.get(component_name, "scheduler")
