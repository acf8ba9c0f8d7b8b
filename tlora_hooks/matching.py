"""Which denoiser a T-LoRA file belongs to, and which of its layers each module wraps (LyCORIS's naming rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .discovery import (
    DENOISER_SCHEDULERS,
    components_of,
    is_pipeline,
    peft_base_layer,
    refuse_unloaded_denoisers,
    unrunnable_conv,
    unwrap,
)
from .errors import TLoRAError
from .formats import TLoraFile
from .formats.lycoris import lycoris_name
from .logging import get_logger

logger = get_logger(__name__)

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
EXAMPLES = 3


@dataclass
class Match:
    """The file's modules that wrap layers of one denoiser, and those that wrap none."""

    component: str
    denoiser: nn.Module
    layers: dict[str, nn.Module]  # LyCORIS name -> layer
    unmatched: list[str]


def lycoris_names(denoiser: nn.Module) -> dict[str, nn.Module]:
    """Every layer by the name LyCORIS gives its module: `lycoris_<path with . -> _>`."""
    return {lycoris_name(name): layer for name, layer in unwrap(denoiser).named_modules() if name}


def candidate_denoisers(target: Any, component: str | None) -> dict[str, nn.Module]:
    """The denoisers of a pipeline (or the bare denoiser) a file may be loaded into."""
    if isinstance(target, nn.Module) and component is not None:
        raise TLoRAError("component= names a pipeline attribute; pass the pipeline, or the denoiser without it.")
    modules = components_of(target)
    if not is_pipeline(target):
        return modules
    if component is not None:
        if component not in modules:
            raise TLoRAError(
                f"component={component!r} is not a module of this pipeline (it has {', '.join(modules)})."
            )
        return {component: modules[component]}
    denoisers = {name: module for name, module in modules.items() if name in DENOISER_SCHEDULERS}
    if not denoisers:
        refuse_unloaded_denoisers(target)
        raise TLoRAError(
            f"This {type(target).__name__} has no denoiser attribute ({', '.join(DENOISER_SCHEDULERS)}); "
            "pass component= or the denoiser itself."
        )
    return denoisers


def match_file(target: Any, tlora_file: TLoraFile, component: str | None, strict: bool) -> Match:
    """The denoiser whose layers the file's modules name; raises if none or several fit, or (strict) a key is left."""
    names = list(tlora_file.modules)
    scored = []
    for name, denoiser in candidate_denoisers(target, component).items():
        layers = lycoris_names(denoiser)
        matched = {key: layers[key] for key in names if key in layers}
        scored.append((len(matched), name, denoiser, matched, layers))
    best = max(score for score, *_ in scored)
    if best == 0:
        for _, name, denoiser, _, _ in scored:
            _refuse_wrapper(name, denoiser, names)
        layers = [key for key, layer in scored[0][4].items() if isinstance(layer, SUPPORTED_LAYERS)]
        raise TLoRAError(
            f"None of the {len(names)} T-LoRA modules in {tlora_file.path} matches a layer of "
            f"{', '.join(f'{n} ({type(d).__name__})' for _, n, d, _, _ in scored)}: 0 matched, {len(names)} unmatched "
            f"(file: {names[:EXAMPLES]}; model: {layers[:EXAMPLES]}). The file was made for another model."
        )
    tied = [name for score, name, *_ in scored if score == best]
    if len(tied) > 1:
        raise TLoRAError(
            f"{tlora_file.path} fits {' and '.join(tied)} equally ({best} modules each). "
            f"Say which one it was trained for: load_tlora(pipe, path, component={tied[-1]!r})."
        )
    _, name, denoiser, matched, _ = next(entry for entry in scored if entry[0] == best)
    unmatched = [key for key in names if key not in matched] + list(tlora_file.unknown_keys)
    if unmatched:
        message = (
            f"{tlora_file.path}: {len(matched)} T-LoRA modules match {name} ({type(denoiser).__name__}), "
            f"{len(unmatched)} keys match nothing (e.g. {unmatched[:EXAMPLES]})"
        )
        if strict:
            raise TLoRAError(message + ". With strict=True every key must load; check that the file fits this model.")
        logger.warning("%s; they are skipped (strict=True makes this an error).", message)
    for key, layer in matched.items():
        _check_layer(tlora_file, key, layer)
    return Match(component=name, denoiser=denoiser, layers=matched, unmatched=unmatched)


def _refuse_wrapper(name: str, denoiser: nn.Module, keys: list[str]) -> None:
    """Raise where `denoiser` is an engine's wrapper around the model the file names (xDiT's `xDiTParallel` puts one
    in `pipe.transformer`, holding the stock transformer as `module` and its blocks' attention wrapped the same way):
    the file's keys name the stock layers, whose paths the wrapper changes."""
    wanted = set(keys)
    for path, child in unwrap(denoiser).named_children():
        if any(lycoris_name(stock_path(inner)) in wanted for inner, _ in child.named_modules() if inner):
            raise TLoRAError(
                f"{name} is a {type(denoiser).__name__} wrapping the {type(child).__name__} this file was made for "
                f"(as `{path}`): an engine (xDiT's xDiTParallel) replaced the pipeline's denoiser, and the file names "
                "the stock layers. Call load_tlora(pipe, path) before wrapping the pipeline, then enable_tlora(pipe, "
                "...) again after wrapping it, with the values load_tlora used (max_rank=None keeps the file's rank)."
            )


def stock_path(path: str) -> str:
    """A layer's path inside a wrapped model with the wrappers' `module` steps left out."""
    return ".".join(part for part in path.split(".") if part != "module")


def _check_layer(tlora_file: TLoraFile, key: str, named: nn.Module) -> None:
    """The module fits the layer it names, and LyCORIS's T-LoRA forward can run on it.

    Where a PEFT LoRA already wraps the layer, the T-LoRA goes on PEFT's base layer, as LyCORIS's own
    `create_lycoris_from_weights` puts it: PEFT's forward calls the base layer, so both adapters apply.
    """
    module = tlora_file.modules[key]
    layer = peft_base_layer(named) or named
    if layer is not named and module.base is None and getattr(named, "merged", False):
        raise TLoRAError(
            f"{key}: a PEFT LoRA is fused into this layer, and the T-LoRA's base terms would be rebuilt from the "
            "fused weights (not the ones it was trained on). Call pipe.unfuse_lora() before load_tlora, and "
            "pipe.fuse_lora() again after it if you want the PEFT LoRA fused."
        )
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise TLoRAError(f"{key} names a {type(layer).__name__}; LyCORIS T-LoRA wraps Linear and Conv layers only.")
    if layer.weight.device.type == "meta":
        raise TLoRAError(
            f"The weights of {key} are not loaded (meta device: sequential offload?). "
            "Load the T-LoRA before enabling offloading."
        )
    problem = unrunnable_conv(key, layer)
    if problem is not None:
        raise TLoRAError(f"{problem}, so this file cannot be used as is.")
    is_conv = isinstance(layer, nn.modules.conv._ConvNd)
    expected = (layer.out_channels, layer.in_channels) if is_conv else (layer.out_features, layer.in_features)
    found = (module.out_features, module.in_features)
    if expected != found or (module.q.ndim > 2) != is_conv:
        raise TLoRAError(
            f"{module.source_key or key} has shape (out, in) = {found} ({'conv' if module.q.ndim > 2 else 'linear'}) "
            f"but the model's layer is {expected} ({type(layer).__name__}): the file was made for another model."
        )
