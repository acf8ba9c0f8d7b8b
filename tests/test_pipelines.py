"""Stock pipelines, hooked: the rank on every denoiser call and the output equal a vendored-style reference loop."""

from __future__ import annotations

import pytest
import torch

import reference_loops
import tiny
from compat_tools import expected_ranks, run
from conftest import lycoris_rank
from tlora_hooks import disable_tlora, enable_tlora

CASES = {
    # name: (builder, reference loop, latents shape, dtype, schedule, calls per step, tolerance)
    "sdxl": (tiny.sdxl, reference_loops.sdxl, (1, 4, 4, 4), torch.float32, (8, 1, 1.0), 1, 1e-5),
    "sd3": (tiny.sd3, reference_loops.sd3, (1, 4, 4, 4), torch.float32, (8, 2, 2.0), 1, 1e-5),
    "flux_bf16_true_cfg": (tiny.flux, reference_loops.flux, (1, 4, 4), torch.bfloat16, (8, 1, 0.5), 2, 0.0),
    "wan22_a14b": (
        lambda: tiny.wan("2.2_a14b"), reference_loops.wan, (1, 16, 2, 2, 2), torch.float32, (8, 1, 1.0), 2, 1e-5
    ),
    "wan22_ti2v_per_token": (
        lambda: tiny.wan("2.2_ti2v"), reference_loops.wan, (1, 16, 2, 2, 2), torch.float32, (8, 3, 1.0), 2, 1e-5
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hooked_pipeline_matches_reference_loop(case, rank_probe):
    build, reference, shape, dtype, schedule, calls_per_step, tolerance = CASES[case]
    pipe, kw = build()
    for name in ("unet", "transformer", "transformer_2"):
        if getattr(pipe, name, None) is not None:
            rank_probe.watch(name, getattr(pipe, name))
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    reference_out = reference(pipe, kw, latents.clone(), schedule)
    reference_ranks = rank_probe.ranks()
    rank_probe.reset()

    max_rank, min_rank, alpha = schedule
    handle = enable_tlora(pipe, max_rank=max_rank, min_rank=min_rank, alpha=alpha)
    out = run(pipe, kw, latents)
    hooked_ranks = rank_probe.ranks()

    assert hooked_ranks == expected_ranks(pipe, schedule, calls_per_step)
    assert hooked_ranks == reference_ranks
    assert len(set(hooked_ranks)) > 1, "the schedule should change the rank across steps"
    torch.testing.assert_close(out, reference_out, atol=tolerance, rtol=tolerance)
    handle.remove()


def test_wan22_routes_each_expert_its_own_steps(rank_probe):
    pipe, kw = tiny.wan("2.2_a14b")
    rank_probe.watch("transformer", pipe.transformer).watch("transformer_2", pipe.transformer_2)
    enable_tlora(pipe, max_rank=8)
    run(pipe, kw, torch.randn(1, 16, 2, 2, 2))
    boundary = pipe.config.boundary_ratio * 1000
    expected = ["transformer" if t >= boundary else "transformer_2" for t in pipe.scheduler.timesteps for _ in (0, 1)]
    assert rank_probe.names() == expected
    assert {"transformer", "transformer_2"} <= set(expected)
    assert rank_probe.ranks() == expected_ranks(pipe, (8, 1, 1.0), 2)


def test_disable_restores_the_unmasked_output_exactly():
    pipe, kw = tiny.sdxl()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    unmasked = run(pipe, kw, latents)
    handle = enable_tlora(pipe, max_rank=8)
    masked = run(pipe, kw, latents)
    assert (masked - unmasked).abs().max() > 1e-3, "the mask should change the output"
    handle.remove()
    assert torch.equal(run(pipe, kw, latents), unmasked)
    enable_tlora(pipe, max_rank=8)
    disable_tlora(pipe)
    assert torch.equal(run(pipe, kw, latents), unmasked)


def test_flux_bf16_timesteps_are_snapped_to_the_scheduler(rank_probe):
    """Rank 512 makes every integer timestep count: bf16-rounded t/1000 would land on the wrong rank unsnapped."""
    pipe, kw = tiny.flux(rank=512, steps=20)
    rank_probe.watch("transformer", pipe.transformer)
    enable_tlora(pipe, max_rank=512)
    run(pipe, kw, torch.randn(1, 4, 4).to(torch.bfloat16))
    expected = expected_ranks(pipe, (512, 1, 1.0), 2)
    # the timesteps as FluxPipeline passes them
    received = [(t.to(torch.bfloat16) / 1000).float() * 1000 for t in pipe.scheduler.timesteps]
    unsnapped = [lycoris_rank(t, 1000, 512) for t in received for _ in (0, 1)]
    assert unsnapped != expected, "the fixture should have timesteps that bf16 rounding moves"
    assert rank_probe.ranks() == expected
