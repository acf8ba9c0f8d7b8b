"""LyCORIS's `TLoraModule`, with its forward and mask API, minus its per-module SVD for the default initialisation.

`TLoraModule.__init__` runs one SVD and one `gc.collect()` per module. For the default initialisation (the principal
singular triplets of the layer's own weight), this subclass skips both and leaves the values to the caller: one batched
decomposition for all modules (`create_tlora`), or the file and the batched rebuild (`load_tlora`). Every other
initialisation (`use_data_init=False`, `sig_type` "last" or "middle") runs LyCORIS's own code, unchanged.

Its state dict is LyCORIS's (`q_layer.weight`, `p_layer.weight`, `lambda_layer`, `alpha`) plus the base terms where
the layer's weight cannot reproduce them, so a file or checkpoint written from it reloads exactly.

Imported only when a module is built, so importing the library does not import LyCORIS.
"""

from __future__ import annotations

from lycoris.modules.tlora import TLoraModule
from torch import nn

from .formats.state import BASE_TERM_NAMES


class TLoraModuleWithoutSvd(TLoraModule):
    """A LyCORIS T-LoRA module whose principal data initialisation is left to a batched decomposition.

    `base_from_weights` says whether the base terms are the principal singular triplets of the wrapped weight (so a
    loader rebuilds them from the weights, as LyCORIS does); False for random or non-principal initialisations and for
    base terms read from a file.
    """

    base_from_weights: bool

    def _initialize_from_svd(self, org_module: nn.Module, in_dim: int, out_dim: int, flat_in_dim: int) -> None:
        self.base_from_weights = self.use_data_init and self.sig_type == "principal"
        if not self.base_from_weights:
            super()._initialize_from_svd(org_module, in_dim, out_dim, flat_in_dim)

    def custom_state_dict(self) -> dict:
        state = super().custom_state_dict()
        if not self.base_from_weights:
            state.update({name: getattr(self, name) for name in BASE_TERM_NAMES})
        return state

    def load_weight_prehook(self, state_dict: dict, prefix: str, *args) -> None:
        """A state dict without base terms (LyCORIS's layout) keeps the module's own, as LyCORIS's loader rebuilds
        them rather than reading them: loading never fails for their absence."""
        for name in BASE_TERM_NAMES:
            state_dict.setdefault(prefix + name, getattr(self, name))
