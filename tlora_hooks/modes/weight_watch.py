"""Noticing that someone else wrote a layer's weight: what the fold checks before every call, cheaply.

A write through the Parameter (`load_state_dict`, an optimizer step, `weight.mul_()` under no_grad) bumps its
version counter; `weight.data = ...` (`pipe.to`, PEFT's safe merge) changes its storage; `layer.weight = ...`
(`load_state_dict(assign=True)`, quantization) replaces the Parameter. Three integer or identity comparisons per
layer, no device work. A write through `.data` in place (PEFT's default merge) bumps nothing: the fold learns of
PEFT from the denoiser's `peft_config` instead.
"""

from __future__ import annotations

from operator import attrgetter, is_not

from torch import nn

_version = attrgetter("_version")


def weight_of(layer: nn.Module):
    return layer._parameters.get("weight")


def storage_pointer(weight) -> int | None:
    """Where the weight's values live; None for what has no plain storage (meta, quantized tensor subclasses)."""
    try:
        return weight.data_ptr()
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


class WeightWatch:
    """Each layer's weight as last seen: the Parameter object, its version counter and its storage."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.remember()

    def remember(self) -> None:
        self.params = [weight_of(layer) for layer in self.layers]
        self.versions = list(map(_version, self.params))
        self.pointers = list(map(storage_pointer, self.params))

    def changed(self) -> list[int]:
        """Indices of the layers whose weight was written, reassigned or replaced since `remember()`."""
        params = list(map(weight_of, self.layers))
        if (
            not any(map(is_not, params, self.params))
            and list(map(_version, params)) == self.versions
            and list(map(storage_pointer, params)) == self.pointers
        ):
            return []
        return [index for index in range(len(self.layers)) if self.changed_at(index, params[index])]

    def changed_at(self, index: int, param=None) -> bool:
        param = weight_of(self.layers[index]) if param is None else param
        return (
            param is not self.params[index]
            or param._version != self.versions[index]
            or storage_pointer(param) != self.pointers[index]
        )
