"""Masks stay exact inside other people's stacks: offload, group offload, compile, caches, PEFT, ControlNet, from_pipe.

Each composition is checked against the uncomposed hooked run (itself checked against reference loops in
test_pipelines.py), or, where the composition changes the output, against `scheduler_state_masks`: the
same composition with the mask set from the scheduler's own state.
"""

from __future__ import annotations

import gc

import pytest
import torch

import tiny
from compat_tools import expected_ranks, hook_counts, run, scheduler_state_masks, toy_with_tlora
from conftest import lycoris_rank
from tlora_hooks import disable_tlora, enable_tlora
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.hooks import STATE_ATTRIBUTE

SDXL_SCHEDULE = (8, 1, 1.0)
# The rank probe reads LyCORIS's own per-module mask lookup; the fast modes are compared with it in test_modes.py,
# and under offloading in test_default_mode_under_offloading below.
MODE = "lycoris"


def sdxl_latents(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def uncomposed():
    """The hooked tiny SDXL run with nothing else in the stack: output and per-call ranks."""
    pipe, kw = tiny.sdxl(steps=3)
    enable_tlora(pipe, *SDXL_SCHEDULE, mode=MODE)
    return run(pipe, kw, sdxl_latents()), expected_ranks(pipe, SDXL_SCHEDULE)


# -- offload ------------------------------------------------------------------------------------------------------
def add_diffusers_hook(module) -> list[int]:
    """A diffusers ModelHook (HookRegistry rebinds `module.forward`) that counts the calls it sees."""
    from diffusers.hooks import HookRegistry, ModelHook

    calls = []

    class CountingHook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(module).register_hook(CountingHook(), "counting")
    return calls


@pytest.mark.parametrize("order", ["enable_then_offload", "offload_then_enable", "diffusers_hook_offload_enable"])
def test_model_cpu_offload(order, uncomposed, rank_probe):
    """accelerate re-wraps `unet.forward` before and after every call; torch hooks live outside that chain."""
    expected_out, ranks = uncomposed
    pipe, kw = tiny.sdxl(steps=3)
    diffusers_calls = add_diffusers_hook(pipe.unet) if order == "diffusers_hook_offload_enable" else None
    if order == "enable_then_offload":
        enable_tlora(pipe, *SDXL_SCHEDULE, mode=MODE)
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.enable_model_cpu_offload(device="cpu")
        enable_tlora(pipe, *SDXL_SCHEDULE, mode=MODE)  # a torch hook added after accelerate's (and diffusers') hooks
    rank_probe.watch("unet", pipe.unet)
    for _ in range(2):  # maybe_free_model_hooks() removes and re-adds the offload hooks after each call
        assert torch.equal(run(pipe, kw, sdxl_latents()), expected_out)
    assert rank_probe.ranks() == ranks * 2
    assert hasattr(pipe.unet, "_hf_hook"), "offload should be in place"
    if diffusers_calls is not None:
        assert len(diffusers_calls) == len(ranks) * 2, "the diffusers hook keeps running beside ours"


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading(offload_type, uncomposed, rank_probe):
    """Group offloading hooks (diffusers HookRegistry) on blocks or leaf layers, under the LyCORIS forward."""
    from diffusers.hooks import apply_group_offloading

    expected_out, ranks = uncomposed
    pipe, kw = tiny.sdxl(steps=3)
    apply_group_offloading(
        pipe.unet, onload_device=torch.device("cpu"), offload_type=offload_type, num_blocks_per_group=1
    )
    enable_tlora(pipe, *SDXL_SCHEDULE, mode=MODE)
    rank_probe.watch("unet", pipe.unet)
    assert torch.equal(run(pipe, kw, sdxl_latents()), expected_out)
    assert rank_probe.ranks() == ranks


@pytest.mark.parametrize("offload", ["model_cpu_offload", "group_offloading"])
def test_default_mode_under_offloading(offload, uncomposed):
    """The default mode sees the offloading hooks, runs its "low_memory" mode, and gives the LyCORIS-masked output."""
    from diffusers.hooks import apply_group_offloading

    expected_out, _ = uncomposed
    pipe, kw = tiny.sdxl(steps=3)
    if offload == "model_cpu_offload":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        apply_group_offloading(pipe.unet, onload_device=torch.device("cpu"), offload_type="leaf_level")
    handle = enable_tlora(pipe, *SDXL_SCHEDULE)
    weights = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    for _ in range(2):
        torch.testing.assert_close(run(pipe, kw, sdxl_latents()), expected_out, atol=1e-5, rtol=1e-5)
    assert handle.mode == {"unet": "low_memory"}
    assert all(torch.equal(p, weights[name]) for name, p in pipe.unet.named_parameters()), "no weight is written"


# -- torch.compile ------------------------------------------------------------------------------------------------
def toy_reference(toy, sample, timesteps, T=1000):
    """LyCORIS's own forward with the mask of each timestep set by hand (hooks off, group 0)."""
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    outputs = []
    for t in timesteps:
        set_timestep_mask(compute_timestep_mask(int(t), T, 8, 1, 1.0))
        try:
            outputs.append(toy(sample, timestep=t))
        finally:
            clear_timestep_mask()
    return outputs


@pytest.mark.parametrize("how", ["torch.compile(module)", "module.compile()", "regional"])
@torch.no_grad()
def test_compile_keeps_masks_exact_without_recompiles(how):
    """The hooks run eagerly (torch.compiler.disable) beside a full-module compile; regional compile never sees them.
    Either way: compiled once, and every step uses the mask LyCORIS computes for its timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    toy = toy_with_tlora()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    sample = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    expected = toy_reference(toy, sample, scheduler.timesteps)
    assert len({round(float(o.sum()), 4) for o in expected}) > 1, "the steps should use different masks"

    enable_tlora(toy, max_rank=8, mode="lycoris", scheduler=scheduler)
    torch._dynamo.reset()
    if how == "torch.compile(module)":
        model = torch.compile(toy, backend="eager")
    elif how == "module.compile()":
        toy.compile(backend="eager")
        model = toy
    else:
        for block in toy.blocks:
            block.compile(backend="eager")
        model = toy
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            outputs = [model(sample, timestep=t) for t in scheduler.timesteps]
            for out, ref in zip(outputs, expected):
                torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch._dynamo.reset()


# -- diffusers cache hooks ----------------------------------------------------------------------------------------
def test_first_block_cache(rank_probe):
    """FirstBlockCache skips blocks per call; the top-level hook still fires once per call with the right mask."""
    from diffusers import FirstBlockCacheConfig, apply_first_block_cache

    schedule = (8, 1, 1.0)
    latents = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    plain, kw = tiny.flux(steps=4)
    with scheduler_state_masks(plain, schedule):
        without_cache = run(plain, kw, latents)

    pipe, kw = tiny.flux(steps=4)
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.5))
    with scheduler_state_masks(pipe, schedule):
        reference = run(pipe, kw, latents)
    assert not torch.equal(reference, without_cache), "the cache should skip blocks at this threshold"

    enable_tlora(pipe, *schedule, mode=MODE)  # registered after the diffusers hooks
    rank_probe.watch("transformer", pipe.transformer)
    assert torch.equal(run(pipe, kw, latents), reference)
    assert rank_probe.ranks() == expected_ranks(pipe, schedule, calls_per_step=2)


# -- PEFT LoRA beside the T-LoRA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["peft_first", "tlora_first"])
def test_peft_lora_loaded_beside(order, rank_probe):
    schedule = (8, 1, 1.0)
    latents = sdxl_latents()
    pipe, kw = tiny.sd3(steps=3)
    with scheduler_state_masks(pipe, schedule):
        tlora_only = run(pipe, kw, latents)
    if order == "peft_first":
        pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="style")
        handle = enable_tlora(pipe, *schedule, mode=MODE)
    else:
        handle = enable_tlora(pipe, *schedule, mode=MODE)
        pipe.load_lora_weights(tiny.peft_lora(pipe.transformer), adapter_name="style")
    rank_probe.watch("transformer", pipe.transformer)
    out = run(pipe, kw, latents)
    assert rank_probe.ranks() == expected_ranks(pipe, schedule)

    handle.remove()
    with scheduler_state_masks(pipe, schedule):
        reference = run(pipe, kw, latents)
    assert not torch.equal(reference, tlora_only), "the PEFT LoRA should change the output"
    assert torch.equal(out, reference)


# -- pipe.to(...) after enabling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("also_tlora_modules", [False, True])
def test_pipe_to_dtype_after_enabling(also_tlora_modules, rank_probe):
    """The mask is built per call in the modules' current dtype, on the call's device."""
    latents = sdxl_latents().to(torch.bfloat16)

    def convert(pipe):
        pipe.to(torch.bfloat16)
        if also_tlora_modules:
            for module in applied_tlora_modules(pipe.unet):
                module.to(torch.bfloat16)

    reference_pipe, kw = tiny.sdxl(steps=3)
    convert(reference_pipe)
    mask_dtype = torch.bfloat16 if also_tlora_modules else torch.float32
    with scheduler_state_masks(reference_pipe, SDXL_SCHEDULE, mask_dtype=mask_dtype):
        reference = run(reference_pipe, kw, latents)

    pipe, kw = tiny.sdxl(steps=3)
    enable_tlora(pipe, *SDXL_SCHEDULE, mode=MODE)
    run(pipe, kw, latents.float())  # tables built for fp32 first
    convert(pipe)
    rank_probe.watch("unet", pipe.unet)
    out = run(pipe, kw, latents)
    assert out.dtype == torch.bfloat16
    assert rank_probe.ranks() == expected_ranks(pipe, SDXL_SCHEDULE)
    assert torch.equal(out, reference)


# -- ControlNet ---------------------------------------------------------------------------------------------------
def tiny_sdxl_controlnet(pipe):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    torch.manual_seed(1)
    controlnet = ControlNetModel(
        block_out_channels=(4, 8), layers_per_block=1, in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=1, conditioning_embedding_out_channels=(4, 4, 4, 4), conditioning_channels=3,
    )
    control_pipe = StableDiffusionXLControlNetPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=pipe.unet, controlnet=controlnet, scheduler=pipe.scheduler,
    )
    control_pipe.set_progress_bar_config(disable=True)
    return control_pipe


def test_controlnet_pipeline_masks_the_denoiser_not_the_controlnet(rank_probe):
    pipe, kw = tiny.sdxl(steps=3)
    control_pipe = tiny_sdxl_controlnet(pipe)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    latents = sdxl_latents()
    with scheduler_state_masks(control_pipe, SDXL_SCHEDULE):
        reference = run(control_pipe, kw, latents, image=image)
    controlnet_hooks = hook_counts(control_pipe.controlnet)

    handle = enable_tlora(control_pipe, *SDXL_SCHEDULE, mode=MODE)
    assert handle.denoisers == ["unet"]
    assert hook_counts(control_pipe.controlnet) == controlnet_hooks
    assert STATE_ATTRIBUTE not in control_pipe.controlnet.__dict__
    rank_probe.watch("controlnet", control_pipe.controlnet).watch("unet", control_pipe.unet)
    out = run(control_pipe, kw, latents, image=image)
    assert rank_probe.names() == ["controlnet", "unet"] * 3
    controlnet_calls = [seen for name, seen in rank_probe.calls if name == "controlnet"]
    unet_calls = [seen for name, seen in rank_probe.calls if name == "unet"]
    assert controlnet_calls == [set()] * 3, "no T-LoRA in the ControlNet"
    assert [next(iter(seen)) for seen in unet_calls] == expected_ranks(control_pipe, SDXL_SCHEDULE)
    assert torch.equal(out, reference)


# -- from_pipe ----------------------------------------------------------------------------------------------------
def test_from_pipe_sharing_the_scheduler_needs_nothing(rank_probe):
    """Img2img made with from_pipe shares the UNet (so its hooks) and the scheduler: its ranks follow its steps."""
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline

    pipe, kw = tiny.sdxl(steps=4)
    enable_tlora(pipe, *SDXL_SCHEDULE, mode=MODE)
    vae = AutoencoderKL(block_out_channels=[4] * 4, norm_num_groups=1, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, vae=vae)  # img2img reads the VAE's config
    img2img.set_progress_bar_config(disable=True)
    assert img2img.unet is pipe.unet and img2img.scheduler is pipe.scheduler
    rank_probe.watch("unet", img2img.unet)
    kw = {k: v for k, v in kw.items() if k not in ("height", "width")}
    img2img(**kw, image=sdxl_latents(), strength=0.6, return_dict=False)
    scheduler = img2img.scheduler
    steps_run = scheduler.timesteps[scheduler.begin_index:]
    assert 0 < len(steps_run) < len(scheduler.timesteps)
    assert rank_probe.ranks() == [lycoris_rank(t, 1000, *SDXL_SCHEDULE) for t in steps_run]


def test_from_pipe_with_its_own_scheduler(rank_probe):
    """The shared UNet's hook snaps to the first pipeline's scheduler only within rounding, so values from the
    new pipeline's own scheduler are used as received: right ranks without enabling again."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe, kw = tiny.sdxl(steps=4)
    enable_tlora(pipe, *SDXL_SCHEDULE, mode=MODE)
    run(pipe, kw, sdxl_latents())  # leaves pipe.scheduler.timesteps = its 4 steps
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    other = StableDiffusionXLPipeline.from_pipe(pipe, scheduler=ddim)
    other.set_progress_bar_config(disable=True)
    rank_probe.watch("unet", other.unet)
    run(other, {**kw, "num_inference_steps": 3}, sdxl_latents())
    assert not set(other.scheduler.timesteps.tolist()) & set(pipe.scheduler.timesteps.tolist())
    assert rank_probe.ranks() == expected_ranks(other, SDXL_SCHEDULE)


def test_from_pipe_replacing_the_original_keeps_snapping():
    """`pipe = X.from_pipe(pipe)` drops the pipeline enable_tlora saw; its scheduler lives on in the new one."""
    from diffusers import FluxPipeline

    pipe, _ = tiny.flux(rank=1000)
    enable_tlora(pipe, max_rank=1000, mode=MODE)
    pipe = FluxPipeline.from_pipe(pipe)
    gc.collect()
    pipe.scheduler.timesteps = torch.tensor([1000.0, 869.5759, 500.0])
    hook = getattr(pipe.transformer, STATE_ATTRIBUTE)
    received = torch.tensor([869.5759]).to(torch.bfloat16) / 1000  # as FluxPipeline passes it: 0.8671875
    (mask,) = hook.masks_for(received, torch.device("cpu")).values()
    assert int(mask.sum()) == lycoris_rank(869.5759, 1000, 1000) != lycoris_rank(867.1875, 1000, 1000)
    disable_tlora(pipe)
