"""What timestep each denoiser receives, and how to read it back on the scheduler's noise-ward scale.

One declarative table. A row (`TimestepConvention`) says which forward parameter holds the timestep,
how to map the received value to the noise-ward scheduler timestep (0 = clean, num_train_timesteps
= pure noise; SimpleTuner keys masks on sigma * 1000 for flow models and on the DDPM t for VP
models), how to reduce per-token or per-frame values, and how to map `scheduler.timesteps` to the
same scale for snapping. Rows are keyed, most specific first:

1. (pipeline class, denoiser class): the pipeline decides what it passes (Cosmos 1 / 2 / 2.5,
   Sana-Sprint);
2. (scheduler, denoiser class): the scheduler decides what a raw `t` means (EDM and
   continuous-timestep schedulers pass c_noise = 0.25 ln sigma); resolved on every call, because
   users swap `pipe.scheduler`;
3. denoiser class.

Each level searches the classes' MROs, so subclasses inherit rows. Facts and file references:
the research note `diffusers_timesteps.md` (diffusers 0.42.1).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .errors import TLoRAError
from .logging import get_logger

logger = get_logger(__name__)

TimestepMap = Callable[[torch.Tensor], torch.Tensor]
TimestepFn = Callable[[nn.Module, tuple, dict], Any]


# -- maps: received value (float32 tensor) -> noise-ward timestep in [0, 1000] ---------------------------------
# 1000 because the pipelines hard-code it (Flux's t/1000, Mochi's 1000 - t) or use num_train_timesteps, which is
# 1000 in every released config of these families.
def identity(value: torch.Tensor) -> torch.Tensor:
    """The pipeline passes the scheduler's own timestep."""
    return value


def times_1000(value: torch.Tensor) -> torch.Tensor:
    """The pipeline passes t / 1000 (or sigma, or a ratio in [0, 1]): undo it."""
    return value * 1000.0


def flipped_unit(value: torch.Tensor) -> torch.Tensor:
    """The pipeline passes 1 - t / 1000 (Lumina2: 0 = pure noise)."""
    return (1.0 - value) * 1000.0


def flipped_1000(value: torch.Tensor) -> torch.Tensor:
    """An inverted schedule (Mochi: `invert_sigmas=True`): t = (1 - sigma) * 1000, so 0 = pure noise."""
    return 1000.0 - value


def c_noise_to_timestep(value: torch.Tensor) -> torch.Tensor:
    """EDM c_noise = 0.25 ln(sigma) -> rectified-flow time sigma / (1 + sigma), x 1000.

    No trainer keys T-LoRA masks on EDM sigmas correctly (SimpleTuner's Cosmos path uses int(sigma),
    nearly full rank everywhere). sigma / (1 + sigma) is the flow sigma of the same noise level
    (x / (1 + sigma) = (1 - s) x0 + s eps), the value Cosmos 2 passes its own transformer, so the
    mask follows the sigma * 1000 convention flow models are trained with.
    """
    sigma = torch.exp(4.0 * value)
    return sigma / (1.0 + sigma) * 1000.0


def edm_sigma_x1000_to_timestep(value: torch.Tensor) -> torch.Tensor:
    """A flow scheduler run with EDM Karras sigmas (Cosmos 2): t = sigma * 1000 with sigma up to 80."""
    sigma = value / 1000.0
    return sigma / (1.0 + sigma) * 1000.0


def trigflow_to_timestep(value: torch.Tensor) -> torch.Tensor:
    """A TrigFlow angle in [0, pi/2] (Sana-Sprint's SCM scheduler) -> 1000 sin / (sin + cos), as Sprint passes it."""
    return torch.sin(value) / (torch.sin(value) + torch.cos(value)) * 1000.0


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # Per-token / per-frame timesteps: the generated tokens are the noisiest ones.
    "max": torch.amax,
    "min": torch.amin,
    "mean": torch.mean,
}


@dataclass(frozen=True)
class TimestepConvention:
    """How one denoiser receives its timestep: one row of the convention table (see `register_convention`).

    Args:
        param: The denoiser's forward parameter that holds the timestep (found by keyword or position).
        to_timestep: Maps the received value to the noise-ward timestep on the scheduler's scale.
        reduce: `"max"`, `"min"` or `"mean"`: how per-token or per-frame values become one.
        schedule_to_timestep: Maps `scheduler.timesteps` to the same scale, for snapping a rounded value back.
        video: Whether the denoiser is a video model (enabling warns that T-LoRA on video is experimental).
        divide_by_config: A denoiser config entry the pipeline multiplies the timestep by (Sana's
            `timestep_scale`), divided out again once the denoiser is known.
        unsupported: When set, why enabling must refuse this denoiser.
        note: What the support matrix says about this row.
    """

    param: str = "timestep"
    to_timestep: TimestepMap = identity
    reduce: str = "max"
    schedule_to_timestep: TimestepMap = identity
    video: bool = False
    divide_by_config: str | None = None
    unsupported: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.param, str) or not self.param:
            raise TLoRAError(f"param must be the name of the denoiser's timestep argument, got {self.param!r}.")
        if self.reduce not in REDUCTIONS:
            raise TLoRAError(f"reduce must be one of {sorted(REDUCTIONS)}, got {self.reduce!r}.")
        for name in ("to_timestep", "schedule_to_timestep"):
            if not callable(getattr(self, name)):
                raise TLoRAError(f"{name} must be callable (tensor -> tensor), got {getattr(self, name)!r}.")

    def bound_to(self, denoiser: nn.Module) -> "TimestepConvention":
        """This row with `divide_by_config` read from the denoiser's config and folded into `to_timestep`.

        Args:
            denoiser: The denoiser whose config holds the `divide_by_config` entry.
        """
        if self.divide_by_config is None:
            return self
        config = getattr(denoiser, "config", None)
        scale = getattr(config, self.divide_by_config, None) if config is not None else None
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise TLoRAError(
                f"The convention for {type(denoiser).__name__} divides the timestep by its config "
                f"`{self.divide_by_config}`, but that is {scale!r}. Pass timestep_fn= to enable_tlora."
            )
        to_timestep = self.to_timestep
        return dataclasses.replace(self, to_timestep=lambda value: to_timestep(value / scale), divide_by_config=None)


@functools.lru_cache(maxsize=None)
def _mro_names(cls: type) -> tuple[str, ...]:
    """Class names along an MRO, most specific first; cached because scheduler rows are matched on every call."""
    return tuple(c.__name__ for c in cls.__mro__)


@dataclass(frozen=True)
class SchedulerMatch:
    """A scheduler class (subclasses included) and config values that change what its timesteps mean."""

    cls: str
    config: tuple[tuple[str, Any], ...] = ()

    def matches(self, scheduler: Any) -> bool:
        if self.cls not in _mro_names(type(scheduler)):
            return False
        config = getattr(scheduler, "config", None) or {}
        return all(config.get(key) == value for key, value in self.config)

    def __str__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.config)
        return f"{self.cls}({settings})" if settings else self.cls


@dataclass(frozen=True)
class ConventionChoice:
    """A denoiser's row, refined on each call by the scheduler the pipeline holds at that moment."""

    default: TimestepConvention
    by_scheduler: tuple[tuple[SchedulerMatch, TimestepConvention], ...] = ()

    @property
    def param(self) -> str:
        return self.default.param

    @property
    def video(self) -> bool:
        return self.default.video

    def for_scheduler(self, scheduler: Any) -> TimestepConvention:
        if scheduler is not None:
            for match, convention in self.by_scheduler:
                if match.matches(scheduler):
                    return convention
        return self.default


# -- the table ---------------------------------------------------------------------------------------------------
_FLUX_LIKE = TimestepConvention(
    to_timestep=times_1000,
    note="the pipeline passes t/1000 in the latents dtype (bf16-rounded); snapped back to scheduler.timesteps",
)
_EDM = TimestepConvention(
    to_timestep=c_noise_to_timestep, schedule_to_timestep=c_noise_to_timestep,
    note="c_noise = 0.25 ln sigma; rank from the rectified-flow time sigma/(1+sigma) x 1000",
)
_PER_TOKEN_VIDEO = TimestepConvention(
    video=True, note="raw t; per-token timesteps (image-conditioning tokens get 0): the max over tokens"
)


def _video(note: str, **fields: Any) -> TimestepConvention:
    return TimestepConvention(video=True, note=note, **fields)


CONVENTIONS: dict[str, TimestepConvention] = {
    # images
    "UNet2DConditionModel": TimestepConvention(note="raw scheduler t, passed positionally (SD/SDXL/Kandinsky 2.2)"),
    "SD3Transformer2DModel": TimestepConvention(note="raw t = sigma x 1000; the skip-layer-guidance call too"),
    "FluxTransformer2DModel": _FLUX_LIKE,
    "Flux2Transformer2DModel": _FLUX_LIKE,
    "ChromaTransformer2DModel": _FLUX_LIKE,
    "QwenImageTransformer2DModel": _FLUX_LIKE,
    "AuraFlowTransformer2DModel": dataclasses.replace(
        _FLUX_LIKE, note="t/1000 in the latents dtype (fp16-rounded); snapped back to scheduler.timesteps"
    ),
    "SanaTransformer2DModel": TimestepConvention(
        divide_by_config="timestep_scale",
        note="raw int64 flow t times the transformer's config.timestep_scale, divided back out",
    ),
    "PixArtTransformer2DModel": TimestepConvention(note="raw int64 DPM-Solver t"),
    "Lumina2Transformer2DModel": TimestepConvention(
        to_timestep=flipped_unit, note="the pipeline passes 1 - t/1000 (0 = pure noise): flipped back"
    ),
    "HiDreamImageTransformer2DModel": TimestepConvention(param="timesteps", note="raw t, parameter `timesteps`"),
    "HunyuanDiT2DModel": TimestepConvention(note="raw DDPM t in the latents dtype, passed positionally"),
    "PriorTransformer": TimestepConvention(note="raw DDPM t (Kandinsky 2.2 prior)"),
    "Kandinsky3UNet": TimestepConvention(note="raw DDPM t, passed positionally"),
    "StableCascadeUNet": TimestepConvention(
        param="timestep_ratio", to_timestep=times_1000, schedule_to_timestep=times_1000,
        note="`timestep_ratio` in (0, 1] from DDPMWuerstchen (no num_train_timesteps): ratio x 1000",
    ),
    # video
    "CogVideoXTransformer3DModel": _video("raw int64 t"),
    "HunyuanVideoTransformer3DModel": _video("raw t, fp32 at step 0 then bf16; snapped to scheduler.timesteps"),
    "WanTransformer3DModel": _PER_TOKEN_VIDEO,
    "LTXVideoTransformer3DModel": _PER_TOKEN_VIDEO,
    "MochiTransformer3DModel": _video(
        "inverted schedule: t = (1 - sigma) x 1000 (0 = pure noise), flipped to 1000 - t",
        to_timestep=flipped_1000, schedule_to_timestep=flipped_1000,
    ),
    "AllegroTransformer3DModel": _video("raw t"),
    "SkyReelsV2Transformer3DModel": _video(
        "raw int64 t; diffusion forcing passes one t per latent frame (B, F): the noisiest frame sets the rank",
    ),
    "CosmosTransformer3DModel": TimestepConvention(
        video=True,
        note="depends on the pipeline (1.0: EDM c_noise; 2: sigma/(sigma+1); 2.5: the flow sigma): see the Cosmos "
        "pipeline rows",
        unsupported="each Cosmos pipeline passes a different timestep; enable on the pipeline or pass timestep_fn=",
    ),
}

# (pipeline class, denoiser class): the pipeline decides what the denoiser receives.
_COSMOS_1 = _video("EDM c_noise = 0.25 ln sigma (bf16); rank from sigma/(1+sigma) x 1000",
                   to_timestep=c_noise_to_timestep, schedule_to_timestep=c_noise_to_timestep)
_COSMOS_2 = _video(
    "sigma/(sigma+1) of the EDM Karras sigma; the flow scheduler's t is sigma x 1000 (up to 80000)",
    to_timestep=times_1000, schedule_to_timestep=edm_sigma_x1000_to_timestep,
)
_COSMOS_2_5 = _video("the flow sigma itself (fp32), x 1000", to_timestep=times_1000)
_SANA_SPRINT = TimestepConvention(
    to_timestep=times_1000, schedule_to_timestep=trigflow_to_timestep,
    note="SCM: sin(t)/(sin(t)+cos(t)) of the TrigFlow angle t, x 1000 (timestep_scale unused)",
)
PIPELINE_CONVENTIONS: dict[tuple[str, str], TimestepConvention] = {
    ("CosmosTextToWorldPipeline", "CosmosTransformer3DModel"): _COSMOS_1,
    ("CosmosVideoToWorldPipeline", "CosmosTransformer3DModel"): _COSMOS_1,
    ("Cosmos2TextToImagePipeline", "CosmosTransformer3DModel"): _COSMOS_2,
    ("Cosmos2VideoToWorldPipeline", "CosmosTransformer3DModel"): _COSMOS_2,
    ("Cosmos2_5_PredictBasePipeline", "CosmosTransformer3DModel"): _COSMOS_2_5,
    ("Cosmos2_5_TransferPipeline", "CosmosTransformer3DModel"): _COSMOS_2_5,
    ("SanaSprintPipeline", "SanaTransformer2DModel"): _SANA_SPRINT,
    ("SanaSprintImg2ImgPipeline", "SanaTransformer2DModel"): _SANA_SPRINT,
}

# (scheduler, denoiser class): schedulers whose timesteps are not DDPM/flow t in [0, 1000].
SCHEDULER_CONVENTIONS: dict[tuple[SchedulerMatch, str], TimestepConvention] = {
    (SchedulerMatch("EDMDPMSolverMultistepScheduler"), "UNet2DConditionModel"): _EDM,  # Playground v2.5
    (SchedulerMatch("EDMEulerScheduler"), "UNet2DConditionModel"): _EDM,
    # CosXL: EulerDiscreteScheduler(timestep_type="continuous")
    (SchedulerMatch("EulerDiscreteScheduler", (("timestep_type", "continuous"),)), "UNet2DConditionModel"): _EDM,
}


def _name(cls_or_name: type | str) -> str:
    return cls_or_name if isinstance(cls_or_name, str) else cls_or_name.__name__


def register_convention(
    cls_or_name: type | str,
    param: str = "timestep",
    to_timestep: TimestepMap = identity,
    reduce: str = "max",
    *,
    schedule_to_timestep: TimestepMap = identity,
    video: bool = False,
    pipeline: type | str | None = None,
    scheduler: type | str | None = None,
) -> TimestepConvention:
    """Teach the library a denoiser class it does not know (or override a row). Takes effect at the next
    `enable_tlora`; rows match subclasses too.

    Args:
        cls_or_name: The denoiser class, or its name (no import needed).
        param: The denoiser's forward parameter that holds the timestep (found by keyword or position).
        to_timestep: Maps the received value (a float32 tensor) to the noise-ward timestep on the scheduler's
            scale (num_train_timesteps = pure noise, 0 = clean), e.g. `lambda t: t * 1000` for a pipeline that
            passes t / 1000. The rank is computed from this value, as T-LoRA training computes it.
        reduce: `"max"`, `"min"` or `"mean"`: how per-token or per-frame values become one; `"max"` keys the
            rank on the noisiest token, the generated ones (conditioning tokens get 0).
        schedule_to_timestep: Maps `scheduler.timesteps` to the same scale, so a received value rounded by its
            dtype (bf16 t / 1000) can be snapped back to the step it came from.
        video: Whether the denoiser is a video model (enabling warns that T-LoRA on video is experimental).
        pipeline: A pipeline class or name: the row applies only inside that pipeline (where the pipeline, not
            the denoiser, decides what is passed, as in Cosmos).
        scheduler: A scheduler class or name: the row refines the class's row while the pipeline holds that
            scheduler (EDM schedulers pass c_noise). Not together with `pipeline`.

    Returns:
        The registered row.
    """
    if pipeline is not None and scheduler is not None:
        raise TLoRAError("register_convention takes pipeline= or scheduler=, not both.")
    convention = TimestepConvention(
        param=param, to_timestep=to_timestep, reduce=reduce, schedule_to_timestep=schedule_to_timestep,
        video=video, note="registered by the user",
    )
    name = _name(cls_or_name)
    if pipeline is not None:
        PIPELINE_CONVENTIONS[(_name(pipeline), name)] = convention
    elif scheduler is not None:
        SCHEDULER_CONVENTIONS[(SchedulerMatch(_name(scheduler)), name)] = convention
    else:
        CONVENTIONS[name] = convention
    return convention


def convention_for(denoiser: nn.Module, pipeline: Any = None) -> ConventionChoice | None:
    """The rows for this denoiser (and pipeline), in the documented lookup order; None if no row knows it."""
    denoiser_names = _mro_names(type(denoiser))
    if pipeline is not None:
        for pipeline_name in _mro_names(type(pipeline)):
            for denoiser_name in denoiser_names:
                if (pipeline_name, denoiser_name) in PIPELINE_CONVENTIONS:
                    return ConventionChoice(PIPELINE_CONVENTIONS[(pipeline_name, denoiser_name)].bound_to(denoiser))
    default = next((CONVENTIONS[name] for name in denoiser_names if name in CONVENTIONS), None)
    by_scheduler = tuple(
        (match, convention.bound_to(denoiser))
        for denoiser_name in denoiser_names
        for (match, row_denoiser), convention in SCHEDULER_CONVENTIONS.items()
        if row_denoiser == denoiser_name
    )
    if default is None:
        return None
    if not default.unsupported:
        default = default.bound_to(denoiser)
    for match, convention in by_scheduler:
        if convention.param != default.param:
            raise TLoRAError(
                f"The {match} row for {type(denoiser).__name__} reads `{convention.param}`, its class row "
                f"`{default.param}`; one denoiser has one timestep parameter."
            )
    return ConventionChoice(default, by_scheduler)


def wrapped_convention(name: str, wrapper: nn.Module, pipeline: Any = None) -> ConventionChoice | None:
    """The rows of the known denoiser that a module of an unknown class wraps with all its T-LoRA modules (xDiT's
    transformer wrappers, DDP's `.module`), for reading the wrapper's own calls: a wrapper is called with the
    arguments of the denoiser it stands for. None where no such denoiser is inside."""
    from .discovery import applied_tlora_modules

    total = len(applied_tlora_modules(wrapper))
    for path, inner in wrapper.named_modules():
        convention = convention_for(inner, pipeline) if path else None
        if convention is not None and len(applied_tlora_modules(inner)) == total:
            logger.warning(
                "T-LoRA: %s is a %s wrapping a %s (%s); its calls are read as %s's (`%s`). If the wrapper changes "
                "the timestep before passing it on, pass timestep_fn= to enable_tlora.",
                name, type(wrapper).__name__, type(inner).__name__, path, type(inner).__name__,
                convention.default.param,
            )
            return convention
    return None


def for_timestep_fn(choice: ConventionChoice | None) -> ConventionChoice:
    """The rows for a user's `timestep_fn`, which returns the noise-ward timestep itself.

    It replaces reading and mapping; snapping keeps each row's scheduler-side map, so an inverted,
    EDM or ratio schedule is still compared on the noise-ward scale; a refusing row no longer refuses.
    """

    def own(row: TimestepConvention) -> TimestepConvention:
        return TimestepConvention(schedule_to_timestep=row.schedule_to_timestep, video=row.video, note="timestep_fn")

    if choice is None:
        return ConventionChoice(TimestepConvention(note="timestep_fn"))
    return ConventionChoice(own(choice.default), tuple((match, own(row)) for match, row in choice.by_scheduler))


def plan_timestep_reading(
    name: str, denoiser: nn.Module, pipeline: Any = None, timestep_fn: TimestepFn | None = None
) -> tuple[ConventionChoice, TimestepFn]:
    """The convention rows and the timestep reader for one denoiser; raises for an unknown or unsupported class.

    `timestep_fn` takes precedence over every row: its value is the noise-ward timestep. `name` (the component)
    is for the messages.
    """
    convention = convention_for(denoiser, pipeline) or wrapped_convention(name, denoiser, pipeline)
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


def row_for(denoiser: str, pipeline: str | None = None, scheduler: str | None = None) -> TimestepConvention | None:
    """The row a (pipeline, scheduler, denoiser) combination uses, by exact class names (for the support matrix)."""
    if (pipeline, denoiser) in PIPELINE_CONVENTIONS:
        return PIPELINE_CONVENTIONS[(pipeline, denoiser)]
    for (match, row_denoiser), convention in SCHEDULER_CONVENTIONS.items():
        if row_denoiser == denoiser and str(match) == scheduler:
            return convention
    return CONVENTIONS.get(denoiser)


def known_denoiser_classes() -> list[str]:
    """Class names with a convention row."""
    return sorted(CONVENTIONS)
