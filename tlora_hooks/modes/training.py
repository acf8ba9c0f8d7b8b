"""Training calls in the fast modes: every module runs the per-sample forward; inference calls run the fast mode.

A fast mode (fold, low_memory, and LyCORIS's forward for the modules they do not take) serves inference as built.
On a training call every module is routed through LyCORIS's forward into `PerSampleForward`. Folded layers compute
with their original weight W0, never with the folded weights: from the fold's copy, which nothing writes in place,
so autograd's saved tensors stay valid (where the base weights train too, from their own weights set to W0).
The routing is switched when calls alternate between training and inference (validation), not on every call, so the
per-call cost of either kind stays where it was. The fast modes' factors snapshot the T-LoRA parameters; every
inference call compares the parameters' version counters (bumped by every in-place update: `optimizer.step()`,
`load_state_dict` such as accelerate's `load_state` on resume, `copy_` under no_grad) with those of the snapshot and
rebuilds the factors when they moved. A write through `.data` bumps nothing and is not seen.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .chain import BypassOverride, ChainLink
from .lycoris import group_mask, set_group_masks
from .per_sample import (
    PerSampleForward,
    SampleMasks,
    clear_sample_masks,
    get_sample_masks,
    set_sample_masks,
)
from .protocol import GroupMasks

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

_version = attrgetter("_version")


@dataclass(frozen=True)
class TrainingRoute:
    """How a training call reaches one module: `base_forward` gives the layer's output without the module's delta;
    `link` is the chain link a fold unlinked (relinked for training); `bypass_mode` is the user's own setting."""

    module: TLoraModule
    base_forward: Callable[[torch.Tensor], torch.Tensor]
    link: ChainLink | None = None
    bypass_mode: bool | None = None


class InstalledRoute:
    """A route in place: the module back in its layer's forward chain, its bypass branch running the per-sample
    forward. `remove()` undoes exactly that."""

    def __init__(self, route: TrainingRoute) -> None:
        self.route = route
        if route.link is not None:
            setattr(route.link.holder, route.link.attribute, route.module.forward)
        self.override = BypassOverride(
            route.module, PerSampleForward(route.module, route.base_forward, dropout=bool(route.bypass_mode))
        )

    def remove(self) -> None:
        self.override.restore()
        link = self.route.link
        if link is not None:
            setattr(link.holder, link.attribute, link.bypassing)


def tlora_parameters(modules: list[TLoraModule]) -> list[torch.nn.Parameter]:
    """The trainable tensors of T-LoRA modules (LyCORIS `weight_list`, less the `alpha` buffer)."""
    return [p for m in modules for p in (m.q_layer.weight, m.p_layer.weight, m.lambda_layer)]


class TrainingMode:
    """A fast mode that also trains: see the module docstring.

    Args:
        inner: The fast mode as built (a `CombinedMode` of fold / low_memory / LyCORIS's forward).
        modules: Every T-LoRA module of the denoiser's active adapters.
        groups: The adapters' LyCORIS mask groups.
    """

    def __init__(self, inner: Any, modules: list[TLoraModule], groups: list[int]) -> None:
        self.inner = inner
        self.modules = modules
        self.groups = groups
        self.parameters = tlora_parameters(modules)
        self._routes: list[InstalledRoute] = []
        self._versions = self._parameter_versions()
        # `load_state_dict(..., assign=True)` (a resume) puts new Parameter objects in place of the ones read here,
        # whose versions then never move: a load marks the parameters to be read again.
        self._reloaded = False
        self._load_hooks = [module.register_load_state_dict_post_hook(self._mark_reloaded) for module in modules]

    # -- what the hooks and the handle read ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def parts(self) -> list:
        return self.inner.parts

    @property
    def mask_dtype(self) -> torch.dtype:
        return self.inner.mask_dtype

    @property
    def extra_memory_bytes(self) -> int:
        return self.inner.extra_memory_bytes

    # -- per call ------------------------------------------------------------------------------------------------
    def set_masks(self, masks: GroupMasks) -> None:
        """An inference call: the fast mode, with factors rebuilt where the parameters changed since they were read
        (training, a resumed checkpoint)."""
        if self._routes:
            self._leave_training()
        self._refresh_if_changed()
        self.inner.set_masks(masks)

    def set_sample_masks(self, masks: GroupMasks) -> None:
        """A training call: every module masks each sample by the rank its own adapter gives it."""
        if not self._routes:
            self._enter_training()
        for group, group_masks in masks.items():
            set_sample_masks(SampleMasks(group_masks), group)

    def clear_masks(self) -> None:
        self._clear_sample_masks()
        if not self._routes:
            self.inner.clear_masks()

    def remove(self) -> None:
        if self._routes:
            self._leave_training()
        self._clear_sample_masks()
        for handle in self._load_hooks:
            handle.remove()
        self.inner.remove()

    def _clear_sample_masks(self) -> None:
        for group in self.groups:
            clear_sample_masks(group)

    # -- gradient checkpointing ----------------------------------------------------------------------------------
    def call_masks(self) -> dict[int, tuple]:
        """What the running call set in each group, for a recompute during backward to set again."""
        return {group: (get_sample_masks(group), group_mask(group)) for group in self.groups}

    @contextmanager
    def replaying(self, call_masks: dict[int, tuple]) -> Iterator[None]:
        """Run with a forward's masks (and the training routing, if that forward trained) set again."""
        previous = self.call_masks()
        if any(sample is not None for sample, _ in call_masks.values()) and not self._routes:
            self._enter_training()
        _install(call_masks)
        try:
            yield
        finally:
            _install(previous)

    # -- routing -------------------------------------------------------------------------------------------------
    def _enter_training(self) -> None:
        """Route every module into the per-sample forward (enable_tlora already refused what it cannot run)."""
        try:
            for route in self._training_routes():
                self._routes.append(InstalledRoute(route))
        except BaseException:
            self._leave_training()
            raise

    def _leave_training(self) -> None:
        while self._routes:
            self._routes.pop().remove()
        for part in self.inner.parts:
            part.leave_training()

    def _training_routes(self) -> list[TrainingRoute]:
        """A route for every module: the fast parts say how to reach theirs; LyCORIS's forward runs the rest."""
        routes = [route for part in self.inner.parts for route in part.training_routes()]
        taken = {id(route.module) for route in routes}
        return routes + [
            TrainingRoute(module, module.org_forward, bypass_mode=module.bypass_mode)
            for module in self.modules
            if id(module) not in taken
        ]

    def _parameter_versions(self) -> tuple[int, ...]:
        return tuple(map(_version, self.parameters))

    def _mark_reloaded(self, module: torch.nn.Module, incompatible_keys: Any) -> None:
        self._reloaded = True

    def _refresh_if_changed(self) -> None:
        if self._reloaded:
            self.parameters, self._reloaded = tlora_parameters(self.modules), False
            self._versions = ()  # whatever their versions, the parameters may be new objects: read them again
        versions = self._parameter_versions()
        if versions != self._versions:
            self.inner.refresh()
            self._versions = versions


def _install(call_masks: dict[int, tuple]) -> None:
    for group, (sample, _) in call_masks.items():
        if sample is None:
            clear_sample_masks(group)
        else:
            set_sample_masks(sample, group)
    set_group_masks({group: lycoris_mask for group, (_, lycoris_mask) in call_masks.items()})
