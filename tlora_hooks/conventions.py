"""What timestep each denoiser class receives, and how to read it back on the scheduler's scale.

One row per denoiser class. A row says which forward parameter holds the timestep, how to map
the received value to the noise-ward scheduler timestep (num_train_timesteps = pure noise) and
how to reduce per-token or per-frame values to one noise level. Facts and file references:
shared research note `diffusers_timesteps.md` (diffusers 0.42.1).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import TLoRAError

TimestepMap = Callable[[torch.Tensor], torch.Tensor]
TimestepFn = Callable[[nn.Module, tuple, dict], Any]

TIMESTEP_PARAMS = ("timestep", "timesteps", "timestep_ratio", "t")


def identity(value: torch.Tensor) -> torch.Tensor:
    """The pipeline passes the scheduler's own timestep."""
    return value


def times_1000(value: torch.Tensor) -> torch.Tensor:
    """The pipeline passes t / 1000 (Flux family): undo it."""
    return value * 1000.0


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # Per-token / per-frame timesteps: the generated tokens are the noisiest ones.
    "max": torch.amax,
    "min": torch.amin,
    "mean": torch.mean,
}


@dataclass(frozen=True)
class TimestepConvention:
    """How one denoiser class receives its timestep."""

    param: str = "timestep"
    to_timestep: TimestepMap = identity
    reduce: str = "max"
    schedule_to_timestep: TimestepMap = identity
    video: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise TLoRAError(f"reduce must be one of {sorted(REDUCTIONS)}, got {self.reduce!r}.")
        if not callable(self.to_timestep):
            raise TLoRAError(f"to_timestep must be callable, got {self.to_timestep!r}.")


_FLUX_LIKE = TimestepConvention(
    to_timestep=times_1000,
    note="pipeline passes t/1000 in the latents dtype (bf16-rounded); snapped to scheduler.timesteps",
)
_PER_TOKEN_VIDEO = TimestepConvention(
    video=True, note="per-token timesteps (image-to-video conditioning tokens get 0): max over tokens"
)

_CONVENTIONS: dict[str, TimestepConvention] = {
    "UNet2DConditionModel": TimestepConvention(note="raw scheduler t; SD/SDXL pass it positionally"),
    "SD3Transformer2DModel": TimestepConvention(note="raw t = sigma * 1000"),
    "FluxTransformer2DModel": _FLUX_LIKE,
    "Flux2Transformer2DModel": _FLUX_LIKE,
    "ChromaTransformer2DModel": _FLUX_LIKE,
    "QwenImageTransformer2DModel": _FLUX_LIKE,
    "WanTransformer3DModel": _PER_TOKEN_VIDEO,
    "LTXVideoTransformer3DModel": _PER_TOKEN_VIDEO,
    "HunyuanVideoTransformer3DModel": TimestepConvention(
        video=True, note="raw t, fp32 at step 0 then bf16; snapped to scheduler.timesteps"
    ),
}

# Rows that depend on the pipeline as well as the denoiser class: (pipeline, denoiser) class names.
_PIPELINE_CONVENTIONS: dict[tuple[str, str], TimestepConvention] = {}


def register_convention(
    cls_or_name: type | str,
    param: str = "timestep",
    to_timestep: TimestepMap = identity,
    reduce: str = "max",
    *,
    schedule_to_timestep: TimestepMap = identity,
    video: bool = False,
    pipeline: type | str | None = None,
) -> TimestepConvention:
    """Teach the library a denoiser class it does not know.

    `to_timestep` maps the received value (a float tensor) to the noise-ward scheduler timestep;
    `pipeline` narrows the row to one pipeline class.
    """
    name = cls_or_name if isinstance(cls_or_name, str) else cls_or_name.__name__
    convention = TimestepConvention(
        param=param, to_timestep=to_timestep, reduce=reduce,
        schedule_to_timestep=schedule_to_timestep, video=video, note="registered by the user",
    )
    if pipeline is None:
        _CONVENTIONS[name] = convention
    else:
        pipeline_name = pipeline if isinstance(pipeline, str) else pipeline.__name__
        _PIPELINE_CONVENTIONS[(pipeline_name, name)] = convention
    return convention


def convention_for(denoiser: nn.Module, pipeline: Any = None) -> TimestepConvention | None:
    """The row for this denoiser (and pipeline), searching the class's bases too."""
    pipeline_name = type(pipeline).__name__ if pipeline is not None else None
    for cls in type(denoiser).__mro__:
        if pipeline_name is not None and (pipeline_name, cls.__name__) in _PIPELINE_CONVENTIONS:
            return _PIPELINE_CONVENTIONS[(pipeline_name, cls.__name__)]
        if cls.__name__ in _CONVENTIONS:
            return _CONVENTIONS[cls.__name__]
    return None


@dataclass(frozen=True)
class TimestepReader:
    """Finds the timestep in one call's (args, kwargs), by keyword or by position."""

    param: str
    position: int | None = field(default=None)

    @classmethod
    def for_module(cls, module: nn.Module, param: str) -> "TimestepReader":
        """Bind `param` through the class's `forward` signature (not `module.forward`, which offloading rewraps)."""
        names = [
            p.name
            for p in inspect.signature(type(module).forward).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        return cls(param=param, position=names.index(param) if param in names else None)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.param in kwargs:
            return kwargs[self.param]
        if self.position is not None and len(args) > self.position:
            return args[self.position]
        raise TLoRAError(
            f"{type(module).__name__} was called without its `{self.param}` argument, so T-LoRA cannot pick a rank. "
            "Pass `timestep_fn=` to enable_tlora to say where the timestep is."
        )


def known_denoiser_classes() -> list[str]:
    """Class names with a convention row."""
    return sorted(_CONVENTIONS)
