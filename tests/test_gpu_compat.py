"""The compatibility checks that need a CUDA device: real offload, streams, inductor, no host sync per call.

Run on a GPU machine: `python -m pytest -m gpu tests/test_gpu_compat.py -q`. Without CUDA every test skips.
`TLORA_TEST_DEVICE=cpu` runs the same checks on the CPU (except sequential offload), to test the tests.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import tiny
from compat_tools import expected_ranks, run, scheduler_state_masks, toy_with_tlora
from tlora_hooks import enable_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import STATE_ATTRIBUTE

DEVICE = torch.device(os.environ.get("TLORA_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
SCHEDULE = (8, 1, 1.0)
# Exactness under offload and streams is checked on LyCORIS's own masked forward, which the rank probe reads; the
# default mode's choice under offloading is tested on the CPU (test_compat.py::test_default_mode_under_offloading).

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def to_device(pipe, denoiser_name: str = "unet"):
    """The whole pipeline and its T-LoRA modules (not children of the denoiser) on the device."""
    pipe.to(DEVICE)
    for module in applied_tlora_modules(getattr(pipe, denoiser_name)):
        module.to(DEVICE)
    return pipe


@pytest.fixture
def on_device():
    """The hooked tiny SDXL run resident on the device: the uncomposed output and per-call ranks."""
    pipe, kw = tiny.sdxl(steps=3)
    to_device(pipe)
    enable_tlora(pipe, *SCHEDULE, mode="lycoris")
    return run(pipe, kw, latents().to(DEVICE)).cpu(), expected_ranks(pipe, SCHEDULE)


@pytest.mark.parametrize("order", ["enable_then_offload", "offload_then_enable"])
def test_model_cpu_offload(order, on_device, rank_probe):
    expected, ranks = on_device
    pipe, kw = tiny.sdxl(steps=3)
    if order == "enable_then_offload":
        enable_tlora(pipe, *SCHEDULE, mode="lycoris")
        pipe.enable_model_cpu_offload(device=DEVICE)
    else:
        pipe.enable_model_cpu_offload(device=DEVICE)
        enable_tlora(pipe, *SCHEDULE, mode="lycoris")
    rank_probe.watch("unet", pipe.unet)
    for _ in range(2):
        torch.testing.assert_close(run(pipe, kw, latents()).cpu(), expected, atol=1e-5, rtol=1e-5)
    assert rank_probe.ranks() == ranks * 2


@pytest.mark.skipif(not ON_CUDA, reason="accelerate's sequential offload needs an accelerator")
def test_sequential_cpu_offload(on_device, rank_probe):
    expected, ranks = on_device
    pipe, kw = tiny.sdxl(steps=3)
    enable_tlora(pipe, *SCHEDULE, mode="lycoris")
    pipe.enable_sequential_cpu_offload(device=DEVICE)
    rank_probe.watch("unet", pipe.unet)
    torch.testing.assert_close(run(pipe, kw, latents()).cpu(), expected, atol=1e-5, rtol=1e-5)
    assert rank_probe.ranks() == ranks


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_with_streams(offload_type, on_device, rank_probe):
    from diffusers.hooks import apply_group_offloading

    expected, ranks = on_device
    pipe, kw = tiny.sdxl(steps=3)
    for module in applied_tlora_modules(pipe.unet):
        module.to(DEVICE)
    apply_group_offloading(pipe.unet, onload_device=DEVICE, offload_type=offload_type, num_blocks_per_group=1,
                           use_stream=ON_CUDA)
    enable_tlora(pipe, *SCHEDULE, mode="lycoris")
    rank_probe.watch("unet", pipe.unet)
    torch.testing.assert_close(run(pipe, kw, latents()).cpu(), expected, atol=1e-5, rtol=1e-5)
    assert rank_probe.ranks() == ranks


def test_pipe_to_device_after_enabling(rank_probe):
    reference_pipe, kw = tiny.sdxl(steps=3)
    to_device(reference_pipe)
    with scheduler_state_masks(reference_pipe, SCHEDULE):
        reference = run(reference_pipe, kw, latents().to(DEVICE))

    pipe, kw = tiny.sdxl(steps=3)
    enable_tlora(pipe, *SCHEDULE, mode="lycoris")
    run(pipe, kw, latents())  # tables built on the CPU first
    to_device(pipe)
    rank_probe.watch("unet", pipe.unet)
    out = run(pipe, kw, latents().to(DEVICE))
    assert out.device.type == DEVICE.type
    assert rank_probe.ranks() == expected_ranks(pipe, SCHEDULE)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "build,how",
    [
        (tiny.sdxl, "torch.compile(pipe.unet)"),
        (tiny.sd3, "pipe.transformer.compile()"),
        (tiny.sdxl, "compile_repeated_blocks"),
    ],
    ids=["torch.compile(pipe.unet)", "pipe.transformer.compile()", "unet.compile_repeated_blocks()"],
)
def test_inductor_compile_without_recompiles(build, how):
    """Inductor, as users run it: outputs match eager within kernel rounding, and no step recompiles."""
    pipe, kw = build(steps=3)
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    to_device(pipe, name)
    kw = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in kw.items()}
    enable_tlora(pipe, *SCHEDULE, mode="lycoris")
    x = latents().to(DEVICE)
    eager = run(pipe, kw, x)
    torch._dynamo.reset()
    if how == "torch.compile(pipe.unet)":
        pipe.unet = torch.compile(pipe.unet)
    elif how == "pipe.transformer.compile()":
        pipe.transformer.compile()
    else:
        pipe.unet.compile_repeated_blocks()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            torch.testing.assert_close(run(pipe, kw, x), eager, atol=2e-3, rtol=2e-3)
    torch._dynamo.reset()


def test_the_hook_does_not_synchronise_after_the_first_call():
    """After the one range check of the first call, a hooked call queues its mask without waiting for the device."""
    if not ON_CUDA:
        pytest.skip("sync debug mode is CUDA's")
    from diffusers import FlowMatchEulerDiscreteScheduler

    toy = toy_with_tlora().to(DEVICE)
    for module in applied_tlora_modules(toy):
        module.to(DEVICE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4, device=DEVICE)
    enable_tlora(toy, *SCHEDULE, scheduler=scheduler)
    hook = getattr(toy, STATE_ATTRIBUTE)
    sample = torch.randn(2, 16, device=DEVICE)
    hook.pre_forward(toy, (sample,), {"timestep": scheduler.timesteps[0]})  # first call: may sync once
    hook.post_forward(toy, (sample,), {}, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in scheduler.timesteps:
            hook.pre_forward(toy, (sample,), {"timestep": t})
            hook.post_forward(toy, (sample,), {}, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_out_of_range_on_the_device_warns_on_the_first_call(caplog):
    toy = toy_with_tlora().to(DEVICE)
    for module in applied_tlora_modules(toy):
        module.to(DEVICE)
    caplog.set_level(logging.WARNING, logger="tlora_hooks")
    enable_tlora(toy, *SCHEDULE)
    with torch.no_grad():
        toy(torch.randn(1, 16, device=DEVICE), timestep=torch.tensor(1500.0, device=DEVICE))
        toy(torch.randn(1, 16, device=DEVICE), timestep=torch.tensor(-1.0, device=DEVICE))
    warnings = [r for r in caplog.records if r.name.startswith("tlora_hooks") and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1500" in warnings[0].getMessage()
