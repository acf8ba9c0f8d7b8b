"""The one in-memory form every file format is read into: T-LoRA modules by LyCORIS name and the training settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# LyCORIS's names of a T-LoRA module's frozen base buffers, in `BaseTerms`' order.
BASE_TERM_NAMES = ("base_q", "base_p", "base_lambda")


@dataclass
class BaseTerms:
    """A T-LoRA module's frozen base (LyCORIS `base_q`, `base_p`, `base_lambda`), subtracted under the same mask."""

    q: torch.Tensor
    p: torch.Tensor
    lam: torch.Tensor
    # True where the format has no base term (official Vanilla/FLUX layers, a LoRA under the mask): all zeros.
    zero: bool = False


@dataclass
class ModuleWeights:
    """One module: delta(mask) = alpha / rank * (P diag(lam * mask) Q - P_base diag(lam_base * mask) Q_base).

    `q` is (rank, in) or a (rank, in, 1, ...) 1x1 conv, `p` is (out, rank) or (out, rank, 1, ...), `lam` is (1, rank).
    `base` None means the file did not save it: rebuild it from the base weight as LyCORIS does.
    """

    q: torch.Tensor
    p: torch.Tensor
    lam: torch.Tensor
    alpha: float
    base: BaseTerms | None = None
    source_key: str = ""

    @property
    def rank(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def out_features(self) -> int:
        return self.p.shape[0]


@dataclass(frozen=True)
class TrainingSettings:
    """What the file says about how it was trained; None where it is silent or its value cannot be used."""

    linear_dim: int | None = None
    linear_alpha: float | None = None
    min_rank: int | None = None
    alpha: float | None = None
    preset: Any = None
    # Settings the metadata records but in a form that cannot be used: field name -> what is wrong, naming the key.
    invalid: dict[str, str] = field(default_factory=dict)


@dataclass
class TLoraFile:
    """A T-LoRA file, read: its modules by LyCORIS name (`lycoris_<module path with . -> _>`)."""

    path: str
    format: str
    modules: dict[str, ModuleWeights]
    settings: TrainingSettings = field(default_factory=TrainingSettings)
    metadata: dict[str, str] = field(default_factory=dict)
    # Keys the format's own trainer created but never used in its forward; dropped with a log line.
    unused_keys: list[str] = field(default_factory=list)
    # Keys that belong to no T-LoRA module (another adapter type in the same file); reported, never loaded.
    unknown_keys: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted({module.rank for module in self.modules.values()})

    @property
    def base_source(self) -> str:
        """Where the base terms come from: "saved" in the file, "rebuilt" from the model's weights, "none" (the
        format has none), or "mixed"."""
        kinds = {
            "rebuilt" if module.base is None else "none" if module.base.zero else "saved"
            for module in self.modules.values()
        }
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def scales(self) -> list[float]:
        return sorted({round(module.alpha / module.rank, 6) for module in self.modules.values()})
