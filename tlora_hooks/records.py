"""What `load_tlora` and `create_tlora` put on a denoiser, kept on it so that the other verbs undo exactly that: each
adapter's record (its LyCORIS network, schedule and settings, and how its layers were before), by adapter name in load
order, and the options the denoiser's hooks share (mode, timestep_fn, scheduler).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from torch import nn

from .hooks import AdapterSettings, HookedAdapter, next_mask_group
from .logging import get_logger
from .registration import register_network, unregister_network
from .schedule import RankSchedule

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

logger = get_logger(__name__)

LOADED_ATTRIBUTE = "_tlora_hooks_loaded"
# The record of a network made by load_tlora or create_tlora, on the network itself, for save_tlora.
NETWORK_RECORD_ATTRIBUTE = "_tlora_hooks_record"


@dataclass
class LoadRecord:
    """One adapter `load_tlora` (or `create_tlora`) put on a denoiser.

    `path` is None for a network `create_tlora` made; `config` is the LyCORIS config `save_tlora` writes. The
    adapter keeps its LyCORIS mask group while it is loaded, however often the denoiser is hooked again (another
    adapter's load or delete, a failed load put back).
    """

    network: LycorisNetwork
    path: str | None
    format: str
    schedule: RankSchedule
    adapter_name: str = "default"
    config: dict[str, Any] = field(default_factory=dict)
    settings: AdapterSettings = field(default_factory=AdapterSettings)
    group_id: int = field(default_factory=next_mask_group)
    # layer -> its own instance `forward` before any LyCORIS wrapper (None: it had none, the class's ran).
    original_forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.network.__dict__[NETWORK_RECORD_ATTRIBUTE] = self

    def attach(self, denoiser: nn.Module, others: Iterable[LoadRecord] = ()) -> None:
        """LyCORIS's `apply_to()`, and the network registered under the denoiser (`registration.py`).

        On a layer another adapter (`others`) already wraps, LyCORIS chains this one outside it; the layer's own
        forward is then the one that adapter recorded.
        """
        recorded = {id(layer): forward for other in others for layer, forward in other.original_forwards}
        self.original_forwards = []
        for lora in self.network.loras:
            layer = lora.org_module[0]
            wrapped = "_lycoris_wrappers" in layer.__dict__ and id(layer) in recorded
            self.original_forwards.append(
                (layer, recorded[id(layer)] if wrapped else layer.__dict__.get("forward"))
            )
        type(self.network).apply_to(self.network)
        register_network(denoiser, self.adapter_name, self.network)
        # LyCORIS scripts call `network.apply_to()` after creating it; again, it would chain each module to itself.
        self.network.__dict__["apply_to"] = functools.partial(already_applied, self.adapter_name)

    def detach(self, denoiser: nn.Module) -> None:
        """LyCORIS's `restore()`, then the layers' own attributes and the denoiser's module tree as they were."""
        unregister_network(denoiser, self.adapter_name)
        self.network.__dict__.pop("apply_to", None)
        self.network.restore()
        for layer, forward in self.original_forwards:
            if "_lycoris_wrappers" in layer.__dict__:
                continue  # another adapter still wraps it; its detach finishes the job
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = forward

    def hooked(self) -> HookedAdapter:
        """The adapter as the hooks run it, sharing this record's settings."""
        return HookedAdapter(self.adapter_name, list(self.network.loras), self.schedule, self.settings, self.group_id)


def already_applied(adapter_name: str) -> None:
    """`apply_to()` of a network that `create_tlora` or `load_tlora` applied: nothing to do."""
    logger.info("network.apply_to(): T-LoRA adapter %r is applied and masked already; nothing to do.", adapter_name)


@dataclass(frozen=True)
class HookOptions:
    """What one denoiser's hooks share across its adapters: `enable_tlora`'s `mode`, `timestep_fn` and `scheduler`."""

    mode: str = "auto"
    timestep_fn: Any = None
    scheduler: Any = None


@dataclass(frozen=True)
class LoadedAdapters:
    """Every adapter loaded or created on one denoiser, by name in load order, and the options of its hooks."""

    records: dict[str, LoadRecord]
    options: HookOptions = HookOptions()

    def without(self, adapter_name: str) -> LoadedAdapters:
        return LoadedAdapters({name: r for name, r in self.records.items() if name != adapter_name}, self.options)


def loaded_adapters(denoiser: nn.Module) -> LoadedAdapters | None:
    """What `load_tlora` / `create_tlora` put on this denoiser, if anything."""
    return denoiser.__dict__.get(LOADED_ATTRIBUTE)


def set_loaded_adapters(denoiser: nn.Module, loaded: LoadedAdapters | None) -> None:
    """Keep `loaded` on the denoiser; None (or no adapter left) forgets it."""
    if loaded is None or not loaded.records:
        denoiser.__dict__.pop(LOADED_ATTRIBUTE, None)
    else:
        denoiser.__dict__[LOADED_ATTRIBUTE] = loaded
