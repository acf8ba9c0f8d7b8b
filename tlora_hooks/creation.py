"""`create_tlora`: a new, trainable T-LoRA on a stock denoiser, from SimpleTuner's LyCORIS config, masked by the hooks.

The network is LyCORIS's own: `create_lycoris` selects the layers through the preset machinery and builds
`TLoraModule`s exactly as SimpleTuner's trainer does. Only the default initialisation (the principal singular triplets
of each weight, one SVD and one `gc.collect()` per module in LyCORIS) is computed differently: once, batched by shape,
by the same decomposition that `load_tlora` uses to rebuild the base terms, so a saved file reloads the same base.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .api import check_hook_options
from .conventions import TimestepFn, plan_timestep_reading
from .discovery import is_pipeline
from .errors import TLoRAError
from .loading import check_adapter_name, hook_options, swap_adapter
from .logging import get_logger
from .matching import EXAMPLES, Match, candidate_denoisers
from .modes import check_mode
from .presets import lycoris_preset, preset_for, report_matches
from .progress import ProgressBars
from .rebuild import rebuild_base_terms
from .records import LoadRecord
from .registration import adapters_hidden
from .schedule import RankSchedule

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

logger = get_logger(__name__)

# LyCORIS builds modules through its algo table; this entry builds `TLoraModuleWithoutSvd` (a `TLoraModule`).
BATCHED_ALGO = "tlora-batched-init"

# Config keys `create_tlora` reads itself; every other key goes to `create_lycoris` as SimpleTuner passes it.
OWN_KEYS = ("algo", "multiplier", "linear_dim", "linear_alpha", "tlora_min_rank", "tlora_alpha", "apply_preset")
ALGO_MAPS = ("module_algo_map", "name_algo_map")


@dataclass
class TLoRAConfig:
    """SimpleTuner's LyCORIS config for `algo: "tlora"`, with LyCORIS's and SimpleTuner's defaults filled in."""

    schedule: RankSchedule
    linear_alpha: float = 1
    multiplier: float = 1.0
    preset: dict | None = None
    lycoris_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, config: str | os.PathLike | dict) -> "TLoRAConfig":
        raw = _load(config)
        algo = raw.get("algo")
        if algo != "tlora":
            raise TLoRAError(
                f"create_tlora builds T-LoRA modules: the config needs \"algo\": \"tlora\", got {algo!r}. "
                "For other LyCORIS algorithms use lycoris.create_lycoris."
            )
        linear_alpha = raw.get("linear_alpha", 1)
        multiplier = raw.get("multiplier", 1.0)
        for label, value in (("linear_alpha", linear_alpha), ("multiplier", multiplier)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TLoRAError(f"{label} must be a finite number, got {value!r}.")
        schedule = RankSchedule(
            max_rank=raw.get("linear_dim", 4), min_rank=raw.get("tlora_min_rank", 1), alpha=raw.get("tlora_alpha", 1.0)
        )
        kwargs = {key: value for key, value in raw.items() if key not in OWN_KEYS}
        try:
            json.dumps(raw)
        except (TypeError, ValueError) as error:
            raise TLoRAError(
                f"The config must be plain JSON values (it is saved in the file's metadata): {error}."
            ) from None
        if kwargs.get("train_norm"):
            raise TLoRAError("train_norm adds LyCORIS norm modules, which are not T-LoRA modules; remove it.")
        return cls(schedule, linear_alpha, multiplier, raw.get("apply_preset"), kwargs)

    def metadata(self, preset: dict) -> dict[str, Any]:
        """SimpleTuner's `lycoris_config`, with the preset actually applied."""
        return {
            "algo": "tlora", "multiplier": self.multiplier, "linear_dim": self.schedule.max_rank,
            "linear_alpha": self.linear_alpha, "tlora_min_rank": self.schedule.min_rank,
            "tlora_alpha": self.schedule.alpha, "apply_preset": preset, **self.lycoris_kwargs,
        }


def create_tlora(
    target: Any,
    config: str | os.PathLike | dict,
    *,
    component: str | None = None,
    adapter_name: str = "default",
    mode: str | None = None,
    timestep_fn: TimestepFn | None = None,
    scheduler: Any = None,
) -> LycorisNetwork:
    """Add a new, trainable T-LoRA to a pipeline's denoiser (or a bare denoiser) and mask it by timestep.

    The layers are chosen, and the modules built, by LyCORIS's `create_lycoris` from the config, as SimpleTuner does;
    the default initialisation (the principal singular triplets of each weight) is computed batched, far faster.
    The network is applied and registered under the denoiser as `tlora.<adapter_name>`, so its parameters are in
    `denoiser.parameters()`, move with `pipe.to(...)` and are synchronised by `DistributedDataParallel`; the hooks
    are enabled with the config's schedule. A `create_tlora` or `load_tlora` with the same `adapter_name` on the same
    denoiser replaces it, another name adds an adapter beside it; `unload_tlora` removes them all,
    `delete_tlora_adapters` one. A failed call leaves the pipeline as it was.

    Args:
        target: A Diffusers pipeline, or a bare denoiser `nn.Module` (as training loops hold it).
        config: SimpleTuner's LyCORIS config, as a path to its JSON file or as a dict: `algo` ("tlora"),
            `linear_dim`, `linear_alpha`, `multiplier`, `tlora_min_rank` (default 1), `tlora_alpha` (default 1.0),
            `apply_preset` (`target_module`, `module_algo_map`, `target_name`, ...; default: the family's attention
            and feed-forward classes) and any other `create_lycoris` argument.
        component: The pipeline attribute to add it to, where several denoisers fit (Wan 2.2's `transformer_2`).
        adapter_name: The name it is registered under (`denoiser.tlora[adapter_name]`), as in `load_tlora`.
        mode: The masked forward's mode, as in `load_tlora` (default: the mode the denoiser's other adapters run,
            else `"auto"`).
        timestep_fn: As in `enable_tlora`, for every adapter of the denoiser; default: the one its other adapters
            use, else none.
        scheduler: As in `enable_tlora`, likewise. A bare denoiser has no scheduler otherwise: pass the
            pipeline's (EDM and continuous-timestep schedulers change what the timestep means; validation calls
            snap to its `timesteps`).

    Returns:
        The applied LyCORIS `LycorisNetwork` (`network.loras`, `network.parameters()`,
        `network.prepare_optimizer_params(lr)`); its `apply_to()` does nothing (it is applied). Save it with
        `save_tlora`.
    """
    if mode is not None:
        check_mode(mode)
    check_hook_options(timestep_fn, scheduler)
    settings = TLoRAConfig.read(config)
    check_adapter_name(adapter_name)
    (name, denoiser), *others = candidate_denoisers(target, component).items()
    if others:
        names = [name] + [other for other, _ in others]
        raise TLoRAError(f"This pipeline has several denoisers ({', '.join(names)}); say which: component=...")
    preset = preset_for(denoiser, settings.preset)
    check_overrides(preset, settings.schedule.max_rank)
    options = hook_options(denoiser, adapter_name, mode, timestep_fn, scheduler)
    if options.timestep_fn is None:  # an unknown class fails before the work
        plan_timestep_reading(name, denoiser, target if is_pipeline(target) else None)
    built: list[LoadRecord] = []

    def build() -> LoadRecord:
        """Runs once the hooks and the adapter it replaces are off the denoiser: the SVD reads the model's own
        weights, and the preset never sees the other adapters' modules."""
        with adapters_hidden(denoiser):
            network = build_network(denoiser, settings, preset, ProgressBars.of(target))
        built.append(LoadRecord(
            network=network, path=None, format="created", schedule=settings.schedule, adapter_name=adapter_name,
            config=settings.metadata(preset),
        ))
        return built[-1]

    match = Match(component=name, denoiser=denoiser, layers={}, unmatched=[])
    swap_adapter(target, match, adapter_name, build, options, "create_tlora")
    network = built[-1].network
    logger.info(
        "Created a T-LoRA on %s: %d modules, rank %d, min_rank %d, alpha %s, linear_alpha %s",
        name, len(network.loras), settings.schedule.max_rank, settings.schedule.min_rank, settings.schedule.alpha,
        settings.linear_alpha,
    )
    return network


@torch.no_grad()
def build_network(
    denoiser: nn.Module, settings: TLoRAConfig, preset: dict, progress: ProgressBars
) -> LycorisNetwork:
    """LyCORIS's network for the config and preset, on each layer's device, initialised as LyCORIS initialises it;
    `progress` is the target pipeline's bar settings, which the SVD's bar follows."""
    from lycoris import create_lycoris
    from lycoris.wrapper import network_module_dict

    from .tlora_module import TLoraModuleWithoutSvd

    network_module_dict.setdefault(BATCHED_ALGO, TLoraModuleWithoutSvd)
    with lycoris_preset(batched_preset(preset)):
        network = create_lycoris(
            denoiser, settings.multiplier, settings.schedule.max_rank, settings.linear_alpha,
            warn_on_unmatched=False, **{**settings.lycoris_kwargs, "algo": BATCHED_ALGO},
        )
        network.loras = _runnable(network.loras)
        report_matches(network, denoiser, preset)
    offloaded = [m.lora_name for m in network.loras if m.org_module[0].weight.device.type == "meta"]
    if offloaded:
        raise TLoRAError(
            f"The weights of {offloaded[:EXAMPLES]} are not loaded (meta device: offloading?). "
            "Create the T-LoRA before enabling offloading."
        )
    for module in network.loras:
        module.to(module.org_module[0].weight.device)
    batched = [module for module in network.loras if module.base_from_weights]
    if batched:
        rebuild_base_terms(batched, progress=progress)
        for module in batched:
            module.q_layer.weight.copy_(module.base_q)
            module.p_layer.weight.copy_(module.base_p)
            module.lambda_layer.copy_(module.base_lambda)
    return network


def check_overrides(preset: dict, rank: int) -> None:
    """Per-module overrides may not ask for another algorithm or rank: one rank schedule masks every module."""
    for key in ALGO_MAPS:
        for target, override in (preset.get(key) or {}).items():
            override = override or {}
            if override.get("algo", "tlora") != "tlora":
                raise TLoRAError(
                    f"apply_preset.{key}[{target!r}] asks for algo {override['algo']!r}; create_tlora builds T-LoRA "
                    "modules only (one rank schedule masks them all)."
                )
            if override.get("dim", rank) != rank:
                raise TLoRAError(
                    f"apply_preset.{key}[{target!r}] sets dim={override['dim']}, but linear_dim is {rank}: one rank "
                    "schedule masks every module of a T-LoRA, so they share one rank."
                )


def batched_preset(preset: dict) -> dict:
    """A copy of the preset whose per-module overrides build `BATCHED_ALGO` modules where they name "tlora"."""
    preset = json.loads(json.dumps(preset))
    for key in ALGO_MAPS:
        for override in (preset.get(key) or {}).values():
            if override and "algo" in override:
                override["algo"] = BATCHED_ALGO
    return preset


def _runnable(modules: list) -> list:
    """Drop modules LyCORIS builds on convolutions larger than 1x1, whose T-LoRA forward cannot run."""
    kept, dropped = [], []
    for module in modules:
        layer = module.org_module[0]
        wide = isinstance(layer, nn.modules.conv._ConvNd) and (
            any(size != 1 for size in layer.kernel_size) or layer.groups != 1
        )
        (dropped if wide else kept).append(module)
    if dropped:
        logger.warning(
            "Skipped %d convolutions larger than 1x1 or grouped (e.g. %s): LyCORIS's T-LoRA forward runs on Linear "
            "layers and 1x1 convolutions only.", len(dropped), [m.lora_name for m in dropped[:EXAMPLES]],
        )
    return kept


def _load(config: str | os.PathLike | dict) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)):
        raise TLoRAError(f"config must be a LyCORIS config dict or the path of its JSON file, got {config!r}.")
    try:
        with open(config, encoding="utf-8") as file:
            raw = json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"No LyCORIS config at {config}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TLoRAError(f"{config} is not a JSON LyCORIS config: {error}.") from None
    if not isinstance(raw, dict):
        raise TLoRAError(f"{config} holds {type(raw).__name__}, not a JSON object.")
    return raw
