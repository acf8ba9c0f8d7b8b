"""Fold mode: before each denoiser call, write W = W0 + B·diag([m, m])·A into every targeted weight, then run the
plain layers.

Same-shaped weights are stacked: each layer's weight becomes a view of one (G, out, in) tensor, so one `baddbmm`
per stack refolds them all, a fixed number of kernels per call whatever the number of modules, with no
Python per module and no host sync. The extra memory is one copy W0 of the folded weights plus the factors.
Where several adapters adapt a layer, their factors are concatenated along the rank (and their masks, each scaled
by its adapter's strength), so one pass folds them all; a stack holds layers with the same adapters.
`remove()` writes W0 back: the weights come back bit-identical, each in its own storage. On CUDA with bf16/fp16
weights a fused Triton kernel (`fold_kernel`) reads W0 and writes W once, where it times faster than `baddbmm`.

Between calls the weights hold W0 + the last call's delta, so what others write into them must be noticed
(`weight_watch.py`) before anything reads W0 or overwrites the weights: before each call, in `state_dict()`, around
each layer's `load_state_dict` and on removal (`FoldMode.sync`), so no call is needed in between. `state_dict()`
gives W0, `load_state_dict` writes onto W0 and becomes the new W0, `pipe.to` is followed, a PEFT LoRA that wraps a
folded layer moves it to the `"low_memory"` mode (a fused PEFT delta stays in its weight), a write onto W0 becomes the
new W0, and a write onto W0 + the delta is a TLoRAError at the next call (dropped with a warning on removal). A write
through `.data` in place moves no version counter and is not seen.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..discovery import peft_wrapped_layers
from ..errors import TLoRAError
from ..logging import get_logger
from . import fold_kernel
from .chain import ChainLink, chained_forward, unlink_all
from .factors import Signature, base_layer, layer_factors, signature_mask
from .low_memory import LowMemoryMode
from .protocol import GroupMasks, GroupModules, by_group, group_of
from .stacked import StackedMode
from .training import TrainingRoute
from .weight_watch import WeightWatch, plain_float, restorable, storage_pointer, weight_of

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

logger = get_logger(__name__)


def keeps_weight_copies(denoiser: nn.Module | None) -> bool:
    """Whether diffusers group offloading on `denoiser` keeps copies of the weights (CUDA streams: pinned copies;
    a disk path: a file), which its layers load instead of the weights themselves."""
    hooks = getattr(getattr(denoiser, "_diffusers_hook", None), "hooks", {})
    if "lazy_prefetch_group_offloading" in hooks:  # applied with streams
        return True
    group = getattr(hooks.get("group_offloading"), "group", None)
    return getattr(group, "stream", None) is not None or getattr(group, "offload_to_disk_path", None) is not None


class FoldStack:
    """Layers whose weights share device, dtype and shape, adapted by the same adapters with the same ranks, stacked
    into one tensor and folded by one batched matmul.

    Args:
        layer_modules: Each layer's T-LoRA modules, innermost first (one per adapter on it).
        signature: Each of those modules' (mask group, rank), the same for every layer of the stack.
    """

    def __init__(self, layer_modules: list[list[TLoraModule]], signature: Signature) -> None:
        self.layer_modules = layer_modules
        self.modules = [module for modules in layer_modules for module in modules]
        self.layers: list[nn.Module] = [base_layer(modules[0]) for modules in layer_modules]
        self.signature = signature
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
        # The doubled mask whose delta the weights hold now; None: they hold W0.
        self.folded_mask: torch.Tensor | None = None
        self.watch = WeightWatch(self.layers)

    def _build_factors(self) -> None:
        """A and B from the modules' current parameters, each layer's adapters concatenated along the rank; the next
        fold rewrites every weight."""
        factors = [layer_factors(modules, self.base.device, self.base.dtype) for modules in self.layer_modules]
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
            self.unfold()

    def leave_training(self) -> None:
        """W0 follows what training did to the base weights; a backward still pending on them raises (autograd's
        in-place check) rather than reading the weights the next fold writes."""
        if not self.trains_base:
            return
        with torch.no_grad():
            self.base.copy_(self.weights)
        for layer in self.layers:
            torch.autograd.graph.increment_version(layer.weight)
        self.watch.remember()  # the steps training took are the new W0, not a write from outside
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
        self.folded_mask = doubled_mask

    def unfold(self) -> None:
        """Put W0 back into the weights (they are read or written from outside); the next call folds again."""
        if self.folded_mask is None:
            return
        with torch.no_grad(), torch.inference_mode(False):
            self.weights.copy_(self.base)
            self.previous_mask.fill_(float("nan"))
        self.folded_mask = None

    # -- writes from outside ------------------------------------------------------------------------
    def take_outside_writes(
        self, skip: frozenset[int] = frozenset(), dropping: bool = False
    ) -> tuple[torch.device, torch.dtype] | None:
        """Keep what others wrote into the weights since the fold last looked, exactly, or refuse it. Moved weights
        (`pipe.to`) are followed; writes onto W0 (after `unfold`) become the new W0; a write onto W0 + the last
        call's delta cannot be told apart from the delta: a TLoRAError, or where the fold is being removed
        (`dropping`) a warning, and `restore` then puts back W0 as it was before the write.

        Args:
            skip: ids of layers whose writes the caller handles (PEFT's fused layers).
            dropping: The fold is being removed: warn instead of raising.

        Returns:
            The device and dtype the weights moved to, where they moved.
        """
        changed = [index for index in self.watch.changed() if id(self.layers[index]) not in skip]
        if not changed:
            return None
        changed = [index for index in changed if not self._moved_back(index)]
        first = weight_of(self.layers[changed[0]]) if changed else None
        if first is None or not plain_float(first):
            if first is not None and not dropping:
                raise self._unwritable(first)
            self.watch.remember()
            return None
        moved = (first.device, first.dtype) != (self.device, self.dtype)
        written = [index for index in changed if self._written(index)]
        if written and self.folded_mask is not None:
            self._refuse_writes_onto_delta(written, dropping)
            written = []
        written_values = {index: weight_of(self.layers[index]).detach() for index in written}
        with torch.no_grad(), torch.inference_mode(False):
            for index, weight in list(written_values.items()):
                if weight.shape == self.weights[index].shape:
                    continue
                if dropping:
                    del written_values[index]
                    continue
                raise TLoRAError(
                    f"The weight of {self.layer_modules[index][0].lora_name} was replaced by one of shape "
                    f"{tuple(weight.shape)}; its T-LoRA was built for {tuple(self.weights[index].shape)}, and mode "
                    "'fold' writes whole weights. Sharded or flattened parameters (FSDP1's flat parameters) cannot be "
                    "folded: enable T-LoRA with mode='low_memory', which never writes the weights."
                )
            if moved:  # W0 follows the weights (from the copy: exact, not W0 + the delta converted)
                self._adopt(self.base.to(first.device, first.dtype, copy=True))
            for index, weight in written_values.items():
                if storage_pointer(weight) != self.weights[index].data_ptr():  # a new tensor: bring it into the stack
                    self.weights[index].copy_(weight)
                    weight_of(self.layers[index]).data = self.weights[index]
                self.base[index].copy_(self.weights[index])
        self.watch.remember()
        if written_values:
            logger.info("T-LoRA fold: took the weights of %d layers written since the last call as their new W0.",
                        len(written_values))
        return (first.device, first.dtype) if moved else None

    def _refuse_writes_onto_delta(self, written: list[int], dropping: bool) -> None:
        """Writes onto W0 + the last call's delta cannot be told apart from the delta: raise before a call; where
        the fold is being removed, say that `restore` gives back W0 from before them."""
        names = [self.layer_modules[index][0].lora_name for index in written]
        if not dropping:
            raise TLoRAError(
                f"The weights of {len(names)} layers that T-LoRA mode 'fold' rewrites (e.g. {names[0]}) were "
                "written while they held W0 plus the T-LoRA delta of the last call (an in-place edit, an "
                "optimizer step, a new tensor), so the edit cannot be told apart from the delta, and the next "
                "call would overwrite it. Nothing ran or changed. Call disable_tlora(pipe) (it puts back the base "
                "weights as they were before the edit), make the edit then, and enable T-LoRA again; or use "
                "mode='low_memory', which never writes the weights. load_state_dict, state_dict, pipe.to and "
                "PEFT's fuse_lora need none of this."
            )
        logger.warning(
            "T-LoRA fold: the weights of %d layers (e.g. %s) were written while they held W0 plus the T-LoRA "
            "delta of the last call, so the write cannot be told apart from the delta; they get back the base "
            "weights from before it. Make such edits after disable_tlora / unload_tlora (or use "
            "mode='low_memory', which never writes the weights).", len(names), names[0],
        )

    def _written(self, index: int) -> bool:
        """Written in place or replaced, or given other values where it was (`weight.data = other`): not just moved
        (the same Parameter and version, in another place or dtype)."""
        weight = weight_of(self.layers[index])
        return self.watch.written_at(index) or (weight.device, weight.dtype) == (self.device, self.dtype)

    def _unwritable(self, weight) -> TLoRAError:
        """The error for weights the fold can no longer write (converted to another dtype, offloaded, quantized)."""
        held = "W0 plus the T-LoRA delta of the last call" if self.folded_mask is not None else "W0"
        if restorable(weight):
            return TLoRAError(
                f"The weights T-LoRA mode 'fold' rewrites were converted to {weight.dtype} after enable_tlora; the "
                "fold writes float32, bfloat16 and float16 weights only. Nothing ran. Call disable_tlora(pipe) (it "
                f"gives the layers their base weights, converted), then enable T-LoRA again: {weight.dtype} layers "
                "run beside their weights ('low_memory'), or use mode='lycoris'."
            )
        return TLoRAError(
            f"The weights T-LoRA mode 'fold' rewrites were offloaded or quantized after enable_tlora "
            f"({type(weight).__name__}, {getattr(weight, 'device', None)}, {getattr(weight, 'dtype', None)}) while "
            f"they held {held}. Set up offloading or quantization first, from the base weights, then enable "
            "T-LoRA: mode='auto' then picks 'low_memory', which never touches the weights."
        )

    def _moved_back(self, index: int) -> bool:
        """The layer was given a new tensor holding exactly what its slice of the stack holds (accelerate's model
        offload moves the module away and back between calls): point it at the stack again."""
        weight = weight_of(self.layers[index])
        target = self.weights[index]
        if not plain_float(weight) or storage_pointer(weight) == target.data_ptr():
            return False
        if (weight.device, weight.dtype, weight.shape) != (target.device, target.dtype, target.shape):
            return False
        if not torch.equal(weight.detach(), target):
            return False
        weight.data = target
        return True

    def keep_fused_peft(self, wrappers: dict[int, nn.Module]) -> None:
        """A PEFT LoRA fused into a folded layer added its delta through `.data`, which bumps no version counter:
        keep it in W0 (W0 += what the weight holds - what the fold wrote), so unfusing later restores W0."""
        with torch.no_grad(), torch.inference_mode(False):
            for index, layer in enumerate(self.layers):
                wrapper = wrappers.get(id(layer))
                if wrapper is None or not getattr(wrapper, "merged", False):
                    continue
                current = layer.weight.detach().to(self.device, self.dtype)  # PEFT's safe merge assigns a new one
                if self.folded_mask is None:
                    self.base[index].copy_(current)
                else:
                    self.base[index].add_(current - self._folded(index))

    def _folded(self, index: int) -> torch.Tensor:
        """What the last fold wrote into one layer's weight."""
        b, a = self.b[index], self.a[index]
        mask = self.folded_mask
        if self.mask_columns_of_b:
            return torch.addmm(self.base[index], b * mask, a)
        return torch.addmm(self.base[index], b, a * mask[:, None])

    def restore(self) -> None:
        """Give every layer its original weight back, bit for bit, in its own storage (peak: one extra stack).

        A weight since replaced by an offloaded or quantized one is left as it is: it cannot take W0 back.
        """
        layers = [(layer, original) for layer, original in zip(self.layers, self.base) if restorable(layer.weight)]
        for layer, original in layers:
            if layer.weight.device == original.device and layer.weight.dtype == original.dtype:
                layer.weight.data = original  # drop the view of the folded stack first
        self.weights = None
        for layer, original in layers:
            weight = layer.weight
            weight.data = original.to(device=weight.device, dtype=weight.dtype, copy=True)
        self.base = self.a = self.b = None


class FoldMode(StackedMode):
    """Folds the masked delta into the weights once per denoiser call; the layers then run at plain speed.

    Extra memory: one copy of every folded weight, plus the stacked factors. Layers a PEFT LoRA wraps after
    enabling leave the fold for the `"low_memory"` mode (`evicted`), where fusing and unfusing that LoRA write the
    layer's own weight. What others did to the weights is taken in (`sync`) before every call, and also before
    `state_dict`, after each layer's `load_state_dict` and on removal, so nothing depends on a call coming between.
    """

    def __init__(self, groups: GroupModules, denoiser: nn.Module | None = None) -> None:
        self.group_of = group_of(groups)
        self.links: list[ChainLink] = []
        self.stacks: list[FoldStack] = []
        self.placement: dict[int, tuple[FoldStack, int]] = {}  # id of a folded layer -> (its stack, its index)
        self.evicted: LowMemoryMode | None = None
        self._move_announced: tuple[torch.device, torch.dtype] | None = None  # the last move a warning told of
        self.denoiser_ref: Callable[[], nn.Module | None] = (
            weakref.ref(denoiser) if denoiser is not None else lambda: None
        )
        self.peft_adapters = self._peft_adapters()
        self._fold([module for modules in groups.values() for module in modules])
        # On every layer folded now, kept while the mode lives (a layer PEFT takes later keeps them, harmlessly).
        self._state_hooks = [handle for stack in self.stacks for layer in stack.layers for handle in
                             self._watch_state(layer)]

    def _fold(self, modules: list[TLoraModule]) -> None:
        self.links = unlink_all(modules, "the fold mode")  # inner first; raises having relinked what it unlinked
        try:
            by_layer: dict[int, list[TLoraModule]] = defaultdict(list)
            for link in self.links:
                by_layer[id(base_layer(link.module))].append(link.module)
            by_key: dict[tuple, list[list[TLoraModule]]] = defaultdict(list)
            for layer_modules in by_layer.values():
                weight = base_layer(layer_modules[0]).weight
                signature = tuple((self.group_of[id(module)], module.lora_dim) for module in layer_modules)
                by_key[(weight.device, weight.dtype, tuple(weight.shape), signature)].append(layer_modules)
            for (*_, signature), members in by_key.items():
                self.stacks.append(FoldStack(members, signature))
        except BaseException:
            self._unfold_all()
            raise
        self.placement = {
            id(layer): (stack, index) for stack in self.stacks for index, layer in enumerate(stack.layers)
        }
        logger.debug(
            "T-LoRA fold: %d layers in %d stacks (%d by the fused kernel), %.2f GiB extra.",
            len(modules), len(self.stacks), sum(stack.fused is not None for stack in self.stacks),
            self.extra_memory_bytes / 2**30,
        )

    @property
    def name(self) -> str:
        return "fold+low_memory" if self.evicted is not None else "fold"

    @property
    def mask_dtype(self) -> torch.dtype:
        if self.stacks:
            return self.stacks[0].dtype
        return self.evicted.mask_dtype if self.evicted is not None else torch.float32

    @property
    def extra_memory_bytes(self) -> int:
        evicted = self.evicted.extra_memory_bytes if self.evicted is not None else 0
        return super().extra_memory_bytes + evicted

    def set_masks(self, masks: GroupMasks) -> None:
        stacked: dict[tuple, torch.Tensor] = {}
        self._refuse_group_offloading()
        self.sync()
        with torch.no_grad():
            for stack in self.stacks:
                key = (stack.signature, stack.device, stack.dtype)
                if key not in stacked:  # one small mask per kind of stack and call, none per layer
                    stacked[key] = signature_mask(masks, stack.signature).to(stack.device, stack.dtype)
                stack.fold(stacked[key])
        if self.evicted is not None:
            dtype = self.evicted.mask_dtype
            self.evicted.set_masks({group: mask.to(dtype) for group, mask in masks.items()})

    def sync(self, stacks: list[FoldStack] | None = None, dropping: bool = False) -> None:
        """Take in what others did to the weights since the fold last looked: a PEFT LoRA loaded or swapped (its
        layers leave the fold), writes and moves (`FoldStack.take_outside_writes`).

        Args:
            stacks: Only these stacks' writes (a state-dict hook on one layer); None: every stack.
            dropping: The fold is being removed: warn about writes it cannot keep instead of raising.
        """
        with torch.no_grad():
            self._follow_peft(dropping)
            moved = {stack.take_outside_writes(dropping=dropping) for stack in
                     (self.stacks if stacks is None else [s for s in stacks if s in self.stacks])}
        moved.discard(None)
        # One move is taken in stack by stack where a state-dict hook syncs one layer's stack: say it once.
        if moved and not dropping and moved != {self._move_announced}:
            device, dtype = self._move_announced = next(iter(moved))
            logger.warning(
                "T-LoRA fold: the denoiser's weights moved to %s/%s after enable_tlora; the fold's copy of the base "
                "weights and its factors followed them (a one-off copy, which pipe.to(...) before enabling avoids).",
                device, dtype,
            )

    def _watch_state(self, layer: nn.Module) -> list:
        """`state_dict()` gives W0 (not W0 + the last call's delta: `save_pretrained` saves the base), and
        `load_state_dict` writes onto W0, so what it loads becomes the new W0 exactly, as soon as it is loaded."""

        def placed() -> tuple[FoldStack, int] | tuple[None, None]:
            return self.placement.get(id(layer), (None, None))

        def give_base(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
            stack, index = placed()
            self.sync([stack] if stack is not None else [])
            stack, index = placed()  # a PEFT LoRA may have taken the layer out of the fold just now
            key = prefix + "weight"
            if key not in state_dict:
                return
            if isinstance(state_dict[key], nn.Parameter):  # keep_vars=True hands out the Parameter itself
                if stack is not None:
                    stack.unfold()
            else:
                state_dict[key] = stack.base[index] if stack is not None else layer.weight.detach()

        def load_onto_base(*args) -> None:
            stack, _ = placed()
            self.sync([stack] if stack is not None else [])
            stack, _ = placed()
            if stack is not None:
                stack.unfold()

        def adopt_loaded(*args) -> None:
            stack, _ = placed()
            self.sync([stack] if stack is not None else [])

        return [
            layer.register_state_dict_post_hook(give_base),
            layer.register_load_state_dict_pre_hook(load_onto_base),
            layer.register_load_state_dict_post_hook(adopt_loaded),
        ]

    def clear_masks(self) -> None:
        """Nothing to fold back: the next call refolds, and `remove()` restores W0."""
        if self.evicted is not None:
            self.evicted.clear_masks()

    def _refuse_group_offloading(self) -> None:
        """Group offloading applied after the fold with CUDA streams or a disk path keeps its own copies of the
        weights, taken when it was applied, and its layers run on those, not on the fold's: an error, before
        anything runs. (Without either it moves the weights themselves, which the fold follows.)"""
        denoiser = self.denoiser_ref()
        if not keeps_weight_copies(denoiser):
            return
        held = ("held W0 plus the T-LoRA delta of the last call" if any(s.folded_mask is not None for s in self.stacks)
                else "held the base weights")
        raise TLoRAError(
            f"Group offloading with streams or a disk path was applied to {type(denoiser).__name__} after "
            f"enable_tlora chose mode 'fold'; its copies of the weights {held} when it was applied. Apply group "
            "offloading before enable_tlora / load_tlora (mode='auto' then runs 'low_memory', which never writes the "
            "weights): call disable_tlora(pipe), reload or re-apply the offloading from the base weights, then enable "
            "T-LoRA."
        )

    # -- PEFT LoRAs loaded after enabling -----------------------------------------------------------
    def _peft_adapters(self) -> tuple[tuple[str, object], ...]:
        """The PEFT adapters diffusers has loaded into the denoiser (`load_lora_weights`): (name, config) pairs."""
        denoiser = self.denoiser_ref()
        config = denoiser.__dict__.get("peft_config") if denoiser is not None else None
        return tuple(config.items()) if isinstance(config, dict) else ()

    def _follow_peft(self, dropping: bool = False) -> None:
        """Once per change of the loaded PEFT adapters: folded layers PEFT now wraps go to the `"low_memory"` mode.

        A change is a new config object, not only a new name: diffusers names the next LoRA `default_0` again
        after `unload_lora_weights`."""
        adapters = self._peft_adapters()
        if len(adapters) == len(self.peft_adapters) and all(
            name == seen_name and config is seen_config
            for (name, config), (seen_name, seen_config) in zip(adapters, self.peft_adapters)
        ):
            return
        self.peft_adapters = adapters
        wrappers = peft_wrapped_layers(self.denoiser_ref())
        leaving = [module for module in self.modules if id(base_layer(module)) in wrappers]
        if not leaving:
            return
        for stack in self.stacks:
            stack.take_outside_writes(skip=frozenset(wrappers), dropping=dropping)
            stack.keep_fused_peft(wrappers)
        staying = [module for module in self.modules if id(base_layer(module)) not in wrappers]
        evicted = leaving + (self.evicted.modules if self.evicted is not None else [])
        self._unfold_all()
        if self.evicted is not None:
            self.evicted.remove()
        self._fold(staying)
        self.evicted = LowMemoryMode(by_group(evicted, self.group_of))
        logger.info("T-LoRA fold: a PEFT LoRA wraps %d folded layers; they now run beside their weights "
                    "(low_memory), so fusing or unfusing it writes their own weights.", len(leaving))

    def refresh(self) -> None:
        for stack in self.stacks:
            stack.refresh()
        if self.evicted is not None:
            self.evicted.refresh()

    def training_routes(self) -> list[TrainingRoute]:
        """Training calls reach the folded layers' modules again and compute with W0, not the folded weights."""
        self._refuse_group_offloading()
        self.sync()
        links = {id(link.module): link for link in self.links}
        routes = self.evicted.training_routes() if self.evicted is not None else []
        for stack in self.stacks:
            stack.enter_training()
            for index, modules in enumerate(stack.layer_modules):
                for position, module in enumerate(modules):
                    # The innermost module adds to W0; each other one to the module inside it, relinked by then.
                    if position or stack.trains_base:
                        base_forward = chained_forward(module)
                    else:
                        base_forward = stack.original_forward(index)
                    routes.append(TrainingRoute(module, base_forward, links[id(module)], module.bypass_mode))
        return routes

    def leave_training(self) -> None:
        for stack in self.stacks:
            stack.leave_training()
        if self.evicted is not None:
            self.evicted.leave_training()

    def remove(self) -> None:
        """Give the layers their base weights, with what others wrote since the last call taken in."""
        self.sync(dropping=True)
        while self._state_hooks:
            self._state_hooks.pop().remove()
        self._unfold_all()
        if self.evicted is not None:
            self.evicted.remove()
            self.evicted = None

    def _unfold_all(self) -> None:
        """Every stack's layers get their weights back, and LyCORIS its chains."""
        with torch.no_grad():
            for stack in self.stacks:
                stack.restore()
        while self.links:  # the reverse of the unlinking order, which gives back LyCORIS's chains exactly
            self.links.pop().relink()
        self.stacks = []
        self.placement = {}
