"""The convention table: its integrity, `register_convention`, `timestep_fn` precedence, scheduler refinement,
refusals, and the once-per-process video warning."""

from __future__ import annotations

import inspect
import logging

import diffusers
import pytest
import torch
from torch import nn

import tiny
from compat_tools import hook_counts
from conftest import lycoris_rank
from tlora_hooks import TLoRAError, api, conventions, enable_tlora, register_convention

# Mochi's rotary embedding asks CPU autocast for float32, which CPU autocast does not do; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


@pytest.fixture
def private_table(monkeypatch):
    """Registrations in a test stay in that test."""
    for table in ("CONVENTIONS", "PIPELINE_CONVENTIONS", "SCHEDULER_CONVENTIONS"):
        monkeypatch.setattr(conventions, table, dict(getattr(conventions, table)))


# -- the table is consistent with diffusers 0.42.1 ---------------------------------------------------------------
def forward_parameters(cls) -> set[str]:
    return set(inspect.signature(cls.forward).parameters)


BUILT_IN_ROWS = sorted(name for name, row in conventions.CONVENTIONS.items() if row.note != "registered by the user")


@pytest.mark.parametrize("name", BUILT_IN_ROWS)
def test_every_class_row_names_a_real_denoiser_parameter(name):
    row = conventions.CONVENTIONS[name]
    assert row.param in forward_parameters(getattr(diffusers, name))
    assert row.note, "every row says why"


def test_pipeline_and_scheduler_rows_name_real_classes():
    for pipeline, denoiser in conventions.PIPELINE_CONVENTIONS:
        assert issubclass(getattr(diffusers, pipeline), diffusers.DiffusionPipeline)
        assert denoiser in conventions.CONVENTIONS
    for match, denoiser in conventions.SCHEDULER_CONVENTIONS:
        scheduler = getattr(diffusers, match.cls)
        assert all(key in inspect.signature(scheduler.__init__).parameters for key, _ in match.config)
        assert denoiser in conventions.CONVENTIONS


def test_maps_send_each_scale_to_the_noise_ward_timestep():
    """Spot values from the research note: what each family passes at pure noise and near clean."""
    c = conventions
    t = torch.tensor
    assert c.times_1000(t([1.0, 0.25])).tolist() == [1000.0, 250.0]  # Flux: t/1000, Cascade: ratio
    assert c.flipped_unit(t([0.0, 0.75])).tolist() == [1000.0, 250.0]  # Lumina2: 1 - t/1000
    assert c.flipped_1000(t([0.0, 725.0])).tolist() == [1000.0, 275.0]  # Mochi: (1 - sigma) * 1000
    sigma = t([80.0, 1.0, 0.002])
    edm = c.c_noise_to_timestep(0.25 * torch.log(sigma))
    torch.testing.assert_close(edm, sigma / (1 + sigma) * 1000)
    torch.testing.assert_close(c.edm_sigma_x1000_to_timestep(sigma * 1000), edm)  # Cosmos 2's scheduler scale
    torch.testing.assert_close(c.trigflow_to_timestep(t([torch.pi / 2, 0.0])), t([1000.0, 0.0]), atol=1e-3, rtol=0)


# -- register_convention, tested with a toy denoiser class ------------------------------------------------------
class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class ToyDenoiser(nn.Module):
    """Receives `noise_level` = 1 - t/1000 in second position, per token: nothing in the table knows it."""

    def __init__(self):
        super().__init__()
        self.block = ToyBlock()

    def forward(self, x, noise_level, extra=None):
        return self.block(x)


def toy():
    torch.manual_seed(0)
    model = ToyDenoiser()
    tiny.add_tlora(model, targets=("ToyBlock",))
    return model


def ddim(steps=4):
    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(steps)
    return scheduler


def test_an_unknown_class_is_refused_with_both_ways_out(private_table):
    with pytest.raises(TLoRAError) as error:
        enable_tlora(toy(), max_rank=8)
    assert "ToyDenoiser" in str(error.value) and "timestep_fn" in str(error.value)
    assert "register_convention('ToyDenoiser'" in str(error.value)


@pytest.mark.parametrize("key", [ToyDenoiser, "ToyDenoiser"])
def test_register_convention_teaches_a_toy_denoiser(key, private_table, rank_probe):
    model, scheduler = toy(), ddim()
    register_convention(key, param="noise_level", to_timestep=lambda v: (1 - v) * 1000, reduce="max")
    enable_tlora(model, max_rank=8, scheduler=scheduler)
    rank_probe.watch("toy", model)
    x = torch.randn(1, 3, 8)
    for t in scheduler.timesteps:
        level = 1 - float(t) / 1000
        cleaner = min(level + 0.05, 1.0)
        with torch.no_grad():  # inference calls: with autograd they would be training calls
            model(x, torch.tensor([[cleaner, level, 1.0]]))  # positional, per token: the noisiest (lowest level) wins
            model(x, noise_level=torch.tensor([level, level]))  # keyword
    expected = [lycoris_rank(t, 1000, 8) for t in scheduler.timesteps for _ in (0, 1)]
    assert rank_probe.ranks() == expected and len(set(expected)) > 1


def test_register_convention_reduce_is_honoured(private_table, rank_probe):
    model = toy()
    register_convention(ToyDenoiser, param="noise_level", to_timestep=lambda v: (1 - v) * 1000, reduce="min")
    enable_tlora(model, max_rank=8, scheduler=ddim(1000))
    rank_probe.watch("toy", model)
    model(torch.randn(1, 3, 8), torch.tensor([[0.0, 0.5, 1.0]]))  # timesteps 1000, 500, 0: min is 0
    assert rank_probe.ranks() == [8]


def test_register_convention_for_one_pipeline_wins_over_the_class_row(private_table, rank_probe):
    """A pipeline-scoped row (how Cosmos and Sana-Sprint are told apart) applies only under that pipeline."""
    pipe, kw = tiny.sdxl(steps=3)
    register_convention("UNet2DConditionModel", to_timestep=lambda v: 1000 - v,
                        schedule_to_timestep=lambda v: 1000 - v, pipeline="StableDiffusionXLPipeline")
    enable_tlora(pipe, max_rank=8)
    rank_probe.watch("unet", pipe.unet)
    pipe(**kw)
    assert rank_probe.ranks() == [lycoris_rank(1000 - t, 1000, 8) for t in pipe.scheduler.timesteps]
    rank_probe.reset()
    enable_tlora(pipe.unet, max_rank=8, scheduler=pipe.scheduler)  # a bare UNet: the class row
    pipe(**kw)
    assert rank_probe.ranks() == [lycoris_rank(t, 1000, 8) for t in pipe.scheduler.timesteps]


def test_registered_rows_are_validated():
    with pytest.raises(TLoRAError, match="reduce"):
        register_convention("Anything", reduce="median")
    with pytest.raises(TLoRAError, match="callable"):
        register_convention("Anything", to_timestep=1000)
    with pytest.raises(TLoRAError, match="not both"):
        register_convention("Anything", pipeline="P", scheduler="S")


def test_a_scheduler_row_must_read_the_class_rows_parameter(private_table):
    register_convention("UNet2DConditionModel", param="t", scheduler="DDIMScheduler")
    pipe, _ = tiny.sdxl()
    with pytest.raises(TLoRAError, match="one timestep parameter"):
        enable_tlora(pipe, max_rank=8)


# -- timestep_fn takes precedence over every row ----------------------------------------------------------------
def test_timestep_fn_takes_precedence_over_the_row(rank_probe):
    pipe, kw = tiny.sdxl(steps=3)
    enable_tlora(pipe, max_rank=8, timestep_fn=lambda module, args, kwargs: 999 - args[1])
    rank_probe.watch("unet", pipe.unet)
    pipe(**kw)
    # The row would give rank(t); timestep_fn's value is used (snapping moves it only within its dtype's rounding).
    schedule = pipe.scheduler.timesteps
    expected = [lycoris_rank(999 - t, 1000, 8) for t in schedule]
    assert rank_probe.ranks() == expected != [lycoris_rank(t, 1000, 8) for t in schedule]


def test_timestep_fn_is_snapped_on_the_noise_ward_scale_of_an_inverted_schedule(rank_probe):
    """Mochi's scheduler holds (1 - sigma) * 1000; a timestep_fn returning the noise-ward t still snaps right."""
    pipe, kw = tiny.mochi()
    enable_tlora(pipe, max_rank=8, timestep_fn=lambda module, args, kwargs: 1000 - kwargs["timestep"] + 0.3)
    rank_probe.watch("transformer", pipe.transformer)
    pipe(**kw)
    expected = [lycoris_rank(1000 - t, 1000, 8) for t in pipe.scheduler.timesteps]
    assert rank_probe.ranks() == expected and len(set(expected)) > 1


def test_timestep_fn_serves_a_denoiser_whose_row_refuses(rank_probe):
    transformer = tiny.cosmos_transformer()
    tiny.add_tlora(transformer)
    enable_tlora(transformer, max_rank=8, timestep_fn=lambda module, args, kwargs: 250.0)
    rank_probe.watch("transformer", transformer)
    transformer(hidden_states=torch.randn(1, 16, 1, 4, 4), timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, 6, 32))
    assert rank_probe.ranks() == [lycoris_rank(250, 1000, 8)]


# -- refusals ---------------------------------------------------------------------------------------------------
def test_a_bare_cosmos_transformer_is_ambiguous_and_refused():
    transformer = tiny.cosmos_transformer()
    tiny.add_tlora(transformer)
    before = hook_counts(transformer)
    with pytest.raises(TLoRAError) as error:
        enable_tlora(transformer, max_rank=8)
    assert "Cosmos pipeline" in str(error.value) and "timestep_fn" in str(error.value)
    assert hook_counts(transformer) == before


def test_a_pipeline_that_multiplies_by_an_unusable_config_value_is_refused():
    pipe, _ = tiny.sana()
    pipe.transformer.register_to_config(timestep_scale=0.0)
    with pytest.raises(TLoRAError, match="timestep_scale"):
        enable_tlora(pipe, max_rank=8)
    assert hook_counts(pipe.transformer) == (0, 0)


# -- the scheduler row is chosen on each call ------------------------------------------------------------------
def test_swapping_in_an_edm_scheduler_after_enabling_switches_the_row(rank_probe):
    """Playground v2.5 style: the UNet then receives c_noise = 0.25 ln sigma, not a DDPM t."""
    pipe, kw = tiny.sdxl()
    enable_tlora(pipe, max_rank=8)
    pipe.scheduler = diffusers.EDMDPMSolverMultistepScheduler(sigma_data=0.5)
    rank_probe.watch("unet", pipe.unet)
    pipe(**kw)
    sigmas = pipe.scheduler.sigmas[:-1]
    expected = [lycoris_rank(float(s / (1 + s) * 1000), 1000, 8) for s in sigmas]
    assert rank_probe.ranks() == expected and len(set(expected)) > 1


def test_diffusion_forcing_never_steps_the_pipeline_scheduler_it_snaps_to(rank_probe):
    """SkyReels-DF steps per-frame deep copies; `pipe.scheduler` only holds the shared timesteps."""
    pipe, kw = tiny.skyreels_v2_df()
    enable_tlora(pipe, max_rank=8)
    rank_probe.watch("transformer", pipe.transformer)
    pipe(**kw)
    assert pipe.scheduler.step_index is None
    expected = [lycoris_rank(t, 1000, 8) for t in pipe.scheduler.timesteps for _ in (0, 1)]
    assert rank_probe.ranks() == expected


# -- the video warning -----------------------------------------------------------------------------------------
def test_video_denoisers_warn_once_per_process(caplog):
    api.warn_video_once.cache_clear()
    image_pipe, _ = tiny.sd3()
    video_pipe, _ = tiny.wan("2.2_ti2v")
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        enable_tlora(image_pipe, max_rank=8)
        assert not caplog.records
        enable_tlora(video_pipe, max_rank=8)
        enable_tlora(video_pipe, max_rank=8)
        enable_tlora(tiny.wan("2.2_ti2v")[0], max_rank=8)
    warnings = [record for record in caplog.records if "experimental" in record.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "noisiest" in message and "temporal compression" in message
