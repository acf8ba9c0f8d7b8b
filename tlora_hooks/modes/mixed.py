"""Paths over disjoint sets of modules driven as one, and "auto": fold or bypass per layer, by measured tokens."""

from __future__ import annotations

import torch
from lycoris.modules.tlora import TLoraModule

from ..errors import TLoRAError
from ..logging_utils import get_logger
from . import fold_kernel
from .factors import base_layer
from .fold import FoldPath
from .low_memory import LowMemoryPath

logger = get_logger(__name__)

# Bytes moved per call for each byte of a folded weight: the fused kernel reads W0 and writes W; `baddbmm(W0, B, A,
# out=W)` copies W0 into W, then adds B·A in place (cuBLAS reads and writes W again).
FUSED_FOLD_TRAFFIC = 2
FOLD_TRAFFIC = 4
# The bypass adds three kernels per layer (x·Aᵀ, the mask, the add of ·Bᵀ); their launch cost, counted as the bytes
# a memory-bound kernel moves in that time (about 3 µs at 3 TB/s).
BYPASS_LAUNCH_BYTES = 8 << 20


class MixedPath:
    """Several paths, each over its own modules, set and cleared together."""

    def __init__(self, parts: list, group_id: int) -> None:
        self.parts = [part for part in parts if part is not None]
        self.group_id = group_id

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts if getattr(part, "runs_modules", True)) or "none"

    @property
    def mask_dtype(self) -> torch.dtype:
        return self.parts[0].mask_dtype if self.parts else torch.float32

    @property
    def extra_memory_bytes(self) -> int:
        return sum(part.extra_memory_bytes for part in self.parts)

    def set_mask(self, mask: torch.Tensor) -> None:
        for part in self.parts:
            part.set_mask(mask if mask.dtype == part.mask_dtype else mask.to(part.mask_dtype))

    def clear_mask(self) -> None:
        for part in self.parts:
            part.clear_mask()

    def remove(self) -> None:
        while self.parts:
            self.parts.pop().remove()


def folding_pays(module: TLoraModule, tokens: int) -> bool:
    """Whether refolding the weight moves fewer bytes per call than the bypass does for `tokens` input rows.

    The fold reads and writes the whole weight; the bypass reads x and writes h = x·Aᵀ, then reads h and
    reads and writes y: both are memory-bound, so bytes decide. Few-token layers (cross-attention K/V on 77 text
    tokens, AdaLN on the time embedding) get the bypass.
    """
    out_features, in_features = module.shape[0], module.shape[1]
    weight = base_layer(module).weight
    size = weight.element_size()
    traffic = FUSED_FOLD_TRAFFIC if fold_kernel.supports(weight) else FOLD_TRAFFIC
    fold = traffic * out_features * in_features * size
    bypass = size * tokens * (in_features + 2 * out_features + 4 * module.lora_dim) + BYPASS_LAUNCH_BYTES
    return fold <= bypass


class AutoPath(MixedPath):
    """Runs the first call on the low-memory path while counting each foldable layer's input rows, then folds the
    layers where `folding_pays`, once; the others stay on the bypass."""

    def __init__(
        self, low_memory: LowMemoryPath, others: list, foldable: list[TLoraModule], group_id: int
    ) -> None:
        super().__init__([low_memory, *others], group_id)
        self.low_memory = low_memory
        self.tokens = {module: 0 for module in foldable}
        self._probes = [base_layer(module).register_forward_pre_hook(self._counter(module)) for module in foldable]

    def _counter(self, module: TLoraModule):
        def count_rows(layer, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].dim():
                self.tokens[module] += args[0].numel() // args[0].shape[-1]

        return count_rows

    @property
    def calibrating(self) -> bool:
        return bool(self._probes)

    def clear_mask(self) -> None:
        super().clear_mask()
        if self._probes:
            self._stop_probes()
            self._fold_where_it_pays()

    def _stop_probes(self) -> None:
        for probe in self._probes:
            probe.remove()
        self._probes = []

    def _fold_where_it_pays(self) -> None:
        chosen = [module for module, tokens in self.tokens.items() if folding_pays(module, tokens)]
        if not chosen:
            return
        self.low_memory.release(chosen)
        try:
            fold = FoldPath(chosen, self.group_id)
        except (RuntimeError, TLoRAError) as error:  # out of memory, or a layer changed under us
            logger.warning("T-LoRA auto: folding failed (%s); staying on the low-memory path.", error)
            self.low_memory.adopt(chosen)
            return
        self.parts.insert(0, fold)
        if not self.low_memory.modules:
            self.parts.remove(self.low_memory)
        logger.info(
            "T-LoRA auto: folding %d of %d layers (%.2f GiB extra); %d few-token layers stay on the bypass.",
            len(chosen), len(self.tokens), fold.extra_memory_bytes / 2**30, len(self.tokens) - len(chosen),
        )

    def remove(self) -> None:
        self._stop_probes()
        super().remove()
