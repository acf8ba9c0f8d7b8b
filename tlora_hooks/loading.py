"""`load_tlora` / `unload_tlora`: a T-LoRA file onto a stock pipeline as LyCORIS modules, masked by the hooks.

Every format becomes LyCORIS `TLoraModule`s applied with LyCORIS's own `apply_to()` (never merged), so the masked
forward is LyCORIS's and `enable_tlora` finds them. The modules are built without the SVD and `gc.collect()` that
`TLoraModule.__init__` runs; base terms come from the file or from one batched rebuild (`rebuild.py`).
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .api import enable_tlora
from .base_cache import CacheArgument, cache_folder, check_cache_argument, fill_base_terms
from .conventions import plan_timestep_reading
from .discovery import applied_tlora_modules, components_of, is_pipeline, peft_base_layer
from .errors import TLoRAError
from .formats import FileSource, ModuleWeights, TLoraFile, check_one_rank, read_tlora_file
from .formats.lycoris import training_config
from .hooks import TLoRAHandle, installed_hook, refuse_inside_open_block
from .logging import get_logger
from .matching import Match, match_file
from .modes import check_mode
from .progress import ProgressBars
from .registration import register_network, unregister_network
from .schedule import RankSchedule

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

    from .tlora_module import TLoraModuleWithoutSvd

logger = get_logger(__name__)

LOAD_RECORD_ATTRIBUTE = "_tlora_hooks_loaded"
# The record of a network made by load_tlora or create_tlora, on the network itself, for save_tlora.
NETWORK_RECORD_ATTRIBUTE = "_tlora_hooks_record"


@dataclass
class LoadRecord:
    """What `load_tlora` (or `create_tlora`) put on one denoiser, kept on it so `unload_tlora` can undo exactly that.

    `path` is None for a network `create_tlora` made; `config` is the LyCORIS config `save_tlora` writes.
    """

    network: LycorisNetwork
    path: str | None
    format: str
    enable_kwargs: dict[str, Any]
    adapter_name: str = "default"
    config: dict[str, Any] = field(default_factory=dict)
    # layer -> its own instance `forward` before LyCORIS wrapped it (None: it had none, the class's ran).
    original_forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.network.__dict__[NETWORK_RECORD_ATTRIBUTE] = self

    def attach(self, denoiser: nn.Module) -> None:
        """LyCORIS's `apply_to()`, and the network registered under the denoiser (`registration.py`)."""
        self.original_forwards = [
            (lora.org_module[0], lora.org_module[0].__dict__.get("forward")) for lora in self.network.loras
        ]
        self.network.apply_to()
        register_network(denoiser, self.adapter_name, self.network)

    def detach(self, denoiser: nn.Module) -> None:
        """LyCORIS's `restore()`, then the layers' own attributes and the denoiser's module tree as they were."""
        unregister_network(denoiser, self.adapter_name)
        self.network.restore()
        for layer, forward in self.original_forwards:
            if "_lycoris_wrappers" in layer.__dict__:
                continue  # another LyCORIS network still wraps it; its restore() finishes the job
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = forward


def load_tlora(
    target: Any,
    path: str | os.PathLike,
    *,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    min_rank: int | None = None,
    alpha: float | None = None,
    multiplier: float = 1.0,
    strict: bool = False,
    mode: str = "auto",
    component: str | None = None,
    timestep_fn: Any = None,
    scheduler: Any = None,
    cache_base: CacheArgument = False,
) -> TLoRAHandle:
    """Load a T-LoRA file onto a pipeline (or a bare denoiser) and mask it by timestep on every denoiser call.

    The file becomes LyCORIS T-LoRA modules applied (never merged) to the matching layers (on PEFT's base layer where
    a PEFT LoRA wraps one), then `enable_tlora` hooks the denoiser. Loading again replaces what was loaded on that
    denoiser; a failed call changes nothing. `with load_tlora(...):` unloads at the end of the block. Slow steps
    show progress bars, which `pipe.set_progress_bar_config(disable=True)` and huggingface_hub's
    `disable_progress_bars()` silence.

    Args:
        target: A Diffusers pipeline (a `DiffusionPipeline` or a Modular Diffusers `ModularPipeline`), or a bare
            denoiser `nn.Module`.
        path: A `.safetensors` file or a torch checkpoint (the official FLUX `lora.pt`), a folder holding one (a
            trainer's checkpoint folder), or a Hugging Face Hub repo id (`"user/repo"`), resolved as
            `load_lora_weights` resolves it. The layout, LyCORIS/SimpleTuner's `algo="tlora"` or the official
            ControlGenAI processors, is detected from the keys; its tensors give the rank.
        weight_name: The file's name in the folder or repo. Default: its only T-LoRA file (`.safetensors` files
            whose keys are T-LoRA keys, or `lora.pt`); several are an error naming them. Offline, a repo's files
            cannot be listed, so a repo id needs it.
        subfolder: The folder inside the folder or repo that holds the file.
        revision: The repo's branch, tag or commit (default: main).
        cache_dir: The Hub cache folder (default: huggingface_hub's, `HF_HUB_CACHE`).
        token: A Hub token for private or gated repos (default: `HF_TOKEN` or the saved login).
        local_files_only: Use the Hub cache only, never the network (as `HF_HUB_OFFLINE=1` does).
        min_rank: The `tlora_min_rank` it was trained with; default: SimpleTuner's metadata in the file, else 1
            with a warning (the file does not say).
        alpha: The `tlora_alpha` it was trained with; default: the file's metadata, else 1.0 with a warning.
        multiplier: The adapter strength, as LyCORIS's `multiplier`.
        strict: Make any key that matches no layer an error (default: skipped with a warning).
        mode: The masked forward's mode, as in `enable_tlora`.
        component: The pipeline attribute to load into, where several denoisers fit (Wan 2.2's two experts).
        timestep_fn: As in `enable_tlora`.
        scheduler: As in `enable_tlora`.
        cache_base: Keep the base terms rebuilt from the model's weights (LyCORIS files save none), keyed by the
            file's and the weights' hashes, so the next load of the same file onto the same weights reads them
            instead of rebuilding: True puts the cache beside the file, a path in that folder. Off by default: the
            file's folder may be read-only or shared. A cache that cannot be read or written warns and rebuilds.

    Returns:
        `enable_tlora`'s `TLoRAHandle`; `unload_tlora(target)` removes the modules and the hooks. The adapter is
        loaded frozen (`requires_grad=False`), for inference; `denoiser.tlora["default"].requires_grad_(True)`
        trains it further.
    """
    check_mode(mode)
    check_cache_argument(cache_base)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise TLoRAError(
            f"multiplier must be a finite number (the adapter strength, default 1.0), got {multiplier!r}."
        )
    source = FileSource(weight_name, subfolder, revision, cache_dir, token, local_files_only)
    progress = ProgressBars.of(target)
    tlora_file = read_tlora_file(path, source, progress)
    schedule = _schedule(tlora_file, check_one_rank(tlora_file), min_rank, alpha)
    match = match_file(target, tlora_file, component, strict)
    if tlora_file.unused_keys:
        logger.info(
            "%s: skipped %d keys its trainer built but never used in its forward (e.g. %s)",
            tlora_file.path, len(tlora_file.unused_keys), tlora_file.unused_keys[0],
        )
    _refuse_foreign_modules(match)
    refuse_inside_open_block([match.denoiser], "load_tlora")
    pipeline = target if is_pipeline(target) else None
    if timestep_fn is None:
        plan_timestep_reading(match.component, match.denoiser, pipeline)  # an unknown class fails before the work
    record = LoadRecord(
        network=_build_on_pristine_weights(
            target, match, tlora_file, multiplier, cache_folder(cache_base, tlora_file.path), progress
        ),
        path=tlora_file.path,
        format=tlora_file.format,
        config=training_config(tlora_file.metadata),
        enable_kwargs=dict(
            max_rank=schedule.max_rank, min_rank=schedule.min_rank, alpha=schedule.alpha, mode=mode,
            timestep_fn=timestep_fn, scheduler=scheduler,
        ),
    )
    handle = _swap_in(target, match, record)
    logger.info(
        "Loaded %s (%s) onto %s: %d modules, rank %d, min_rank %d, alpha %s, multiplier %s",
        tlora_file.path, tlora_file.format, match.component, len(match.layers),
        schedule.max_rank, schedule.min_rank, schedule.alpha, multiplier,
    )
    return handle


def unload_tlora(target: Any) -> None:
    """Remove what `load_tlora` or `create_tlora` put on a pipeline or denoiser (modules, their registration under
    the denoiser, and hooks); a no-op where nothing is loaded.

    The layers get their own forwards back, and the denoiser its module tree and state dict, exactly as before.

    Args:
        target: The pipeline, or the denoiser, `load_tlora` or `create_tlora` was called on.
    """
    for denoiser in components_of(target).values():
        record = denoiser.__dict__.get(LOAD_RECORD_ATTRIBUTE)
        if record is not None:
            _remove(denoiser, record)


def _schedule(tlora_file: TLoraFile, rank: int, min_rank: int | None, alpha: float | None) -> RankSchedule:
    """Explicit arguments, else the file's metadata, else the defaults (1, 1.0), warning that the file was silent.

    A value the metadata records but in an unusable form is an error unless an argument overrides it: falling back
    to a default would run another schedule than the one trained.
    """
    settings = tlora_file.settings
    chosen = {}
    silent = []
    for label, passed, recorded, default in (
        ("min_rank", min_rank, settings.min_rank, 1), ("alpha", alpha, settings.alpha, 1.0),
    ):
        problem = settings.invalid.get(label)
        if passed is not None:
            if problem is not None or (recorded is not None and recorded != passed):
                logger.info("%s=%s overrides the file's %s", label, passed, problem or recorded)
            chosen[label] = passed
        elif problem is not None:
            raise TLoRAError(
                f"{tlora_file.path}: {problem}. Pass {label}= with the value it was trained with "
                f"(tlora_{label}), which overrides the metadata."
            )
        elif recorded is not None:
            chosen[label] = recorded
        else:
            chosen[label] = default
            silent.append(f"tlora_{label} (using {default})")
    if silent:
        logger.warning(
            "%s does not record %s; pass min_rank= and alpha= with the values it was trained with "
            "(`tlora-hooks convert` can store them in the file).", tlora_file.path, " or ".join(silent),
        )
    if "linear_dim" in settings.invalid:
        logger.warning("%s: %s; the tensors' rank %d is used.", tlora_file.path, settings.invalid["linear_dim"], rank)
    elif settings.linear_dim is not None and settings.linear_dim != rank:
        logger.warning("%s: metadata says linear_dim=%s but the tensors have rank %d; using %d.",
                       tlora_file.path, settings.linear_dim, rank, rank)
    return RankSchedule(max_rank=rank, min_rank=chosen["min_rank"], alpha=chosen["alpha"])


def _refuse_foreign_modules(match: Match) -> None:
    """Stacking on T-LoRA modules applied by hand would put two adapters under one mask group."""
    record = match.denoiser.__dict__.get(LOAD_RECORD_ATTRIBUTE)
    ours = {id(lora) for lora in record.network.loras} if record is not None else set()
    foreign = [module for module in applied_tlora_modules(match.denoiser) if id(module) not in ours]
    if foreign:
        raise TLoRAError(
            f"{match.component} already holds {len(foreign)} T-LoRA modules that load_tlora or create_tlora did not "
            "put there. Remove them first (`network.restore()` on the LyCORIS network that applied them), then load "
            "the file."
        )


def _build_on_pristine_weights(
    target: Any, match: Match, tlora_file: TLoraFile, multiplier: float, cache: str | None, progress: ProgressBars
) -> LycorisNetwork:
    """Build with the hooks of an earlier load removed: the fold mode keeps that adapter's delta in the weights
    between calls, and the base rebuild must see the model's own weights. On failure the earlier hooks come back."""
    previous = match.denoiser.__dict__.get(LOAD_RECORD_ATTRIBUTE)
    hook = installed_hook(match.denoiser)
    if hook is not None:
        hook.remove()
    try:
        return _build_network(match, tlora_file, multiplier, cache, progress)
    except BaseException:
        if hook is not None and previous is not None:
            _enable(target, match.component, previous)
        raise


@torch.no_grad()
def _build_network(
    match: Match, tlora_file: TLoraFile, multiplier: float, cache: str | None, progress: ProgressBars
) -> LycorisNetwork:
    """LyCORIS modules for the matched layers, filled from the file, on each layer's device, in fp32 like LyCORIS's.
    Base terms the file lacks are rebuilt, or read from the cache folder `cache`."""
    from lycoris import LycorisNetwork

    network = LycorisNetwork(match.denoiser, init_only=True)
    network.multiplier = multiplier
    to_rebuild = []
    for key, layer in progress(match.layers.items(), total=len(match.layers), desc="Building T-LoRA modules"):
        weights = tlora_file.modules[key]
        module = _allocate(key, layer, weights, multiplier)
        _fill(module, weights)
        module.requires_grad_(False)  # an inference adapter: `network.requires_grad_(True)` trains it further
        if weights.base is None:
            to_rebuild.append(module)
        network.loras.append(module)
    if to_rebuild:
        fill_base_terms(to_rebuild, tlora_file.path, cache, progress)
    return network


def _allocate(key: str, layer: nn.Module, weights: ModuleWeights, multiplier: float) -> TLoraModuleWithoutSvd:
    """Built on the meta device, then given uninitialised memory: nothing is computed that the file overwrites.

    On a layer a PEFT LoRA wraps, the module goes on PEFT's base layer, where LyCORIS puts it. It is built from the
    base layer itself: given the PEFT layer, LyCORIS would keep it as a child module (`peft_wrapper`), and
    `to_empty` would then wipe the PEFT LoRA's and the base layer's weights.
    """
    from .tlora_module import TLoraModuleWithoutSvd

    layer = peft_base_layer(layer) or layer
    with torch.device("meta"):
        module = TLoraModuleWithoutSvd(key, layer, multiplier=multiplier, lora_dim=weights.rank, alpha=weights.alpha)
    return module.to_empty(device=layer.weight.device)


def _fill(module: TLoraModuleWithoutSvd, weights: ModuleWeights) -> None:
    module.q_layer.weight.copy_(weights.q.reshape(module.q_layer.weight.shape))
    module.p_layer.weight.copy_(weights.p.reshape(module.p_layer.weight.shape))
    module.lambda_layer.copy_(weights.lam.reshape(module.lambda_layer.shape))
    module.alpha.fill_(weights.alpha)
    module.dtype_tensor.zero_()
    module.base_from_weights = weights.base is None
    if weights.base is not None:
        module.base_q.copy_(weights.base.q.reshape(module.base_q.shape))
        module.base_p.copy_(weights.base.p.reshape(module.base_p.shape))
        module.base_lambda.copy_(weights.base.lam.reshape(module.base_lambda.shape))


def _swap_in(target: Any, match: Match, record: LoadRecord) -> TLoRAHandle:
    """Replace what was loaded on this denoiser; on any failure put the previous state back."""
    denoiser = match.denoiser
    previous = denoiser.__dict__.get(LOAD_RECORD_ATTRIBUTE)
    if previous is not None:
        _remove(denoiser, previous)
    record.attach(denoiser)
    try:
        handle = _enable(target, match.component, record)
    except BaseException:
        record.detach(denoiser)
        if previous is not None:
            previous.attach(denoiser)
            _enable(target, match.component, previous)
            denoiser.__dict__[LOAD_RECORD_ATTRIBUTE] = previous
        raise
    denoiser.__dict__[LOAD_RECORD_ATTRIBUTE] = record
    handle.add_exit_action(_unloader(denoiser, record))
    return handle


def _unloader(denoiser: nn.Module, record: LoadRecord) -> Callable[[], None]:
    """What ends `with load_tlora(...)`: unload the file, unless something replaced or unloaded it since. Left
    applied without its hooks, the modules would run every rank at every step."""
    denoiser_ref = weakref.ref(denoiser)

    def unload() -> None:
        denoiser = denoiser_ref()
        if denoiser is not None and denoiser.__dict__.get(LOAD_RECORD_ATTRIBUTE) is record:
            _remove(denoiser, record)

    return unload


def replace_adapter(target: Any, match: Match, build: Callable[[], LoadRecord]) -> TLoRAHandle:
    """Take what is loaded off the denoiser (hooks and modules), `build()` a record on the model alone, apply it and
    enable its hooks; on any failure put the previous adapter back exactly as it was."""
    _refuse_foreign_modules(match)
    denoiser = match.denoiser
    previous = denoiser.__dict__.get(LOAD_RECORD_ATTRIBUTE)
    if previous is not None:
        _remove(denoiser, previous)
    try:
        return _swap_in(target, match, build())
    except BaseException:
        if previous is not None and denoiser.__dict__.get(LOAD_RECORD_ATTRIBUTE) is None:
            previous.attach(denoiser)
            _enable(target, match.component, previous)
            denoiser.__dict__[LOAD_RECORD_ATTRIBUTE] = previous
        raise


def _enable(target: Any, component: str, record: LoadRecord) -> TLoRAHandle:
    components = {"components": [component]} if is_pipeline(target) else {}
    return enable_tlora(target, **record.enable_kwargs, **components)


def _remove(denoiser: nn.Module, record: LoadRecord) -> None:
    hook = installed_hook(denoiser)
    if hook is not None:
        hook.remove()
    record.detach(denoiser)
    denoiser.__dict__.pop(LOAD_RECORD_ATTRIBUTE, None)
