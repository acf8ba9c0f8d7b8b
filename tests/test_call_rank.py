"""The rank of a call, chosen from plain tensors and a scheduler (no denoiser), against LyCORIS's own mask."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from conftest import lycoris_rank
from tlora_hooks import TLoRAError
from tlora_hooks.call_rank import CallRank, RankTable, snap
from tlora_hooks.conventions import ConventionChoice, row_for
from tlora_hooks.schedule import RankSchedule

CPU = torch.device("cpu")


class Chooser:
    """A denoiser's CallRank (the built-in convention row of its class, as enable_tlora uses it) with one adapter's
    RankTable."""

    def __init__(self, denoiser_class: str, schedule: RankSchedule) -> None:
        self.call_rank = CallRank(denoiser_class, ConventionChoice(row_for(denoiser_class)))
        self.table = RankTable(schedule)
        self.schedule = schedule

    def mask(self, value, scheduler, dtype=torch.float32):
        (mask,) = self.call_rank.masks(value, scheduler, {0: self.table}, CPU, dtype).values()
        return mask

    def sample_masks(self, value, scheduler, batch):
        (masks,) = self.call_rank.sample_masks(value, scheduler, {0: self.table}, CPU, batch).values()
        return masks


def call_rank(denoiser_class: str, max_rank: int, min_rank: int = 1, alpha: float = 1.0) -> Chooser:
    return Chooser(denoiser_class, RankSchedule(max_rank, min_rank, alpha))


def rank_of(chooser: Chooser, value, scheduler) -> int:
    mask = chooser.mask(value, scheduler)
    assert mask.shape == (1, chooser.schedule.max_rank)
    return int(mask.sum())


def flow_scheduler(steps: int = 8) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def test_flux_bf16_t_over_1000_snaps_to_each_scheduler_timestep():
    """FluxPipeline passes t cast to the latents' bf16, divided by 1000; the rank is that of int(t) itself."""
    scheduler = flow_scheduler()
    chooser = call_rank("FluxTransformer2DModel", max_rank=1000)
    unsnapped = 0
    for t in scheduler.timesteps:
        received = t.to(torch.bfloat16).reshape(1) / 1000
        assert rank_of(chooser, received, scheduler) == lycoris_rank(float(t), 1000, 1000)
        unsnapped += lycoris_rank(float(received.float()) * 1000, 1000, 1000) != lycoris_rank(float(t), 1000, 1000)
    assert unsnapped, "bf16 rounding must move some step's rank, or this test shows nothing"


def test_per_token_timesteps_take_the_noisiest_token():
    """Wan 2.2 TI2V: conditioning tokens get 0, the generated ones carry t."""
    scheduler = flow_scheduler(4)
    chooser = call_rank("WanTransformer3DModel", max_rank=8)
    t = scheduler.timesteps[1]
    per_token = torch.full((2, 3), float(t))
    per_token[:, 0] = 0.0
    assert rank_of(chooser, per_token, scheduler) == lycoris_rank(float(t), 1000, 8)
    assert lycoris_rank(float(per_token.mean()), 1000, 8) != lycoris_rank(float(t), 1000, 8) != 8, "min/mean differ"


def test_nan_counts_as_pure_noise_and_warns_once(caplog):
    chooser = call_rank("UNet2DConditionModel", max_rank=8, min_rank=2)
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        assert rank_of(chooser, torch.tensor(float("nan")), None) == lycoris_rank(1000, 1000, 8, 2) == 2
        assert rank_of(chooser, torch.tensor(float("nan")), None) == 2
    assert sum("outside [0, 1000]" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize("value, clamped_to", [(-5.0, 0), (1500.0, 1000), (1e9, 1000)])
def test_out_of_range_values_are_clamped_to_the_schedule(value, clamped_to):
    chooser = call_rank("UNet2DConditionModel", max_rank=8, min_rank=1, alpha=0.5)
    assert rank_of(chooser, torch.tensor(value), None) == lycoris_rank(clamped_to, 1000, 8, 1, 0.5)


def test_a_value_from_another_schedule_is_used_as_received():
    """A from_pipe'd pipeline with its own scheduler shares the denoiser: its exact integer t must not be moved to
    the nearest step of the scheduler enable_tlora saw."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    assert 666 not in scheduler.timesteps.tolist()
    chooser = call_rank("UNet2DConditionModel", max_rank=1000)
    assert rank_of(chooser, torch.tensor(666), scheduler) == lycoris_rank(666, 1000, 1000)
    nearest = min(scheduler.timesteps.tolist(), key=lambda step: abs(step - 666))
    assert lycoris_rank(nearest, 1000, 1000) != lycoris_rank(666, 1000, 1000)


def test_the_mask_is_built_in_the_requested_dtype():
    chooser = call_rank("UNet2DConditionModel", max_rank=8)
    mask = chooser.mask(torch.tensor(500), None, torch.bfloat16)
    assert mask.dtype == torch.bfloat16 and mask.shape == (1, 8)
    assert torch.equal(mask.float()[0], torch.arange(8).lt(lycoris_rank(500, 1000, 8)).float())


def test_snap_and_masks_work_per_sample():
    """The steps after the reduction are elementwise, so one timestep per sample gives one mask row per sample."""
    scheduler = flow_scheduler()
    chooser = call_rank("FluxTransformer2DModel", max_rank=1000)
    steps = scheduler.timesteps
    received = steps.to(torch.bfloat16) / 1000  # one value per sample
    row = row_for("FluxTransformer2DModel")
    timesteps = snap(row.to_timestep(received.float()), received, row, scheduler, 1000)
    masks = chooser.table.masks(timesteps, 1000, torch.float32)
    assert masks.shape == (len(steps), 1000)
    expected = [lycoris_rank(float(t), 1000, 1000) for t in steps]
    assert masks.sum(dim=1).long().tolist() == expected
    assert expected != [lycoris_rank(float(value) * 1000, 1000, 1000) for value in received.float()], "unsnapped"


# -- training calls: one mask row per sample -----------------------------------------------------------------------
def sample_ranks(chooser: Chooser, value, batch: int, scheduler=None) -> list[int]:
    masks = chooser.sample_masks(value, scheduler, batch)
    assert masks.dtype == torch.float32 and masks.shape[1] == chooser.schedule.max_rank
    return masks.sum(dim=1).long().tolist()


def test_flux_training_timesteps_over_1000_give_the_rank_of_int_t_for_every_whole_step():
    """`timestep=timesteps / 1000` in fp32: 251 / 1000 * 1000 is 250.99998 in float32, but its rank is int(251)'s."""
    whole = torch.arange(1001, dtype=torch.float32)
    chooser = call_rank("FluxTransformer2DModel", max_rank=1000)
    assert sample_ranks(chooser, whole / 1000, 1001) == [lycoris_rank(int(t), 1000, 1000) for t in whole.tolist()]
    assert ((whole / 1000) * 1000).floor().ne(whole).any(), "float32 rounding must move a step, or this shows nothing"
    drawn = torch.tensor([437.6, 12.3, 999.9])
    assert sample_ranks(chooser, drawn / 1000, 3) == [lycoris_rank(int(t), 1000, 1000) for t in (437.6, 12.3, 999.9)]


def test_training_timesteps_are_not_snapped_to_the_inference_schedule():
    scheduler = flow_scheduler(4)
    chooser = call_rank("FluxTransformer2DModel", max_rank=1000)
    t = float(scheduler.timesteps[1]) + 7.5
    assert sample_ranks(chooser, torch.tensor([t]) / 1000, 1, scheduler) == [lycoris_rank(int(t), 1000, 1000)]


def test_per_token_training_timesteps_reduce_per_sample():
    """Wan 2.2 TI2V: (B, tokens), conditioning tokens at 0; each sample's rank is its noisiest token's."""
    chooser = call_rank("WanTransformer3DModel", max_rank=8)
    per_token = torch.tensor([[0.0, 999.0, 999.0], [0.0, 400.0, 400.0], [0.0, 50.0, 50.0]])
    assert sample_ranks(chooser, per_token, 3) == [lycoris_rank(t, 1000, 8) for t in (999, 400, 50)]


@pytest.mark.parametrize("value", [torch.tensor(400), torch.tensor([400]), torch.tensor([[0, 400, 400]]), 400])
def test_one_training_timestep_gives_one_row_for_the_whole_batch(value):
    chooser = call_rank("UNet2DConditionModel", max_rank=8)
    assert sample_ranks(chooser, value, 4) == [lycoris_rank(400, 1000, 8)]


@pytest.mark.parametrize("shape", [(3,), (2, 5), (0,)])
def test_a_training_timestep_neither_one_nor_per_sample_raises(shape):
    chooser = call_rank("UNet2DConditionModel", max_rank=8)
    with pytest.raises(TLoRAError, match="batch has 4 samples"):
        chooser.sample_masks(torch.full(shape, 400), None, 4)
