"""Low-memory mode: y = layer(x) + (x·A_m ᵀ)·B_mᵀ, with the base layer untouched.

It never reads or writes the base weight, so it works for fp8 or quantized layers and for weights that offloading
hooks move, and keeps no copy of any weight. Same-shaped modules share stacked factors A (G, 2r, in) and
B (G, out, 2r); the thinner of the two is masked once per call for the whole stack (one kernel), so a layer runs
two extra matmuls and nothing else. It is reached through LyCORIS's own forward (its `bypass_mode` branch), which
leaves the layers' forward chain alone, so hooks that wrap a layer later (sequential offload) stay in place.
Extra memory: the factors (2r·(in + out) values per module) plus the masked copy of the thinner one
(2r·min(in, out)), in the activations' dtype, on the activations' device.
A layer several adapters adapt runs them all in one pass, as the fold does: their factors concatenated along the
rank, their masks (each scaled by its adapter's strength) side by side. The outermost of its LyCORIS modules carries
the pass; the ones inside it are unlinked from the chain where the next module calls them (never from the layer's own
`forward`, so hooks that wrap the layer later still stay in place). A second adapter then adds one rank-K product
per layer, not a second LyCORIS frame and two more kernels (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..logging import get_logger
from .chain import BypassOverride, ChainLink, ForwardPathCheck, chained_forward, inner_first, unlink_all
from .factors import FLOAT_WEIGHTS, Signature, base_layer, layer_factors, signature_mask
from .placement import execution_devices
from .protocol import GroupMasks, GroupModules, group_of
from .stacked import StackedMode
from .training import TrainingRoute

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

logger = get_logger(__name__)


class BypassLayer:
    """One layer's forward: its own output plus the masked low-rank delta of each of its adapters, from views into
    its stack's factors. Reached through `module`, the outermost of its LyCORIS modules (`modules`, inner first),
    whose `org_forward` is the layer's own forward once the others are unlinked."""

    __slots__ = ("module", "modules", "signature", "org_forward", "a", "b_t", "stack")

    def __init__(self, modules: list[TLoraModule], signature: Signature) -> None:
        self.modules = modules
        self.module = modules[-1]
        self.signature = signature
        self.org_forward = self.module.org_forward  # read again once the inner modules are unlinked
        self.stack: BypassStack | None = None  # set when the mode groups its layers, on the first denoiser call
        self.a: torch.Tensor | None = None
        self.b_t: torch.Tensor | None = None  # Bᵀ, a view made once: one dispatch less per call

    def __call__(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """`scale` (LyCORIS's multiplier, passed by its bypass branch) is already in the factors."""
        y = self.org_forward(x)
        a, b_t = self.a, self.b_t
        if a is None or a.dtype != x.dtype or a.device != x.device:
            a, b_t = self.factors_for(x)
        h = F.linear(x, a)
        if y.dtype == h.dtype == b_t.dtype and y.is_contiguous():  # else autocast, or a non-contiguous output
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_t)
            return y
        return y + (h @ b_t).to(y.dtype)

    def factors_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors for an input the stack was not built for; unmasked (all ranks, as LyCORIS with no mask set)
        before the first denoiser call has grouped the layers."""
        if self.stack is not None:
            return self.stack.factors_for(self, x)
        a, b = layer_factors(self.modules, x.device, x.dtype)
        return a, b.t()


class BypassStack:
    """Layers of one shape and dtype, adapted by the same adapters with the same ranks: their factors stacked into one
    tensor each, the thinner side masked in place once per call.

    Built on the first call's device (the activations'), in the layers' compute dtype, before the denoiser runs,
    so a compiled denoiser traces one state. Outside a call the masked side holds the unmasked factor: all ranks,
    as LyCORIS's forward with no mask set.
    """

    def __init__(self, layers: list[BypassLayer], dtype: torch.dtype, home: torch.device | None = None) -> None:
        self.layers = layers
        self.signature = layers[0].signature
        self.modules = [module for layer in layers for module in layer.modules]
        self.dtype = dtype
        self.home = home  # where a device map runs these layers; None: on the device of the denoiser's inputs
        for layer in layers:
            layer.stack = self
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.source: torch.Tensor | None = None  # the unmasked thinner factor
        self.masked: torch.Tensor | None = None  # its masked copy, which the layers read (a view of a or b)
        self.warned_conversion = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.source) if t is not None)

    def follow(self, device: torch.device) -> None:
        """Build on the first call's device; rebuild where the inputs or the layers' dtype changed since
        (`pipe.to(...)` after enable_tlora)."""
        dtype = layer_dtype(self.layers[0].module) or self.dtype
        if self.a is not None and (self.a.device, self.a.dtype) == (device, dtype):
            return
        if self.a is not None:
            logger.warning(
                "T-LoRA low_memory: the inputs moved to %s/%s after enable_tlora; rebuilding the factors there. "
                "Enable T-LoRA after pipe.to(...) to avoid this.", device, dtype,
            )
        self.dtype = dtype
        self.build(device)

    def build(self, device: torch.device) -> None:
        with torch.no_grad(), torch.inference_mode(False):  # usable by later calls outside inference mode
            factors = [layer_factors(layer.modules, device, self.dtype) for layer in self.layers]
            self.a = torch.stack([a for a, _ in factors])
            self.b = torch.stack([b for _, b in factors])
            mask_b = self.b.shape[1] <= self.a.shape[2]  # out <= in: B is thinner
            self.masked = self.b if mask_b else self.a
            self.source = self.masked.clone()
            self._mask_shape = (1, 1, -1) if mask_b else (1, -1, 1)
        for layer, a, b in zip(self.layers, self.a, self.b):
            layer.a, layer.b_t = a, b.t()

    def set_mask(self, doubled_mask: torch.Tensor) -> None:
        torch.mul(self.source, doubled_mask.view(self._mask_shape), out=self.masked)

    def clear_mask(self) -> None:
        self.masked.copy_(self.source)

    def factors_for(self, layer: BypassLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's current factors for an input on another device or in another dtype than the stack's (a call
        outside the denoiser's, autocast, a layer placed on another device): converted per call, slower but exact."""
        if self.a is None:
            self.build(x.device)
        if not self.warned_conversion and (x.device, x.dtype) != (self.a.device, self.a.dtype):
            self.warned_conversion = True
            logger.warning(
                "T-LoRA low_memory: a layer received %s/%s inputs, its factors are %s/%s; converting them on every "
                "such call (slower). Run the denoiser in its weights' dtype on one device for full speed.",
                x.device, x.dtype, self.a.device, self.a.dtype,
            )
        return layer.a.to(x.device, x.dtype), layer.b_t.to(x.device, x.dtype)


class LowMemoryMode(StackedMode):
    """Runs each layer's adapters' deltas beside its untouched base layer. Extra memory: the factors, built on the
    first call, each stack on the device its layers run on."""

    name = "low_memory"

    def __init__(self, groups: GroupModules, denoiser: nn.Module | None = None) -> None:
        group_by_module = group_of(groups)
        modules = [module for group_modules in groups.values() for module in group_modules]
        self.mask_dtype = compute_dtype(modules)
        self._denoiser = weakref.ref(denoiser) if denoiser is not None else lambda: None
        by_layer: dict[int, list[TLoraModule]] = defaultdict(list)
        for module in inner_first(modules):
            by_layer[id(base_layer(module))].append(module)
        self.layers = [
            BypassLayer(layer_modules, tuple((group_by_module[id(m)], m.lora_dim) for m in layer_modules))
            for layer_modules in by_layer.values()
        ]
        self.stacks: list[BypassStack] = []
        self.overrides: list[BypassOverride] = []
        inner = [module for layer in self.layers for module in layer.modules[:-1]]
        self.links: list[ChainLink] = unlink_all(inner, "the low_memory mode")
        try:
            for layer in self.layers:
                layer.org_forward = layer.module.org_forward  # the layer's own forward, the inner modules unlinked
                self.overrides.append(BypassOverride(layer.module, layer))
            self.path_check = ForwardPathCheck([layer.module for layer in self.layers], "the low_memory mode")
        except BaseException:
            self.remove()
            raise

    @property
    def modules(self) -> list[TLoraModule]:
        return [module for layer in self.layers for module in layer.modules]

    def build_stacks(self, call_device: torch.device) -> None:
        """Stack same-shaped layers that run on one device: on the call's device unless a device map (or an
        offloading hook) runs them elsewhere. Done on the first call, when hooks added after enabling are there."""
        devices = execution_devices(self._denoiser(), [base_layer(layer.module) for layer in self.layers])
        by_key: dict[tuple, list[BypassLayer]] = defaultdict(list)
        for layer, device in zip(self.layers, devices):
            module = layer.module
            home = device if device is not None and device != call_device else None
            by_key[(home, layer.signature, module.shape[0], module.shape[1], layer_dtype(module))].append(layer)
        self.stacks = [
            BypassStack(members, dtype or self.mask_dtype, home) for (home, *_, dtype), members in by_key.items()
        ]

    def set_masks(self, masks: GroupMasks) -> None:
        self.path_check.check()
        call_device = next(iter(masks.values())).device
        if not self.stacks:
            self.build_stacks(call_device)
        stacked: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            for stack in self.stacks:
                device = call_device if stack.home is None else stack.home
                stack.follow(device)
                key = (stack.signature, device)
                if key not in stacked:  # one small copy per kind of stack, device and call, none per layer
                    stacked[key] = signature_mask(masks, stack.signature).to(device, non_blocking=True)
                stack.set_mask(stacked[key])

    def clear_masks(self) -> None:
        with torch.no_grad():
            for stack in self.stacks:
                if stack.masked is not None:
                    stack.clear_mask()

    def refresh(self) -> None:
        """Rebuild the factors after the T-LoRA parameters changed (training); stacks not built yet build later."""
        for stack in self.stacks:
            if stack.a is not None:
                stack.build(stack.a.device)

    def training_routes(self) -> list[TrainingRoute]:
        """Training calls run each module beside its untouched base layer, the inner ones linked back in first."""
        links = {id(link.module): link for link in self.links}
        carriers = {id(override.module): override for override in self.overrides}
        routes = []
        for layer in self.layers:
            for module in layer.modules:
                override = carriers.get(id(module))
                bypass_mode = override.bypass_mode_before if override is not None else module.bypass_mode
                routes.append(TrainingRoute(module, chained_forward(module), links.get(id(module)), bypass_mode))
        return routes

    def leave_training(self) -> None:
        """Nothing to undo: training calls never touch the factors."""

    def remove(self) -> None:
        while self.overrides:
            self.overrides.pop().restore()
        while self.links:
            self.links.pop().relink()
        self.stacks = []


def layer_dtype(module: TLoraModule) -> torch.dtype | None:
    """The dtype the module's base layer computes in: its weight's floating dtype, else the compute dtype of the
    hook or quantized layer that upcasts it (diffusers layerwise casting, bitsandbytes 4-bit), else its bias's
    (bitsandbytes 8-bit keeps the bias in the model's dtype); None where none says."""
    layer = base_layer(module)
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_WEIGHTS:
        return weight.dtype
    hooks = getattr(getattr(layer, "_diffusers_hook", None), "hooks", {})
    for owner in (hooks.get("layerwise_casting"), layer):
        dtype = getattr(owner, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    bias = getattr(layer, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) and bias.dtype in FLOAT_WEIGHTS else None


def compute_dtype(modules: list[TLoraModule]) -> torch.dtype:
    """The dtype the layers compute in (bf16 where no layer says)."""
    return next((dtype for dtype in map(layer_dtype, modules) if dtype is not None), torch.bfloat16)
