"""Fold mode: before each denoiser call, write W = W0 + B·diag([m, m])·A into every targeted weight, then run the
plain layers.

Same-shaped weights are stacked: each layer's weight becomes a view of one (G, out, in) tensor, so one `baddbmm`
per stack refolds them all, a fixed number of kernels per call whatever the number of modules, with no
Python per module and no host sync. The extra memory is one copy W0 of the folded weights plus the factors.
`remove()` writes W0 back: the weights come back bit-identical, each in its own storage. On CUDA with bf16/fp16
weights a fused Triton kernel (`fold_kernel`) reads W0 and writes W once, where it times faster than `baddbmm`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F
from lycoris.modules.tlora import TLoraModule
from torch import nn

from ..errors import TLoRAError
from ..logging_utils import get_logger
from . import fold_kernel
from .chain import ChainLink
from .factors import FLOAT_WEIGHTS, base_layer, delta_factors, doubled_mask
from .stacked import StackedMode
from .training import TrainingRoute

logger = get_logger(__name__)


class FoldStack:
    """Layers whose weights share device, dtype, shape and T-LoRA rank, stacked into one tensor and folded by one
    batched matmul."""

    def __init__(self, modules: list[TLoraModule]) -> None:
        self.modules = modules
        self.layers: list[nn.Module] = [base_layer(module) for module in modules]
        self.rank = modules[0].lora_dim
        self.base: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.trains_base = False  # training calls run the layers' own weights (see `enter_training`)
        with torch.no_grad(), torch.inference_mode(False):
            self._adopt(torch.stack([layer.weight.detach() for layer in self.layers]))

    def _adopt(self, stacked: torch.Tensor) -> None:
        """Point every layer's weight at a slice of `stacked` (a fresh stack of the unmodified weights); keep W0.

        Repointing first frees the layers' own tensors before W0 is copied: the peak is one extra stack.
        """
        self.weights = stacked
        for layer, weight in zip(self.layers, stacked):
            layer.weight.data = weight
        self.base = stacked.clone()
        self._build_factors()
        # Masking the thinner factor moves fewer bytes.
        self.mask_columns_of_b = self.b.shape[1] <= self.a.shape[2]
        # A fused kernel configuration where one beats baddbmm on this device; None: baddbmm.
        self.fused = (
            fold_kernel.fastest_config(self.base, self.b, self.a, self.weights)
            if fold_kernel.supports(stacked) else None
        )
        self._pointers = (stacked[0].data_ptr(), stacked[-1].data_ptr())

    def _build_factors(self) -> None:
        """A and B from the modules' current parameters; the next fold rewrites every weight."""
        factors = [delta_factors(module, self.base.device, self.base.dtype) for module in self.modules]
        self.a = torch.stack([a for a, _ in factors])
        self.b = torch.stack([b for _, b in factors])
        # The mask last folded, for the fused kernel to skip an unchanged one; NaN: nothing folded yet.
        self.previous_mask = torch.full_like(self.b[0, 0], float("nan"))

    def refresh(self) -> None:
        """Rebuild the factors after the T-LoRA parameters changed (training)."""
        with torch.no_grad(), torch.inference_mode(False):
            self._build_factors()

    def original_forward(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer `index`'s forward with its original weight W0 from the copy, which nothing writes in place: what a
        training call saves for backward stays valid even if an inference call folds before that backward."""
        layer = self.layers[index]
        return lambda x: F.linear(x, self.base[index], layer.bias)

    def enter_training(self) -> None:
        """Where the base weights themselves train, training calls run the layers' own weights, set to W0, so their
        gradients and optimizer steps reach them; elsewhere they read W0 from the copy (`original_forward`)."""
        self.trains_base = any(layer.weight.requires_grad for layer in self.layers)
        if self.trains_base:
            with torch.no_grad():
                self.weights.copy_(self.base)
                self.previous_mask.fill_(float("nan"))

    def leave_training(self) -> None:
        """W0 follows what training did to the base weights; a backward still pending on them raises (autograd's
        in-place check) rather than reading the weights the next fold writes."""
        if not self.trains_base:
            return
        with torch.no_grad():
            self.base.copy_(self.weights)
        for layer in self.layers:
            torch.autograd.graph.increment_version(layer.weight)
        self.trains_base = False

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.base, self.a, self.b))

    def fold(self, doubled_mask: torch.Tensor) -> None:
        """W = W0 + B·diag(doubled_mask)·A for every layer of the stack, in place."""
        if self.fused is not None:
            fold_kernel.fused_fold(
                self.base, self.b, self.a, doubled_mask, self.previous_mask, self.weights, self.fused
            )
        elif self.mask_columns_of_b:
            torch.baddbmm(self.base, self.b * doubled_mask, self.a, out=self.weights)
        else:
            torch.baddbmm(self.base, self.b, self.a * doubled_mask[:, None], out=self.weights)

    def follow_moved_weights(self) -> None:
        """`pipe.to(...)` after enabling gives the layers new tensors: move W0 and the factors after them."""
        first, last = self.layers[0].weight, self.layers[-1].weight
        if (first.data_ptr(), last.data_ptr()) == self._pointers:
            return
        if first.device.type == "meta" or first.dtype not in FLOAT_WEIGHTS:
            raise TLoRAError(
                f"The weights T-LoRA mode 'fold' rewrites were offloaded or quantized after enable_tlora "
                f"({first.device}, {first.dtype}). Call enable_tlora again after setting up offloading or "
                "quantization: mode='auto' then picks 'low_memory', which never touches the weights."
            )
        logger.warning(
            "T-LoRA fold: the folded weights moved to %s/%s after enable_tlora; moving their originals after them. "
            "Enable T-LoRA after pipe.to(...) to avoid this copy.", first.device, first.dtype,
        )
        with torch.inference_mode(False):
            self._adopt(self.base.to(first.device, first.dtype, copy=True))

    def restore(self) -> None:
        """Give every layer its original weight back, bit for bit, in its own storage (peak: one extra stack)."""
        for layer, original in zip(self.layers, self.base):
            if layer.weight.device == original.device and layer.weight.dtype == original.dtype:
                layer.weight.data = original  # drop the view of the folded stack first
        self.weights = None
        for layer, original in zip(self.layers, self.base):
            weight = layer.weight
            weight.data = original.to(device=weight.device, dtype=weight.dtype, copy=True)
        self.base = self.a = self.b = None


class FoldMode(StackedMode):
    """Folds the masked delta into the weights once per denoiser call; the layers then run at plain speed.

    Extra memory: one copy of every folded weight, plus the stacked factors.
    """

    name = "fold"

    def __init__(self, modules: list[TLoraModule], group_id: int) -> None:
        self.group_id = group_id
        self.links: list[ChainLink] = []
        self.stacks: list[FoldStack] = []
        try:
            for module in modules:
                link = ChainLink.unlink(module)
                if link is None:
                    raise TLoRAError(f"T-LoRA module {module.lora_name} is not where LyCORIS apply_to() put it.")
                self.links.append(link)
            by_key: dict[tuple, list[TLoraModule]] = defaultdict(list)
            for module in modules:
                weight = base_layer(module).weight
                by_key[(weight.device, weight.dtype, tuple(weight.shape), module.lora_dim)].append(module)
            for members in by_key.values():
                self.stacks.append(FoldStack(members))
        except BaseException:
            self.remove()
            raise
        logger.debug(
            "T-LoRA fold: %d layers in %d stacks (%d by the fused kernel), %.2f GiB extra.",
            len(modules), len(self.stacks), sum(stack.fused is not None for stack in self.stacks),
            self.extra_memory_bytes / 2**30,
        )

    @property
    def mask_dtype(self) -> torch.dtype:
        return self.stacks[0].dtype if self.stacks else torch.float32

    def set_mask(self, mask: torch.Tensor) -> None:
        doubled: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            for stack in self.stacks:
                stack.follow_moved_weights()
                key = (stack.rank, stack.device, stack.dtype)
                if key not in doubled:
                    doubled[key] = doubled_mask(mask, stack.rank).to(stack.device, stack.dtype)
                stack.fold(doubled[key])

    def clear_mask(self) -> None:
        """Nothing to do: the next call refolds, and `remove()` restores W0."""

    def refresh(self) -> None:
        for stack in self.stacks:
            stack.refresh()

    def training_routes(self) -> list[TrainingRoute]:
        """Training calls reach the folded layers' modules again and compute with W0, not the folded weights."""
        links = {id(link.module): link for link in self.links}
        routes = []
        for stack in self.stacks:
            stack.follow_moved_weights()
            stack.enter_training()
            for index, module in enumerate(stack.modules):
                base_forward = module.org_forward if stack.trains_base else stack.original_forward(index)
                routes.append(TrainingRoute(module, base_forward, links[id(module)], module.bypass_mode))
        return routes

    def leave_training(self) -> None:
        for stack in self.stacks:
            stack.leave_training()

    def remove(self) -> None:
        with torch.no_grad():
            for stack in self.stacks:
                stack.restore()
        for link in self.links:
            link.relink()
        self.stacks, self.links = [], []
