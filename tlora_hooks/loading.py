"""`load_tlora` / `unload_tlora` / `delete_tlora_adapters`: T-LoRA files onto a stock pipeline as LyCORIS modules,
masked by the hooks, one adapter or several.

Every format becomes LyCORIS `TLoraModule`s applied with LyCORIS's own `apply_to()` (never merged), so the masked
forward is LyCORIS's and `enable_tlora` finds them. The modules are built without the SVD and `gc.collect()` that
`TLoraModule.__init__` runs; base terms come from the file or from one batched rebuild (`rebuild.py`). Each adapter
has a name: loading a new name adds an adapter to the denoiser, loading a name it holds replaces that adapter only.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .api import check_hook_options, hook_denoisers
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
from .records import HookOptions, LoadedAdapters, LoadRecord, loaded_adapters, set_loaded_adapters
from .schedule import RankSchedule

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

    from .tlora_module import TLoraModuleWithoutSvd

logger = get_logger(__name__)


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
    adapter_name: str = "default",
    strict: bool = False,
    mode: str | None = None,
    component: str | None = None,
    timestep_fn: Any = None,
    scheduler: Any = None,
    cache_base: CacheArgument = False,
) -> TLoRAHandle:
    """Load a T-LoRA file onto a pipeline (or a bare denoiser) and mask it by timestep on every denoiser call.

    The file becomes LyCORIS T-LoRA modules applied (never merged) to the matching layers (on PEFT's base layer where
    a PEFT LoRA wraps one), then the hooks mask the denoiser. A new `adapter_name` adds an adapter beside the ones
    the denoiser holds, each masked by its own schedule; a name it holds replaces that adapter only, so loading again
    without names replaces the file. A failed call changes nothing. `with load_tlora(...):` unloads this adapter at
    the end of the block. Slow steps show progress bars, which `pipe.set_progress_bar_config(disable=True)` and
    huggingface_hub's `disable_progress_bars()` silence.

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
        multiplier: LyCORIS's `multiplier`, built into the modules (`set_tlora_adapters` sets a strength on top).
        adapter_name: The adapter's name on the denoiser (`denoiser.tlora[adapter_name]`), as in diffusers'
            `load_lora_weights`.
        strict: Make any key that matches no layer an error (default: skipped with a warning).
        mode: The masked forward's mode, as in `enable_tlora`, for every adapter of the denoiser (one mode runs them
            all). Default: the mode its other adapters run, else `"auto"`.
        component: The pipeline attribute to load into, where several denoisers fit (Wan 2.2's two experts).
        timestep_fn: As in `enable_tlora`, for every adapter of the denoiser; default: the one its other adapters
            use, else none.
        scheduler: As in `enable_tlora`, likewise.
        cache_base: Keep the base terms rebuilt from the model's weights (LyCORIS files save none), keyed by the
            file's and the weights' hashes, so the next load of the same file onto the same weights reads them
            instead of rebuilding: True puts the cache beside the file, a path in that folder. Off by default: the
            file's folder may be read-only or shared. A cache that cannot be read or written warns and rebuilds.

    Returns:
        The denoiser's `TLoRAHandle`; `unload_tlora(target)` removes every adapter and the hooks,
        `delete_tlora_adapters(target, adapter_name)` this one. The adapter is loaded frozen (`requires_grad=False`),
        for inference; `denoiser.tlora[adapter_name].requires_grad_(True)` trains it further.
    """
    check_adapter_name(adapter_name)
    if mode is not None:
        check_mode(mode)
    check_hook_options(timestep_fn, scheduler)
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
    pipeline = target if is_pipeline(target) else None
    options = hook_options(match.denoiser, adapter_name, mode, timestep_fn, scheduler)
    if options.timestep_fn is None:
        plan_timestep_reading(match.component, match.denoiser, pipeline)  # an unknown class fails before the work
    cache = cache_folder(cache_base, tlora_file.path)

    def build() -> LoadRecord:
        return LoadRecord(
            network=_build_network(match, tlora_file, multiplier, cache, progress),
            path=tlora_file.path,
            format=tlora_file.format,
            schedule=schedule,
            adapter_name=adapter_name,
            config=training_config(tlora_file.metadata),
        )

    handle = swap_adapter(target, match, adapter_name, build, options, "load_tlora")
    logger.info(
        "Loaded %s (%s) onto %s as adapter %r: %d modules, rank %d, min_rank %d, alpha %s, multiplier %s",
        tlora_file.path, tlora_file.format, match.component, adapter_name, len(match.layers),
        schedule.max_rank, schedule.min_rank, schedule.alpha, multiplier,
    )
    return handle


def unload_tlora(target: Any) -> None:
    """Remove what `load_tlora` or `create_tlora` put on a pipeline or denoiser (every adapter's modules, their
    registration under the denoiser, and hooks); a no-op where nothing is loaded.

    The layers get their own forwards back, and the denoiser its module tree and state dict, exactly as before.
    `delete_tlora_adapters` removes some adapters only.

    Args:
        target: The pipeline, or the denoiser, `load_tlora` or `create_tlora` was called on.
    """
    for denoiser in components_of(target).values():
        loaded = loaded_adapters(denoiser)
        if loaded is not None:
            _remove_all(denoiser, loaded)


def delete_tlora_adapters(target: Any, adapter_names: str | list[str]) -> None:
    """Remove the named adapters that `load_tlora` or `create_tlora` put on a pipeline or denoiser, as diffusers'
    `delete_adapters` removes LoRAs; the other adapters stay, masked as before.

    A denoiser left with no adapter gets back its forwards, module tree and state dict exactly as they were before any
    load. Names that no denoiser holds raise TLoRAError and change nothing.

    Args:
        target: The pipeline, or the denoiser, they were loaded on.
        adapter_names: One adapter name or several.
    """
    names = adapter_name_list(adapter_names, "delete_tlora_adapters")
    components = components_of(target)
    held = {name: loaded for name, denoiser in components.items() if (loaded := loaded_adapters(denoiser))}
    unknown = [name for name in names if not any(name in loaded.records for loaded in held.values())]
    if unknown:
        raise TLoRAError(
            f"delete_tlora_adapters: no adapter named {', '.join(map(repr, unknown))}; loaded adapters: "
            f"{_listing(held)}. (Modules applied by hand are removed with LyCORIS's `network.restore()`.)"
        )
    touched = [name for name, loaded in held.items() if set(names) & set(loaded.records)]
    refuse_inside_open_block([components[name] for name in touched], "delete_tlora_adapters")
    for component in touched:
        deleted = [name for name in names if name in held[component].records]
        _delete(target, component, components[component], deleted)
        logger.info("Deleted the T-LoRA adapters %s of %s", deleted, component)


def check_adapter_name(adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise TLoRAError(f"adapter_name must be a non-empty name without dots, got {adapter_name!r}.")


def adapter_name_list(adapter_names: Any, verb: str) -> list[str]:
    """One name or several, as diffusers' adapter verbs take them; each a string, none twice."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TLoRAError(f"{verb}: adapter_names must be a name or a list of names, got {adapter_names!r}.")
    if len(set(names)) != len(names):
        raise TLoRAError(f"{verb}: adapter_names names an adapter twice: {list(names)}.")
    return list(names)


def _listing(held: dict[str, LoadedAdapters]) -> str:
    return "; ".join(f"{name}: {', '.join(map(repr, loaded.records))}" for name, loaded in held.items()) or "none"


def hook_options(
    denoiser: nn.Module, adapter_name: str, mode: str | None, timestep_fn: Any, scheduler: Any
) -> HookOptions:
    """The options a load or create installs the hooks with: those given, else those the denoiser's other adapters
    run with (a load that leaves no other adapter starts from the defaults, as a first load does)."""
    loaded = loaded_adapters(denoiser)
    others = loaded is not None and any(name != adapter_name for name in loaded.records)
    current = loaded.options if others else HookOptions()
    return HookOptions(
        mode=current.mode if mode is None else mode,
        timestep_fn=current.timestep_fn if timestep_fn is None else timestep_fn,
        scheduler=current.scheduler if scheduler is None else scheduler,
    )


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
    """Stacking on T-LoRA modules applied by hand would mask them with an adapter's schedule they were not trained
    with."""
    loaded = loaded_adapters(match.denoiser)
    records = loaded.records.values() if loaded is not None else ()
    ours = {id(lora) for record in records for lora in record.network.loras}
    foreign = [module for module in applied_tlora_modules(match.denoiser) if id(module) not in ours]
    if foreign:
        raise TLoRAError(
            f"{match.component} already holds {len(foreign)} T-LoRA modules that load_tlora or create_tlora did not "
            "put there. Remove them first (`network.restore()` on the LyCORIS network that applied them), then load "
            "the file."
        )


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


def swap_adapter(
    target: Any, match: Match, adapter_name: str, build: Callable[[], LoadRecord], options: HookOptions, verb: str
) -> TLoRAHandle:
    """Add the adapter `build()` makes to the denoiser, replacing the one of that name, and hook every adapter.

    The denoiser's hooks come off first and the replaced adapter's modules with them, so `build()` sees the model's
    own weights (the fold keeps a delta in them between calls). On any failure the denoiser is put back exactly as
    it was: its adapters, their modules and their hooks. `verb` (`load_tlora`, `create_tlora`) names the call in
    errors.
    """
    _refuse_foreign_modules(match)
    # Here, before the hooks come off: afterwards no open block's hooks are left to see.
    refuse_inside_open_block([match.denoiser], verb)
    denoiser = match.denoiser
    previous = loaded_adapters(denoiser)
    replaced = previous.records.get(adapter_name) if previous is not None else None
    others = previous.without(adapter_name).records if previous is not None else {}
    hook = installed_hook(denoiser)
    if hook is not None:
        hook.remove()
    if replaced is not None:
        replaced.detach(denoiser)
    record = None
    try:
        record = build()
        record.attach(denoiser, others.values())
        loaded = LoadedAdapters({**(previous.records if previous is not None else {}), adapter_name: record}, options)
        set_loaded_adapters(denoiser, loaded)
        handle = _enable(target, match.component, denoiser, loaded)
    except BaseException:
        if record is not None and record.original_forwards:  # its attach began
            record.detach(denoiser)
        if replaced is not None:
            replaced.attach(denoiser, others.values())
        set_loaded_adapters(denoiser, previous)
        if previous is not None and hook is not None:
            _enable(target, match.component, denoiser, previous)
        raise
    handle.add_exit_action(_unloader(target, match.component, denoiser, record))
    return handle


def _unloader(target: Any, component: str, denoiser: nn.Module, record: LoadRecord) -> Callable[[], None]:
    """What ends `with load_tlora(...)`: unload this adapter, unless something replaced or unloaded it since; the
    denoiser's other adapters get their hooks back. Left applied without hooks, the modules would run every rank at
    every step."""
    target_ref, denoiser_ref = weakref.ref(target), weakref.ref(denoiser)

    def unload() -> None:
        denoiser = denoiser_ref()
        loaded = loaded_adapters(denoiser) if denoiser is not None else None
        if loaded is not None and loaded.records.get(record.adapter_name) is record:
            # the block's exit removed the hooks just before: the other adapters get theirs back
            _delete(target_ref() or denoiser, component, denoiser, [record.adapter_name], rehook=True)

    return unload


def _enable(target: Any, component: str, denoiser: nn.Module, loaded: LoadedAdapters) -> TLoRAHandle:
    """Hook the denoiser with every loaded adapter, each masked by its own schedule, all in one mode."""
    options = loaded.options
    return hook_denoisers(
        target, {component: (denoiser, [record.hooked() for record in loaded.records.values()])},
        mode=options.mode, timestep_fn=options.timestep_fn, scheduler=options.scheduler, replace_all=False,
    )


def _delete(
    target: Any, component: str, denoiser: nn.Module, adapter_names: list[str], rehook: bool | None = None
) -> None:
    """Detach the named adapters (LyCORIS unchains a wrapper from anywhere in a layer's chain); the others are
    hooked again if `rehook` (default: if they were hooked)."""
    loaded = loaded_adapters(denoiser)
    hook = installed_hook(denoiser)
    if hook is not None:
        hook.remove()
    rehook = hook is not None if rehook is None else rehook
    remaining = loaded
    for name in reversed(list(loaded.records)):
        if name in adapter_names:
            loaded.records[name].detach(denoiser)
            remaining = remaining.without(name)
    set_loaded_adapters(denoiser, remaining)
    if rehook and remaining.records:
        _enable(target, component, denoiser, remaining)


def _remove_all(denoiser: nn.Module, loaded: LoadedAdapters) -> None:
    """Unhook the denoiser and detach every loaded adapter, the last applied first."""
    hook = installed_hook(denoiser)
    if hook is not None:
        hook.remove()
    for record in reversed(list(loaded.records.values())):
        record.detach(denoiser)
    set_loaded_adapters(denoiser, None)
