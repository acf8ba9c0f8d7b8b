"""Taking a LyCORIS T-LoRA module's delta out of its layer's forward, and putting it back exactly.

LyCORIS `apply_to()` chains forwards: `layer.forward` is the outermost wrapper's `forward`, and each wrapper calls
the previous one through `org_forward`. The fast modes must stop LyCORIS from also adding its delta, yet leave
`_lycoris_wrappers` alone, so discovery and `mode="lycoris"` still find the module after `remove()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..logging import get_logger
from .factors import base_layer

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

logger = get_logger(__name__)


class ChainLink:
    """The slot (`layer.forward` or an outer wrapper's `org_forward`) that calls the module, pointed past it.

    While unlinked, the layer runs exactly as if LyCORIS had never wrapped it: no Python frame of LyCORIS per call.
    """

    def __init__(self, module: TLoraModule, holder: Any, attribute: str) -> None:
        self.module = module
        self.holder = holder
        self.attribute = attribute
        self.bypassing = module.org_forward
        setattr(holder, attribute, self.bypassing)

    @staticmethod
    def slot(module: TLoraModule) -> tuple[Any, str] | None:
        """Where `module.forward` is called from, if LyCORIS put it there (not behind an offloading hook)."""
        layer = base_layer(module)
        wrappers = layer.__dict__.get("_lycoris_wrappers", ())
        slots = [(layer, "forward")] + [(wrapper, "org_forward") for wrapper in wrappers if wrapper is not module]
        for holder, attribute in slots:
            if holder.__dict__.get(attribute) == module.forward:
                return holder, attribute
        return None

    @classmethod
    def unlink(cls, module: TLoraModule) -> "ChainLink | None":
        """Unlink `module` where LyCORIS put it; None where something else holds its forward."""
        slot = cls.slot(module)
        return cls(module, *slot) if slot is not None else None

    def relink(self) -> None:
        if self.holder.__dict__.get(self.attribute) != self.bypassing:
            logger.warning(
                "The forward of %s was replaced while T-LoRA was enabled; putting LyCORIS back in front of it anyway.",
                self.module.lora_name,
            )
        setattr(self.holder, self.attribute, self.module.forward)


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
