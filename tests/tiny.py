"""Tiny offline Diffusers pipelines with real LyCORIS T-LoRA modules, built from hand-written configs.

Every builder returns `(pipe, call_kwargs)`: `pipe(**call_kwargs)` runs the stock pipeline with
`prompt_embeds` passed directly and `output_type="latent"`. Recipes: research note
`diffusers_timesteps.md` §7-8.
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch
from lycoris import LycorisNetwork, create_lycoris

# The attention class differs per family; FeedForward is shared.
TARGETS = ("Attention", "FluxAttention", "WanAttention", "FeedForward")


@contextmanager
def lycoris_without_gc():
    """LyCORIS runs gc.collect() once per T-LoRA module it builds (0.3 s each); tests skip that."""
    with mock.patch("lycoris.modules.tlora.gc.collect", lambda *args: 0):
        yield


def add_tlora(denoiser: torch.nn.Module, rank: int = 8, *, seed: int = 0, targets=TARGETS, scale: float = 0.3):
    """Apply a LyCORIS T-LoRA (`algo="tlora"`) and perturb it so the adapter changes the output.

    The modules stay in fp32 whatever the denoiser's dtype, as LyCORIS builds them when loading a file.
    """
    LycorisNetwork.apply_preset({"target_module": list(targets)})
    with lycoris_without_gc():
        network = create_lycoris(
            denoiser, 1.0, linear_dim=rank, linear_alpha=rank, algo="tlora", warn_on_unmatched=False
        )
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            for parameter in (module.q_layer.weight, module.p_layer.weight, module.lambda_layer):
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * scale * parameter.abs().mean().clamp_min(0.1))
    return network


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sdxl(*, steps: int = 4, rank: int | None = 8, scheduler: str = "euler"):
    """Tiny SDXL; `rank=None` leaves the UNet without a T-LoRA."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )
    schedulers = {
        "euler": lambda: EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
            timestep_spacing="leading",
        ),
        "ddim": lambda: DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
            timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
        ),
    }
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=schedulers[scheduler](),
    )
    pipe.set_progress_bar_config(disable=True)
    if rank:
        add_tlora(unet, rank)
    g = _generator()
    kwargs = dict(
        prompt_embeds=torch.randn(1, 8, 64, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 8, 64, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g),
        num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, output_type="latent",
    )
    return pipe, kwargs


def sd3(*, steps: int = 4, rank: int = 8):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    add_tlora(transformer, rank)
    g = _generator()
    kwargs = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 64, generator=g),
        negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g),
        num_inference_steps=steps, guidance_scale=5.0, height=32, width=32, output_type="latent",
    )
    return pipe, kwargs


def flux(*, steps: int = 4, rank: int | None = 8, dtype: torch.dtype = torch.bfloat16):
    """Tiny Flux; `rank=None` leaves the transformer without a T-LoRA."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype)
    if rank:
        add_tlora(transformer, rank)
    g = _generator()
    kwargs = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=g).to(dtype),
        pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(dtype),
        negative_prompt_embeds=torch.randn(1, 8, 32, generator=g).to(dtype),
        negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g).to(dtype),
        true_cfg_scale=2.0, guidance_scale=3.5, num_inference_steps=steps, height=32, width=32,
        output_type="latent",
    )
    return pipe, kwargs


def _wan_transformer(in_channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=in_channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def wan22_a14b(*, steps: int = 6, rank: int | None = 8):
    """Wan 2.2 A14B: `transformer` above boundary_ratio * 1000, `transformer_2` below; `rank=None`: no T-LoRA."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    transformer, transformer_2 = _wan_transformer(), _wan_transformer()
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer, transformer_2=transformer_2,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        boundary_ratio=0.875,
    )
    pipe.set_progress_bar_config(disable=True)
    if rank:
        add_tlora(transformer, rank, seed=1)
        add_tlora(transformer_2, rank, seed=2)
    g = _generator()
    kwargs = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=g), negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
        num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0, height=16, width=16, num_frames=5,
        output_type="latent",
    )
    return pipe, kwargs


def wan22_ti2v(*, steps: int = 4, rank: int = 8):
    """Wan 2.2 TI2V-5B style: `expand_timesteps=True` passes one timestep per latent token."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(0)
    transformer = _wan_transformer(in_channels=16)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        expand_timesteps=True,
    )
    pipe.set_progress_bar_config(disable=True)
    add_tlora(transformer, rank)
    g = _generator()
    kwargs = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=g), negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
        num_inference_steps=steps, guidance_scale=4.0, height=16, width=16, num_frames=5, output_type="latent",
    )
    return pipe, kwargs
