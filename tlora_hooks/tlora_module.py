"""LyCORIS's T-LoRA module built without its per-module SVD, for modules whose every value comes from a file.

Imported only when a module is built, so importing the library does not import LyCORIS.
"""

from __future__ import annotations

from lycoris.modules.tlora import TLoraModule
from torch import nn


class TLoraModuleWithoutSvd(TLoraModule):
    """LyCORIS's TLoraModule, with its forward and mask API, built without its per-module SVD (and `gc.collect()`):
    `load_tlora` fills it from the file or the batched rebuild."""

    def _initialize_from_svd(self, org_module: nn.Module, in_dim: int, out_dim: int, flat_in_dim: int) -> None:
        """Keep the freshly allocated tensors; the file (or the batched rebuild) provides every value."""
