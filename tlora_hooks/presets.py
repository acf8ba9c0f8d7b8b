"""Which layers `create_tlora` adapts: a LyCORIS `apply_preset`, or the family's default targets, and what matched.

LyCORIS selects layers by module class name (`target_module`, `module_algo_map`) and by module path (`target_name`,
`name_algo_map`), through class attributes that `LycorisNetwork.apply_preset` overwrites for the whole process.
`lycoris_preset` applies a preset on LyCORIS's defaults for one build and puts the previous attributes back, so a
later `create_lycoris` by the user sees what it saw before.
"""

from __future__ import annotations

import copy
import functools
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from torch import nn

from .errors import TLoRAError
from .formats.lycoris import KEY_PREFIX
from .logging import get_logger

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

logger = get_logger(__name__)

# Attention and feed-forward classes per denoiser class (diffusers 0.42): the targets `create_tlora` uses when the
# config has no `apply_preset`. SimpleTuner's generic ["Attention", "FeedForward"] fits the UNets and the DiTs built
# on diffusers' `Attention`; Flux, Wan, LTX and others name their attention (and some their feed-forward) otherwise.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": ("Attention", "FeedForward"),
    "SD3Transformer2DModel": ("Attention", "FeedForward"),
    "PixArtTransformer2DModel": ("Attention", "FeedForward"),
    "QwenImageTransformer2DModel": ("Attention", "FeedForward"),
    "HunyuanDiT2DModel": ("Attention", "FeedForward"),
    "CogVideoXTransformer3DModel": ("Attention", "FeedForward"),
    "AllegroTransformer3DModel": ("Attention", "FeedForward"),
    "CosmosTransformer3DModel": ("Attention", "FeedForward"),
    "HunyuanVideoTransformer3DModel": ("Attention", "FeedForward"),
    "FluxTransformer2DModel": ("FluxAttention", "FeedForward"),
    "ChromaTransformer2DModel": ("FluxAttention", "FeedForward"),
    "Flux2Transformer2DModel": ("Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"),
    "WanTransformer3DModel": ("WanAttention", "FeedForward"),
    "SkyReelsV2Transformer3DModel": ("SkyReelsV2Attention", "FeedForward"),
    "LTXVideoTransformer3DModel": ("LTXAttention", "FeedForward"),
    "MochiTransformer3DModel": ("MochiAttention", "FeedForward"),
    "AuraFlowTransformer2DModel": ("Attention", "AuraFlowFeedForward"),
    "Lumina2Transformer2DModel": ("Attention", "LuminaFeedForward"),
    "HiDreamImageTransformer2DModel": ("HiDreamAttention", "HiDreamImageFeedForwardSwiGLU"),
    "SanaTransformer2DModel": ("Attention",),
    "Kandinsky3UNet": ("Attention",),
    "StableCascadeUNet": ("Attention",),
}
# Layers kept out of those targets (LyCORIS `exclude_name` patterns). HiDream's mixture-of-experts feed-forward routes
# a (batch x tokens) row to each expert, so an expert's input does not start with the batch dim and a training batch
# whose samples need different ranks cannot be masked per sample there; its shared expert sees every sample.
DEFAULT_EXCLUDES: dict[str, tuple[str, ...]] = {
    "HiDreamImageTransformer2DModel": (r".*\.experts\.",),
}

# The LycorisNetwork class attributes `apply_preset` writes.
PRESET_ATTRIBUTES = (
    "ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
    "USE_FNMATCH", "TARGET_EXCLUDE_NAME",
)
# Modules LyCORIS names `<lora_prefix>_<path>`; tlora_hooks and SimpleTuner read `lycoris_<path>`.
LORA_PREFIX = KEY_PREFIX.removesuffix("_")

_preset_lock = threading.Lock()


@functools.cache
def lycoris_defaults() -> dict[str, Any]:
    """LyCORIS's own values of the preset attributes, read once, before any build of ours changed them."""
    from lycoris import LycorisNetwork

    return {name: copy.deepcopy(getattr(LycorisNetwork, name)) for name in PRESET_ATTRIBUTES}


def preset_for(denoiser: nn.Module, preset: dict | None) -> dict:
    """The config's preset, checked, or the family's default targets when it has none."""
    if preset is not None:
        check_preset(preset)
        return preset
    cls = type(denoiser).__name__
    if cls not in DEFAULT_TARGETS:
        raise TLoRAError(
            f"No default T-LoRA targets are known for {cls}; give the config an `apply_preset`, e.g. "
            f'{{"target_module": {candidate_targets(denoiser)}}} (its attention and feed-forward classes).'
        )
    excluded = {"exclude_name": list(DEFAULT_EXCLUDES[cls])} if cls in DEFAULT_EXCLUDES else {}
    return {"target_module": list(DEFAULT_TARGETS[cls]), **excluded}


def check_preset(preset: Any) -> None:
    """A preset LyCORIS accepts and whose modules tlora_hooks can read back."""
    if not isinstance(preset, dict):
        raise TLoRAError(f"apply_preset must be a JSON object (target_module, module_algo_map, ...), got {preset!r}.")
    from lycoris.config_sdk import VALID_PRESET_KEYS

    unknown = sorted(set(preset) - set(VALID_PRESET_KEYS))
    if unknown:
        raise TLoRAError(f"apply_preset has unknown keys {unknown}; LyCORIS knows {list(VALID_PRESET_KEYS)}.")
    if preset.get("lora_prefix", LORA_PREFIX) != LORA_PREFIX:
        raise TLoRAError(
            f"apply_preset sets lora_prefix={preset['lora_prefix']!r}: T-LoRA files name modules "
            f"`{LORA_PREFIX}_<layer path>`, which load_tlora and SimpleTuner read. Remove lora_prefix."
        )


@contextmanager
def lycoris_preset(preset: dict) -> Iterator[None]:
    """`LycorisNetwork.apply_preset(preset)` on LyCORIS's defaults, for one build; the previous class attributes
    (the user's own preset, if any) are put back afterwards."""
    from lycoris import LycorisNetwork

    with _preset_lock:
        defaults = lycoris_defaults()
        saved = {name: getattr(LycorisNetwork, name) for name in PRESET_ATTRIBUTES}
        try:
            for name, value in defaults.items():
                setattr(LycorisNetwork, name, copy.deepcopy(value))
            LycorisNetwork.apply_preset(copy.deepcopy(preset))
            yield
        finally:
            for name, value in saved.items():
                setattr(LycorisNetwork, name, value)


def report_matches(network: LycorisNetwork, denoiser: nn.Module, preset: dict) -> None:
    """Error when the preset built nothing; a warning naming the targets that matched nothing otherwise.

    Only the preset's own targets are reported: a key it leaves out keeps LyCORIS's default (`target_module`:
    Linear, Conv1d, ...), which the user did not name. Call inside `lycoris_preset(preset)`: paths match as the
    preset's `use_fnmatch` says.
    """
    classes = set(preset.get("target_module") or ()) | set(preset.get("module_algo_map") or ())
    present = {type(module).__name__ for module in denoiser.modules()}
    names = [name for name, _ in denoiser.named_modules() if name]
    patterns = list(preset.get("target_name") or ()) + list(preset.get("name_algo_map") or ())
    unmatched = sorted(classes - present) + [
        pattern
        for pattern in patterns
        if not any(name == pattern or network.match_fn(pattern, name) for name in names)
    ]
    cls = type(denoiser).__name__
    suggestion = list(DEFAULT_TARGETS.get(cls, ())) or candidate_targets(denoiser)
    if not network.loras:
        raise TLoRAError(
            f"apply_preset {preset} matches no layer of {cls} (no module of the classes or paths it names"
            f"{': ' + ', '.join(unmatched) if unmatched else ' holds a Linear or 1x1 conv layer'}). "
            f"{cls}'s attention and feed-forward classes: {suggestion}."
        )
    if unmatched:
        logger.warning(
            "apply_preset names %s, which match nothing in %s; only the other targets got T-LoRA modules (%d). "
            "%s's attention and feed-forward classes are %s.",
            unmatched, cls, len(network.loras), cls, suggestion,
        )


def candidate_targets(denoiser: nn.Module) -> list[str]:
    """Class names in the model that look like attention or feed-forward blocks holding Linear layers."""
    found = set()
    for module in denoiser.modules():
        name = type(module).__name__
        if any(word in name for word in ("Attention", "FeedForward")) and any(
            isinstance(child, nn.Linear) for child in module.modules()
        ):
            found.add(name)
    return sorted(found)
