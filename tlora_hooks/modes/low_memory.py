"""Low-memory path: y = layer(x) + ((x·Aᵀ) ⊙ [m, m])·Bᵀ, with the base layer untouched.

It never reads or writes the base weight, so it works for fp8 or quantized layers and for weights that offloading
hooks move, and keeps no copy of any weight: only the thin factors A, B (2r·(in + out) values per module, in the
activations' dtype, on the activations' device) are extra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lycoris.modules.tlora import TLoraModule

from .chain import BypassOverride
from .factors import base_layer, delta_factors

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RankMasks:
    """The doubled mask [m[:r], m[:r]] of each module rank r, in persistent buffers updated in place.

    Stable tensors keep `torch.compile` from treating each call's mask as a new input; all ones while no mask is
    set, as LyCORIS's `_get_mask` defaults when called outside a denoiser call.
    """

    def __init__(self, ranks: set[int], dtype: torch.dtype) -> None:
        self.ranks = sorted(ranks)
        self.dtype = dtype
        self.buffers: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._device: torch.device | None = None

    def set(self, mask: torch.Tensor) -> None:
        self._device = mask.device
        for rank in self.ranks:
            self.buffer(rank, mask.device).view(2, rank).copy_(mask[:, :rank].expand(2, rank))

    def clear(self) -> None:
        for buffer in self.buffers.values():
            buffer.fill_(1)

    def buffer(self, rank: int, device: torch.device) -> torch.Tensor:
        key = (rank, device)
        if key not in self.buffers:
            with torch.inference_mode(False):  # a normal tensor: later calls may run outside inference mode
                self.buffers[key] = torch.ones(2 * rank, device=device, dtype=self.dtype)
        return self.buffers[key]

    def for_input(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        return self.buffer(rank, self._device or x.device).to(x.device, x.dtype)


class BypassDelta:
    """What LyCORIS's forward calls for one module: the layer's own output plus the masked low-rank delta."""

    def __init__(self, module: TLoraModule, masks: RankMasks) -> None:
        self.module = module
        self.masks = masks
        self.rank = module.lora_dim
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = self.module.org_forward(x)
        a, b = self.factors_for(x)
        h = F.linear(x, a)
        h.mul_(self.masks.for_input(self.rank, x))
        if y.dtype == h.dtype and y.is_contiguous() and h.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t())
            return y
        return y + F.linear(h, b).to(y.dtype)

    def factors_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B on the input's device and in its dtype (rebuilt only if those differ from the first call's)."""
        a = self.a
        if a is None or a.device != x.device or a.dtype != x.dtype:
            self.build(x.device, x.dtype)
        return self.a, self.b

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        with torch.inference_mode(False):  # usable by later calls outside inference mode, with autograd on
            self.a, self.b = delta_factors(self.module, device, dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b) if t is not None)


class LowMemoryPath:
    """Runs each module's delta beside its untouched base layer, through LyCORIS's own forward."""

    name = "low_memory"

    def __init__(self, modules: list[TLoraModule], group_id: int) -> None:
        self.group_id = group_id
        self.masks = RankMasks({module.lora_dim for module in modules}, compute_dtype(modules))
        self.deltas: dict[TLoraModule, BypassDelta] = {}
        self.overrides: dict[TLoraModule, BypassOverride] = {}
        self._unbuilt: list[BypassDelta] = []
        self.adopt(modules)

    @property
    def modules(self) -> list[TLoraModule]:
        return list(self.deltas)

    @property
    def mask_dtype(self) -> torch.dtype:
        return self.masks.dtype

    @property
    def extra_memory_bytes(self) -> int:
        """The factors built so far (they are built on the first call that reaches each module)."""
        return sum(delta.nbytes for delta in self.deltas.values())

    def set_mask(self, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.masks.set(mask)
            # Built here, before the call, so a compiled denoiser traces one state (a build inside would recompile).
            while self._unbuilt:
                self._unbuilt.pop().build(mask.device, self.mask_dtype)

    def clear_mask(self) -> None:
        with torch.no_grad():
            self.masks.clear()

    def adopt(self, modules: list[TLoraModule]) -> None:
        """Route `modules` (of ranks this path was built for) through the bypass."""
        for module in modules:
            self.deltas[module] = BypassDelta(module, self.masks)
            self.overrides[module] = BypassOverride(module, self.deltas[module])
            self._unbuilt.append(self.deltas[module])

    def release(self, modules: list[TLoraModule]) -> None:
        """Hand `modules` back to LyCORIS's forward (another path takes them over)."""
        for module in modules:
            self.overrides.pop(module).restore()
            delta = self.deltas.pop(module)
            if delta in self._unbuilt:
                self._unbuilt.remove(delta)

    def remove(self) -> None:
        self.release(self.modules)
        self.masks.buffers.clear()


def compute_dtype(modules: list[TLoraModule]) -> torch.dtype:
    """The dtype the layers compute in: their weights' floating dtype (bf16 when none is, e.g. all fp8)."""
    for module in modules:
        weight = getattr(base_layer(module), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES:
            return weight.dtype
    return torch.bfloat16
