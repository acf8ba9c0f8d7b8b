"""Where the rank of a denoiser call is chosen: the value the call received -> the scheduler's noise-ward timestep
(through the convention row) -> snapped to `scheduler.timesteps` -> each adapter's rank -> its mask, all on the device.

Plain tensors and a scheduler in, one mask per adapter out; the hooks only read the call and hand the masks to the
mode. The timestep is read and converted once per call (`CallRank`); each adapter's schedule and strength then give
its mask (`RankTable`). A training call (`CallRank.sample_masks`) takes the same road without the snap, one row per
sample: the received values -> the noise-ward timesteps (the same convention row) -> reduced over each sample's
tokens -> int(t) -> the ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from .conventions import REDUCTIONS, ConventionChoice, TimestepConvention
from .errors import TLoRAError
from .logging import get_logger
from .schedule import RankSchedule, masks_by_rank

logger = get_logger(__name__)

DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
# Below this (in timestep units, 0..num_train_timesteps) two schedules are the same schedule: float32
# arithmetic in a convention's map may move an exact received value by this much.
SNAP_FLOOR = 1e-3


def scheduler_timesteps(scheduler: Any) -> torch.Tensor | None:
    """The scheduler's current `timesteps` as a 1-D tensor, or None before `set_timesteps`."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    timesteps = torch.as_tensor(timesteps)
    return timesteps.reshape(-1) if timesteps.numel() else None


def num_train_timesteps(scheduler: Any) -> int:
    """T in the rank formula: the scheduler's `num_train_timesteps`, as SimpleTuner passes it."""
    config = getattr(scheduler, "config", None)
    value = getattr(config, "num_train_timesteps", None) if config is not None else None
    return int(value) if value else DEFAULT_NUM_TRAIN_TIMESTEPS


def snap(
    timesteps: torch.Tensor, received: torch.Tensor, convention: TimestepConvention, scheduler: Any, max_timestep: int
) -> torch.Tensor:
    """Noise-ward timesteps made valid (NaN -> pure noise, clamped to [0, T]) and snapped, each to the nearest
    `scheduler.timesteps` entry, where the rounding of the received dtype explains the distance (bf16 t/1000).

    A value from another scheduler (a from_pipe'd pipeline sharing this denoiser) is used as received.
    """
    timesteps = torch.nan_to_num(timesteps, nan=float(max_timestep)).clamp(0, max_timestep)
    schedule = scheduler_timesteps(scheduler) if scheduler is not None else None
    if schedule is None:
        return timesteps
    schedule = convention.schedule_to_timestep(schedule.to(timesteps.device, torch.float32))
    distance, nearest = (schedule.reshape(-1, *[1] * timesteps.ndim) - timesteps).abs().min(dim=0)
    rounding = distance <= _rounding_tolerance(convention, received)
    return torch.where(rounding, _take(schedule, nearest).reshape(nearest.shape), timesteps)


class RankTable:
    """One adapter's schedule and strength as device tables: the rank of each integer timestep, and the mask of each
    rank times the strength (the T-LoRA delta is linear in the mask, so a scaled mask scales the delta exactly, in
    every mode). Built once per device, T and mask dtype; a new strength rebuilds only these small tables."""

    def __init__(self, schedule: RankSchedule, weight: float = 1.0) -> None:
        self.schedule = schedule
        self.weight = weight
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_weight(self, weight: float) -> None:
        if weight != self.weight:
            self.weight = weight
            self._tables.clear()

    def masks(self, timesteps: torch.Tensor, max_timestep: int, dtype: torch.dtype) -> torch.Tensor:
        """One mask row per valid noise-ward timestep: (N, max_rank) for N timesteps, (1, max_rank) for a 0-d one."""
        rank_by_timestep, mask_by_rank = self._tables_for(timesteps.device, max_timestep, dtype)
        index = timesteps.floor().long().clamp(0, max_timestep)  # int(t), as SimpleTuner's pipelines take it
        return _take(mask_by_rank, _take(rank_by_timestep, index))

    def clear(self) -> None:
        """Free the device tables (the hook was removed)."""
        self._tables.clear()

    def _tables_for(
        self, device: torch.device, max_timestep: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, max_timestep, dtype)
        if key not in self._tables:
            ranks = torch.tensor(self.schedule.rank_table(max_timestep), dtype=torch.long, device=device)
            masks = masks_by_rank(self.schedule.max_rank, device=device) * self.weight
            self._tables[key] = (ranks, masks.to(dtype))
        return self._tables[key]


class CallRank:
    """Reads the timestep of every call of one denoiser once, and gives each adapter the mask its own schedule and
    strength choose there; keeps the once-per-enable warning."""

    def __init__(self, name: str, convention: ConventionChoice) -> None:
        self.name = name
        self.convention = convention
        self._range_checks_left = 1  # accelerator values: one host sync per enable, on the first call

    def masks(
        self, value: Any, scheduler: Any, tables: dict[int, RankTable], device: torch.device, dtype: torch.dtype
    ) -> dict[int, torch.Tensor]:
        """Each table's (1, max_rank) mask for a received timestep value, by its key (the adapter's mask group),
        built without leaving the device."""
        timestep, max_timestep = self.scheduler_timestep(value, scheduler, tables)
        return {
            key: table.masks(timestep, max_timestep, dtype).to(device, non_blocking=True)
            for key, table in tables.items()
        }

    def scheduler_timestep(
        self, value: Any, scheduler: Any, tables: dict[int, RankTable]
    ) -> tuple[torch.Tensor, int]:
        """The call's noise-ward timestep on the scheduler's scale (a 0-d tensor, per-token values reduced by the
        row's reduction) snapped to its schedule, and T (`num_train_timesteps`). `tables`: for the warning."""
        received = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
        convention = self.convention.for_scheduler(scheduler)  # EDM / continuous schedulers refine the row
        timesteps = convention.to_timestep(received.to(torch.float32))
        max_timestep = num_train_timesteps(scheduler)
        self._warn_if_out_of_range(timesteps, max_timestep, tables)
        timestep = REDUCTIONS[convention.reduce](timesteps.reshape(-1))
        return snap(timestep, received, convention, scheduler, max_timestep), max_timestep

    def sample_masks(
        self, value: Any, scheduler: Any, tables: dict[int, RankTable], device: torch.device, batch: int
    ) -> dict[int, torch.Tensor]:
        """The masks of a training call, by table key: one fp32 row per sample, (batch, max_rank), or (1, max_rank)
        when one timestep serves the whole batch (a 0-d value, or a leading dim of 1).

        No snapping: training draws timesteps anywhere, not on `scheduler.timesteps`. The row's map still applies
        (Flux's t/1000 back to t); per-token values reduce per sample (the row's reduction over that sample's
        tokens); the rank is that of int(t), as SimpleTuner's `apply_tlora_timestep_mask` takes it, after values
        within `SNAP_FLOOR` of a whole step are read as that step (the float32 rounding of t/1000 * 1000).
        """
        received = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
        rows = sample_rows(received, batch, self.name)
        convention = self.convention.for_scheduler(scheduler)
        timesteps = convention.to_timestep(received.to(torch.float32)).reshape(rows, -1)
        max_timestep = num_train_timesteps(scheduler)
        self._warn_if_out_of_range(timesteps, max_timestep, tables)
        per_sample = REDUCTIONS[convention.reduce](timesteps, dim=1)
        per_sample = torch.nan_to_num(per_sample, nan=float(max_timestep)).clamp(0, max_timestep)
        whole = per_sample.round()
        per_sample = torch.where((per_sample - whole).abs() <= SNAP_FLOOR, whole, per_sample)
        return {
            key: table.masks(per_sample, max_timestep, torch.float32).to(device, non_blocking=True)
            for key, table in tables.items()
        }

    def _warn_if_out_of_range(
        self, timesteps: torch.Tensor, max_timestep: int, tables: dict[int, RankTable]
    ) -> None:
        """Warn once per enable when a timestep lies outside [0, T] (it is clamped, so the rank stays valid).

        Host values are checked on every call until one warns; values on an accelerator only on the first
        call after enabling, since reading them back would synchronise the device on every step.
        """
        if self._range_checks_left <= 0:
            return
        if timesteps.device.type != "cpu":
            self._range_checks_left -= 1
        low, high = (value.item() for value in torch.aminmax(timesteps))  # NaN propagates, and compares False
        if not (0 <= low and high <= max_timestep):
            self._range_checks_left = 0
            bad = low if not low >= 0 else high  # NaN or negative, else too large
            ranges = ", ".join(f"[{t.schedule.min_rank}, {t.schedule.max_rank}]" for t in tables.values())
            logger.warning(
                "T-LoRA %s received timestep %s on the scheduler's scale, outside [0, %d]; it is clamped, so the rank "
                "stays in %s%s. If a stock pipeline passed it, its timestep convention is wrong: pass timestep_fn= to "
                "enable_tlora. (Warned once per enable_tlora.)",
                self.name, bad, max_timestep, ranges, " (one per adapter)" if len(tables) > 1 else "",
            )


def sample_rows(received: torch.Tensor, batch: int, name: str) -> int:
    """How many mask rows a training call's timestep gives: 1 for one value (0-d, or a leading dim of 1) that
    serves every sample, `batch` for one value (or one row of per-token values) per sample; raises otherwise."""
    if received.dim() == 0 or received.shape[0] == 1 and received.numel() > 0:
        return 1
    if received.shape[0] == batch and received.numel() > 0:
        return batch
    raise TLoRAError(
        f"T-LoRA {name}: the timestep has shape {tuple(received.shape)}, so {received.shape[0]} values along its "
        f"first dim, but the batch has {batch} samples (the first dim of the denoiser's `sample` / `hidden_states` "
        f"input). Pass one timestep per sample (shape ({batch},), or ({batch}, tokens) for "
        "per-token timesteps), or one for the whole batch."
    )


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`table[index]` for an index tensor, a 0-d one keeping a leading dim of 1; `table[index]` itself would read
    a 0-d index back to the host (a device synchronisation on every call)."""
    return table.index_select(0, index.reshape(-1))


def _rounding_eps(dtype: torch.dtype) -> float:
    """Relative rounding of a timestep passed in `dtype`; integers are exact."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _rounding_tolerance(convention: TimestepConvention, received: torch.Tensor) -> torch.Tensor:
    """How far the received dtype's rounding can move the noise-ward timestep, through the row's own map.

    A map-aware width: bf16 c_noise (Cosmos 1) or fp16 t/1000 (AuraFlow) move it by different amounts.
    """
    value = received.to(torch.float32)
    eps = _rounding_eps(received.dtype)
    spread = (convention.to_timestep(value * (1 + eps)) - convention.to_timestep(value * (1 - eps))).abs()
    return spread.amax().clamp_min(SNAP_FLOOR)
