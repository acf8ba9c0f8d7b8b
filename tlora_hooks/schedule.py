"""The T-LoRA rank schedule: which ranks are active at a timestep.

r(t) = floor(((T - t) / T) ** alpha * (R - Rmin)) + Rmin, clamped to [Rmin, R].

Pure functions, no module state. The per-timestep table is what the hooks index on the
device, so no host-device synchronisation is needed to pick a rank. Only `masks_by_rank` needs torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import TLoRAError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RankSchedule:
    """The rank schedule an adapter was trained with, validated once.

    Args:
        max_rank: The LyCORIS `linear_dim`: ranks active at t = 0 (clean).
        min_rank: The LyCORIS `tlora_min_rank`: ranks kept at pure noise.
        alpha: The LyCORIS `tlora_alpha`, the exponent of the curve: above 1, ranks come back later as noise falls.
    """

    max_rank: int
    min_rank: int = 1
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank <= 0:
            raise TLoRAError(
                f"max_rank must be a positive integer (the LyCORIS `linear_dim`), got {self.max_rank!r}."
            )
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise TLoRAError(
                f"min_rank must be an integer >= 0 (the LyCORIS `tlora_min_rank`), got {self.min_rank!r}."
            )
        if self.min_rank > self.max_rank:
            raise TLoRAError(
                f"min_rank ({self.min_rank}) is larger than max_rank ({self.max_rank}); "
                "pass the `tlora_min_rank` the adapter was trained with (default 1)."
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TLoRAError(f"alpha must be a number (the LyCORIS `tlora_alpha`), got {self.alpha!r}.")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise TLoRAError(
                f"alpha must be a finite number > 0 (the LyCORIS `tlora_alpha`, default 1.0), got {self.alpha!r}."
            )

    def rank(self, timestep: float, max_timestep: int) -> int:
        """Active ranks at `timestep` on a scale where `max_timestep` is pure noise.

        Args:
            timestep: The timestep on the scheduler's noise-ward scale (0 = clean).
            max_timestep: The pure-noise end of that scale (the scheduler's `num_train_timesteps`).
        """
        return rank_for_timestep(timestep, max_timestep, self.max_rank, self.min_rank, self.alpha)

    def rank_table(self, max_timestep: int) -> list[int]:
        """Rank for every integer timestep 0..max_timestep: a lookup table the hooks index on the device.

        Args:
            max_timestep: The pure-noise end of the scale (the scheduler's `num_train_timesteps`).
        """
        return [self.rank(t, max_timestep) for t in range(max_timestep + 1)]


def rank_for_timestep(
    t: float, max_timestep: int, max_rank: int, min_rank: int = 1, alpha: float = 1.0
) -> int:
    """Number of active ranks at timestep `t`: floor(((T - t) / T) ** alpha * (max_rank - min_rank)) + min_rank.

    Equals `lycoris.modules.tlora.compute_timestep_mask` for every t in [0, T]. Values outside
    [0, T] are clamped, and NaN counts as pure noise, so the result is always in [min_rank, max_rank].

    Args:
        t: The timestep on the scheduler's noise-ward scale (0 = clean, T = pure noise), as training keys it.
        max_timestep: T, the scheduler's `num_train_timesteps` (pure noise).
        max_rank: The LyCORIS `linear_dim`.
        min_rank: The LyCORIS `tlora_min_rank`.
        alpha: The LyCORIS `tlora_alpha`.
    """
    if max_timestep <= 0:
        raise TLoRAError(f"max_timestep must be > 0 (the scheduler's num_train_timesteps), got {max_timestep!r}.")
    t = float(t)
    t = float(max_timestep) if math.isnan(t) else min(max(t, 0.0), float(max_timestep))
    # Same operation order as LyCORIS, so float rounding agrees at the floor boundaries.
    rank = int(((max_timestep - t) / max_timestep) ** alpha * (max_rank - min_rank)) + min_rank
    return min(max(rank, min_rank), max_rank)


def masks_by_rank(
    max_rank: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(max_rank + 1, max_rank) table (float32 unless `dtype` says) whose row r keeps the first r ranks."""
    import torch  # here, so the `schedule` command and the rank formula start without it

    ranks = torch.arange(max_rank + 1, device=device).unsqueeze(1)
    return (torch.arange(max_rank, device=device).unsqueeze(0) < ranks).to(dtype or torch.float32)
