"""Where a LyCORIS T-LoRA module sits in its layer's forward chain: taking its delta out and putting it back
exactly, keeping it inside an accelerate hook, and checking that it is still called.

LyCORIS `apply_to()` chains forwards: `layer.forward` is the outermost wrapper's `forward`, and each wrapper calls
the previous one through `org_forward`. The fast modes must stop LyCORIS from also adding its delta, yet leave
`_lycoris_wrappers` alone, so discovery and `mode="lycoris"` still find the module after `remove()`.

Hooks that rewrite `layer.forward` keep the previous forward elsewhere: accelerate in `layer._old_forward`, diffusers'
HookRegistry in its function references. Removing such a hook puts that previous forward back, so a LyCORIS module
applied *after* the hook (its `org_forward` is the hook's forward) silently drops out of the chain.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from ..errors import TLoRAError
from ..logging import get_logger
from .factors import base_layer

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

logger = get_logger(__name__)


# Modules a ChainLink took out of their chain: their `org_forward` still points into the chain, but nothing calls
# them, so it is no slot of anyone's.
_unlinked: weakref.WeakSet = weakref.WeakSet()


ACCELERATE_SLOT = "_old_forward"  # where accelerate's add_hook_to_module keeps the forward its hook wraps


def accelerate_hooked(layer: nn.Module) -> bool:
    """Whether an accelerate hook is on the layer, so that its `forward` calls `_old_forward`."""
    return "_hf_hook" in layer.__dict__


class ChainLink:
    """The slot (`layer.forward` or an outer wrapper's `org_forward`) that calls the module, pointed past it.

    While unlinked, the layer runs exactly as if LyCORIS had never wrapped it: no Python frame of LyCORIS per call.
    Several modules on one layer (two adapters) are unlinked inner first (`inner_first`) and relinked in the reverse
    order, which gives back LyCORIS's chain exactly.
    """

    def __init__(self, module: TLoraModule, holder: Any, attribute: str) -> None:
        self.module = module
        self.holder = holder
        self._attribute = attribute
        self.bypassing = module.org_forward
        setattr(holder, attribute, self.bypassing)
        _unlinked.add(module)

    @property
    def attribute(self) -> str:
        """The slot's attribute now: accelerate's `_old_forward` only while its hook is on the layer. Removing the
        hook moves what `_old_forward` held (the forward past the module) to `forward` and deletes `_old_forward`."""
        if self._attribute == ACCELERATE_SLOT and not accelerate_hooked(self.holder):
            return "forward"
        return self._attribute

    @staticmethod
    def slot(module: TLoraModule) -> tuple[Any, str] | None:
        """Where `module.forward` is called from: the layer's `forward`, an outer wrapper's `org_forward`, or the
        place a forward-rewriting hook keeps the forward it wraps; None if nothing in the chain calls it."""
        forwards = module_forwards(module)
        for holder, attribute in forward_slots(base_layer(module), besides=module):
            if holder.__dict__.get(attribute) in forwards:
                return holder, attribute
        return None

    @classmethod
    def unlink(cls, module: TLoraModule) -> "ChainLink | None":
        """Unlink `module` where LyCORIS put it; None where something else holds its forward."""
        slot = cls.slot(module)
        return cls(module, *slot) if slot is not None else None

    def relink(self) -> None:
        attribute = self.attribute
        if self.holder.__dict__.get(attribute) != self.bypassing:
            logger.warning(
                "The forward of %s was replaced while T-LoRA was enabled; putting LyCORIS back in front of it anyway.",
                self.module.lora_name,
            )
        setattr(self.holder, attribute, self.module.forward)
        _unlinked.discard(self.module)


def inner_first(modules: list[TLoraModule]) -> list[TLoraModule]:
    """The modules ordered so that, on each layer, the ones LyCORIS applied first (innermost) come first: the order
    to unlink them in (and to relink them in reverse)."""

    def position(module: TLoraModule) -> int:
        wrappers = base_layer(module).__dict__.get("_lycoris_wrappers", ())
        return next((index for index, wrapper in enumerate(wrappers) if wrapper is module), len(wrappers))

    return sorted(modules, key=position)


def chained_forward(module: TLoraModule) -> Callable[[Any], Any]:
    """The module's `org_forward` as it is when called: training routes relink the modules inside it first."""
    return lambda x: module.org_forward(x)


def unlink_all(modules: list[TLoraModule], where: str) -> list[ChainLink]:
    """Unlink `modules`, inner first; on failure relink those done and raise. Relink the result in reverse."""
    links: list[ChainLink] = []
    try:
        for module in inner_first(modules):
            link = ChainLink.unlink(module)
            if link is None:
                raise dropped_error([module], where)
            links.append(link)
    except BaseException:
        while links:
            links.pop().relink()
        raise
    return links


class OutOfChain:
    """An inactive adapter's modules, taken out of their layers' forward chains so they cost nothing per call;
    `restore()` puts them back exactly."""

    def __init__(self, modules: list[TLoraModule], where: str) -> None:
        self.links = unlink_all(modules, where)

    def restore(self) -> None:
        while self.links:
            self.links.pop().relink()


class BypassOverride:
    """Makes LyCORIS's own forward call `delta_forward` for the module, through its `bypass_mode` branch.

    `TLoraModule.forward` returns `self.bypass_forward(x, scale=self.multiplier)` when `bypass_mode` is set, so an
    instance attribute reroutes it whatever wraps the layer (offload hooks included) without touching the chain.
    """

    def __init__(self, module: TLoraModule, delta_forward: Callable) -> None:
        self.module = module
        self._had_instance_bypass = "bypass_forward" in module.__dict__
        self._instance_bypass = module.__dict__.get("bypass_forward")
        self.bypass_mode_before = module.bypass_mode
        module.bypass_forward = delta_forward
        module.bypass_mode = True

    def restore(self) -> None:
        module = self.module
        module.bypass_mode = self.bypass_mode_before
        if self._had_instance_bypass:
            module.bypass_forward = self._instance_bypass
        else:
            module.__dict__.pop("bypass_forward", None)


def module_forwards(module: TLoraModule) -> tuple[Callable, ...]:
    """What a chain slot holds when it calls the module: its forward, and its class's forward bound to it, which
    `apply_to()` put there before a hook (accelerate's sequential offload) rewrapped the module's own `forward`."""
    return module.forward, type(module).forward.__get__(module)


def forward_slots(layer: nn.Module, besides: TLoraModule | None = None) -> list[tuple[Any, str]]:
    """Every (holder, attribute) of a layer's forward chain that may hold a wrapper's forward."""
    slots = [(layer, "forward")]
    if accelerate_hooked(layer):  # a `_old_forward` left without its hook is called by nothing
        slots.append((layer, ACCELERATE_SLOT))
    wrappers = layer.__dict__.get("_lycoris_wrappers", ())
    slots += [
        (wrapper, "org_forward") for wrapper in wrappers if wrapper is not besides and wrapper not in _unlinked
    ]
    for reference in getattr(layer.__dict__.get("_diffusers_hook"), "_fn_refs", ()):
        slots += [(reference, "forward"), (reference, "original_forward")]
    return slots


def dropped_error(modules: list[TLoraModule], where: str) -> TLoRAError:
    names = ", ".join(module.lora_name for module in modules[:3]) + (", ..." if len(modules) > 3 else "")
    return TLoRAError(
        f"{len(modules)} T-LoRA module(s) of {where} are no longer in their layers' forward ({names}), so they would "
        "not run at all. A hook added before LyCORIS's apply_to() and removed since (accelerate's remove_hook_from_"
        "module, `pipe.remove_all_hooks()`, `enable_model_cpu_offload()` after `enable_sequential_cpu_offload()`) "
        "puts back the forward it wrapped. Apply the network again (`network.apply_to()`) or `load_tlora` again, "
        "then enable T-LoRA."
    )


class ForwardPathCheck:
    """Raises on the first call after one of `modules` dropped out of its layer's forward chain.

    Per call and module it tests that the slot where the module was found still holds the same object (one dict
    lookup and an identity test); only when one changed does it look for the modules in their chains again.
    """

    def __init__(self, modules: list[TLoraModule], where: str) -> None:
        self.modules = modules
        self.where = where
        self._find()

    def _find(self) -> None:
        """(the slot holder's __dict__, attribute, the object there) for each module; raise for modules not found."""
        slots, dropped = [], []
        for module in self.modules:
            found = ChainLink.slot(module)
            if found is None:
                dropped.append(module)
                continue
            holder, attribute = found
            slots.append((holder.__dict__, attribute, holder.__dict__[attribute]))
        self.slots = slots
        if dropped:
            raise dropped_error(dropped, self.where)

    def check(self) -> None:
        if not all(namespace.get(attribute) is seen for namespace, attribute, seen in self.slots):
            self._find()


class HookNesting:
    """Puts a LyCORIS module applied over an accelerate hook inside it instead (hook -> LyCORIS -> layer), so that
    removing the hook leaves the module in the forward; `undo()` restores LyCORIS's own order.

    accelerate's `remove_hook_from_module` sets `layer.forward = layer._old_forward`: with LyCORIS's forward there,
    the module stays. LyCORIS's `restore()` then falls back to `_lycoris_original_forward`, the plain forward.
    """

    def __init__(self, module: TLoraModule) -> None:
        self.module = module
        self.layer = base_layer(module)
        self.hook_forward = module.org_forward
        self.plain_forward = self.layer.__dict__["_old_forward"]
        self.lycoris_original = self.layer.__dict__.get("_lycoris_original_forward")
        module.org_forward = self.plain_forward
        self.layer._old_forward = module.forward
        self.layer.forward = self.hook_forward
        self.layer._lycoris_original_forward = self.plain_forward

    @classmethod
    def wherever_needed(cls, modules: list[TLoraModule]) -> list["HookNesting"]:
        return [cls(module) for module in modules if cls._wraps_accelerate_hook(module)]

    @staticmethod
    def _wraps_accelerate_hook(module: TLoraModule) -> bool:
        layer = base_layer(module)
        outer = module.org_forward
        return (
            layer.__dict__.get("forward") == module.forward
            and "_old_forward" in layer.__dict__
            and accelerate_hooked(layer)
            and getattr(getattr(outer, "func", None), "__module__", None) == "accelerate.hooks"
            and getattr(outer, "args", (None,))[0] is layer
        )

    def undo(self) -> None:
        """LyCORIS's order again where the hook is still there; where it was removed, LyCORIS is outermost already."""
        layer, module = self.layer, self.module
        if layer.__dict__.get("forward") is self.hook_forward and layer.__dict__.get("_old_forward") == module.forward:
            layer._old_forward = self.plain_forward
            module.org_forward = self.hook_forward
            layer.forward = module.forward
            if self.lycoris_original is not None:
                layer._lycoris_original_forward = self.lycoris_original
