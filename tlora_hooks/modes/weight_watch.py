"""Noticing that someone else wrote a layer's weight: what the fold checks before every call, cheaply.

A write through the Parameter (`load_state_dict`, an optimizer step, `weight.mul_()` under no_grad) bumps its
version counter; `weight.data = ...` (`pipe.to`, PEFT's safe merge) changes its storage and keeps the version;
`layer.weight = ...` (`load_state_dict(assign=True)`, quantization) replaces the Parameter, with its own storage. So
a moved weight (new storage, same Parameter and version) is told apart from a written one. Two integer comparisons
per layer per call, no device work. A write through `.data` in place (PEFT's default merge, diffusers'
`EMAModel.copy_to`) bumps nothing and cannot be seen: the fold learns of PEFT from the denoiser's `peft_config`.
"""

from __future__ import annotations

from operator import attrgetter, itemgetter

import torch
from torch import nn

from .factors import FLOAT_WEIGHTS

_version = attrgetter("_version")
_weight = itemgetter("weight")


def weight_of(layer: nn.Module):
    return layer._parameters.get("weight")


def storage_pointer(weight) -> int | None:
    """Where the weight's values live; None for what has no plain storage (meta, quantized tensor subclasses)."""
    try:
        return weight.data_ptr()
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def restorable(weight) -> bool:
    """A weight that can take W0 back: a plain (not quantized, not meta, not fp8) floating-point tensor, float64
    (`pipe.to(torch.float64)`) included."""
    return (
        isinstance(weight, torch.Tensor)
        and type(weight.detach()) is torch.Tensor
        and weight.device.type != "meta"
        and weight.dtype in (*FLOAT_WEIGHTS, torch.float64)
    )


def plain_float(weight) -> bool:
    """A weight the fold can write: a restorable one in a dtype the fold folds."""
    return restorable(weight) and weight.dtype in FLOAT_WEIGHTS


def _pointers(params: list) -> list[int | None]:
    try:
        return list(map(torch.Tensor.data_ptr, params))  # one C call per weight, the common case
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return list(map(storage_pointer, params))


class WeightWatch:
    """Each layer's weight as last seen: the Parameter object, its version counter and its storage."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self._parameter_dicts = [layer._parameters for layer in layers]
        self.remember()

    def remember(self) -> None:
        self.params = list(map(_weight, self._parameter_dicts))
        self.versions = list(map(_version, self.params))
        self.pointers = _pointers(self.params)

    def changed(self) -> list[int]:
        """Indices of the layers whose weight was written, reassigned or replaced since `remember()`."""
        # A new Parameter object has a storage or a version counter of its own, unless it shares the old one's
        # (`nn.Parameter(weight.detach())`): a view of the same stack, which the fold keeps writing, so harmless.
        params = list(map(_weight, self._parameter_dicts))
        if list(map(_version, params)) == self.versions and _pointers(params) == self.pointers:
            return []
        return [index for index in range(len(self.layers)) if self.changed_at(index)]

    def written_at(self, index: int) -> bool:
        """Whether the layer's weight was written in place or replaced since `remember()` (not merely moved)."""
        param = weight_of(self.layers[index])
        return param is not self.params[index] or param._version != self.versions[index]

    def changed_at(self, index: int) -> bool:
        param = weight_of(self.layers[index])
        return (
            param is not self.params[index]
            or param._version != self.versions[index]
            or storage_pointer(param) != self.pointers[index]
        )
