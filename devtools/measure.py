"""What the tests assert and the benchmarks report about a call: dispatched operators, output differences."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # torch has no public path to it


class KernelCounter(TorchDispatchMode):
    """Counts the operators a piece of code dispatches, by name; views are left out (they launch no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return self.ops.total()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket is not torch.ops.aten._unsafe_view:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |out - reference|, relative to the reference's largest magnitude, computed in fp32."""
    reference = reference.float()
    return ((out.float() - reference).abs().max() / reference.abs().max()).item()
