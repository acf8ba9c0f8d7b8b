"""Tiny offline pipelines for every family in the support matrix, with real LyCORIS T-LoRA modules.

Each builder returns `(pipe, call_kwargs)`. `pipe(**call_kwargs)` runs the stock pipeline with embeddings passed
directly (no text encoder), `output_type="latent"` where the pipeline has it, and a few steps. Configs are shrunk
from diffusers' own fast tests; recipes in the research note `diffusers_timesteps.md` §7-8.
"""

from __future__ import annotations

import torch
from lycoris import LycorisNetwork, create_lycoris

from devtools.lycoris_build import lycoris_without_gc

# LyCORIS targets modules by class name. The attention class differs per family; FeedForward is shared.
TARGETS = ("Attention", "FluxAttention", "WanAttention", "FeedForward")


def apply_tlora(denoiser: torch.nn.Module, rank: int = 8, *, targets=TARGETS) -> LycorisNetwork:
    """LyCORIS's own T-LoRA (`algo="tlora"`) on the `targets` classes, applied as built: its SVD init keeps the
    output unchanged until it is trained (or perturbed).

    The modules stay in fp32 whatever the denoiser's dtype, as LyCORIS builds them when loading a file.
    """
    LycorisNetwork.apply_preset({"target_module": list(targets)})
    with lycoris_without_gc():
        network = create_lycoris(
            denoiser, 1.0, linear_dim=rank, linear_alpha=rank, algo="tlora", warn_on_unmatched=False
        )
    network.apply_to()
    return network


def add_tlora(denoiser: torch.nn.Module, rank: int = 8, *, seed: int = 0, targets=TARGETS, scale: float = 0.3):
    """`apply_tlora`, then every factor perturbed so the adapter changes the output."""
    return perturbed(apply_tlora(denoiser, rank, targets=targets), seed, scale)


def perturbed(network: LycorisNetwork, seed: int = 0, scale: float = 0.3) -> LycorisNetwork:
    """Every factor of a T-LoRA network moved away from its SVD init (noise at `scale` of its mean size)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.loras:
            for parameter in (module.q_layer.weight, module.p_layer.weight, module.lambda_layer):
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * scale * parameter.abs().mean().clamp_min(0.1))
    return network


def peft_lora(transformer, rank: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers-format PEFT LoRA state dict for three of the tiny SD3 transformer's Linear layers."""
    generator = torch.Generator().manual_seed(5)
    state = {}
    names = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.ff.net.0.proj")
    for name in names:
        layer = transformer.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.3
    return state


def _randn(*shape, seed: int = 0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _text_embeds(dim: int, pooled_dim: int | None = None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Prompt and negative-prompt embeddings of 8 tokens, with pooled vectors where the pipeline takes them."""
    generator = torch.Generator().manual_seed(0)
    embeds = {}
    for prefix in ("", "negative_"):
        embeds[f"{prefix}prompt_embeds"] = torch.randn(1, 8, dim, generator=generator).to(dtype)
        if pooled_dim:
            embeds[f"{prefix}pooled_prompt_embeds"] = torch.randn(1, pooled_dim, generator=generator).to(dtype)
    return embeds


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _shifting_flow_scheduler(max_shift: float = 1.15, max_image_seq_len: int = 4096):
    """The flow-matching Euler scheduler whose shift grows with the image's token count (Flux, Qwen-Image)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=max_shift,
                                           base_image_seq_len=256, max_image_seq_len=max_image_seq_len)


def unet(**config):
    """A tiny UNet2DConditionModel in SD 1.5's layout, weights from seed 0; `config` changes or adds settings."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**{
        "block_out_channels": (4, 8), "layers_per_block": 1, "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": (2, 4),
        "cross_attention_dim": 32, "norm_num_groups": 1, **config,
    })


def sdxl_unet():
    """`unet` in SDXL's layout: text_time added conditioning, linear projections, 64-wide text embeddings."""
    return unet(
        cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    )


def _vae(latent_channels: int = 4):
    """Only its config is read when latents are passed in place of images."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(4,), latent_channels=latent_channels, norm_num_groups=1,
                         layers_per_block=1, sample_size=8)


# ---------------------------------------------------------------------------------------------- images
def sd15(scheduler: str = "pndm", steps: int = 4):
    """SD 1.5: the UNet takes `t` positionally; PNDM repeats one t, Heun calls twice per step."""
    from diffusers import HeunDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    schedulers = {
        "pndm": lambda: PNDMScheduler(**common, skip_prk_steps=True, steps_offset=1),
        "heun": lambda: HeunDiscreteScheduler(**common),
    }
    denoiser = unet()
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=denoiser, scheduler=schedulers[scheduler](),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    add_tlora(denoiser)
    kw = dict(prompt_embeds=_randn(1, 6, 32), negative_prompt_embeds=_randn(1, 6, 32, seed=1),
              num_inference_steps=steps, guidance_scale=5.0, height=16, width=16, output_type="latent")
    return _quiet(pipe), kw


def sdxl(scheduler: str = "euler", *, img2img: bool = False, steps: int = 4, rank: int | None = 8):
    """SDXL: Euler (float t), img2img (`begin_index` != 0), Playground v2.5's EDM DPM-Solver and CosXL's
    continuous-timestep Euler (both pass c_noise = 0.25 ln sigma). `rank=None` leaves the UNet without a T-LoRA."""
    from diffusers import (
        EDMDPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    schedulers = {
        "euler": lambda: EulerDiscreteScheduler(**common, steps_offset=1, timestep_spacing="leading"),
        "edm": lambda: EDMDPMSolverMultistepScheduler(sigma_data=0.5, final_sigmas_type="zero"),
        "continuous": lambda: EulerDiscreteScheduler(
            **common, timestep_type="continuous", prediction_type="v_prediction", sigma_min=0.002, sigma_max=120.0,
            use_karras_sigmas=True,
        ),
    }
    denoiser = sdxl_unet()
    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    pipe = cls(vae=_vae() if img2img else None, text_encoder=None, text_encoder_2=None, tokenizer=None,
               tokenizer_2=None, unet=denoiser, scheduler=schedulers[scheduler]())
    if rank:
        add_tlora(denoiser, rank)
    kw = dict(_text_embeds(64, 32), num_inference_steps=steps, guidance_scale=5.0, output_type="latent")
    if img2img:
        kw.update(image=_randn(1, 4, 2, 2, seed=4), strength=0.6, num_inference_steps=6)
    else:
        kw.update(height=32, width=32)
    return _quiet(pipe), kw


def sd3(*, skip_layer_guidance: bool = False, steps: int = 4, rank: int | None = 8):
    """SD3/3.5: raw t = sigma * 1000; skip-layer guidance adds a cond-only call on the SLG steps. `rank=None`
    leaves the transformer without a T-LoRA."""
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
    if rank:
        add_tlora(transformer, rank)
    kw = dict(_text_embeds(32, 64), num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
              output_type="latent")
    if skip_layer_guidance:
        kw.update(skip_guidance_layers=[1], skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.9,
                  num_inference_steps=6)
    return _quiet(pipe), kw


def _flux_vae(latent_channels: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=16, block_out_channels=(4,), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)


def flux_transformer(**config):
    """A tiny FluxTransformer2DModel (one double-stream and one single-stream block), weights from seed 0."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**{
        "patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8],
        **config,
    })


# variant: (pipeline class, transformer in_channels, out_channels, VAE latent channels; no VAE: latents only)
FLUX_VARIANTS = {
    "text2image": ("FluxPipeline", 4, None, None),
    "kontext": ("FluxKontextPipeline", 4, None, 1),
    "fill": ("FluxFillPipeline", 20, 8, 2),
    "img2img": ("FluxImg2ImgPipeline", 4, None, 1),
}


def flux(variant: str = "text2image", *, steps: int = 4, rank: int | None = 8, dtype: torch.dtype = torch.bfloat16):
    """Flux.1 (t/1000): text-to-image with true CFG; Kontext, Fill and img2img (`begin_index` != 0) take an image
    through a tiny VAE. `rank=None` leaves the transformer without a T-LoRA."""
    import diffusers

    pipeline_class, in_channels, out_channels, latent_channels = FLUX_VARIANTS[variant]
    guidance_embeds = variant != "fill"
    transformer = flux_transformer(in_channels=in_channels, out_channels=out_channels, guidance_embeds=guidance_embeds)
    scheduler = _shifting_flow_scheduler()
    pipe = getattr(diffusers, pipeline_class)(
        scheduler=scheduler, vae=_flux_vae(latent_channels) if latent_channels else None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    pipe.to(dtype)
    if rank:
        add_tlora(transformer, rank)
    embeds = _text_embeds(32, 32, dtype)
    if variant == "text2image":
        kw = dict(embeds, true_cfg_scale=2.0, guidance_scale=3.5, num_inference_steps=steps, height=32, width=32,
                  output_type="latent")
        return _quiet(pipe), kw
    kw = dict(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"],
              num_inference_steps=steps, height=16, width=16, output_type="latent")
    image = _randn(1, 3, 16, 16, seed=4, dtype=dtype).clamp(-1, 1) * 0.5 + 0.5
    if variant == "kontext":
        kw.update(image=image, _auto_resize=False, max_area=16 * 16)
    elif variant == "fill":
        kw.update(image=image, mask_image=torch.ones(1, 1, 16, 16))
    elif variant == "img2img":
        kw.update(image=image, strength=0.6, num_inference_steps=6)
    return _quiet(pipe), kw


def flux2(variant: str = "dev", *, steps: int = 4):
    """Flux.2 (guidance-distilled: one call per step) and Flux.2 Klein base (not distilled: cond + uncond calls)."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    dtype = torch.bfloat16
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=variant == "dev",
    )
    scheduler = _shifting_flow_scheduler()
    if variant == "dev":
        pipe = Flux2Pipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    else:
        from diffusers import AutoencoderKLFlux2

        torch.manual_seed(0)
        vae = AutoencoderKLFlux2(block_out_channels=(4,), latent_channels=1, norm_num_groups=1, layers_per_block=1,
                                 down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  transformer=transformer, is_distilled=False)
    pipe.to(dtype)
    add_tlora(transformer, targets=("Flux2Attention", "Flux2ParallelSelfAttention", "Flux2FeedForward"))
    kw = dict(prompt_embeds=_randn(1, 6, 16, dtype=dtype), num_inference_steps=steps, guidance_scale=4.0,
              height=16, width=16, output_type="latent")
    if variant == "klein_base":
        kw.update(negative_prompt_embeds=_randn(1, 6, 16, seed=2, dtype=dtype))
    return _quiet(pipe), kw


def chroma(*, steps: int = 4):
    """Chroma (bf16, t/1000): separate cond and uncond calls."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    dtype = torch.bfloat16
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1,
    )
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                          tokenizer=None, transformer=transformer)
    pipe.to(dtype)
    add_tlora(transformer, targets=("FluxAttention", "FeedForward"))
    kw = dict(prompt_embeds=_randn(1, 6, 32, dtype=dtype),
              negative_prompt_embeds=_randn(1, 6, 32, seed=2, dtype=dtype), prompt_attention_mask=torch.ones(1, 6),
              negative_prompt_attention_mask=torch.ones(1, 6), num_inference_steps=steps, guidance_scale=4.0,
              height=16, width=16, output_type="latent")
    return _quiet(pipe), kw


def qwen_image(*, steps: int = 4):
    """Qwen-Image (bf16, t/1000): true CFG with a negative prompt gives separate cond and uncond calls."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    dtype = torch.bfloat16
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    )
    scheduler = _shifting_flow_scheduler(max_shift=0.9, max_image_seq_len=8192)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.to(dtype)
    add_tlora(transformer)
    kw = dict(prompt_embeds=_randn(1, 6, 16, dtype=dtype), prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long),
              negative_prompt_embeds=_randn(1, 6, 16, seed=2, dtype=dtype),
              negative_prompt_embeds_mask=torch.ones(1, 6, dtype=torch.long), true_cfg_scale=4.0,
              num_inference_steps=steps, height=32, width=32, output_type="latent")
    return _quiet(pipe), kw


def _sana_transformer(**extra):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8, **extra,
    )


def sana(*, steps: int = 4):
    """Sana: int64 flow t times the transformer's `timestep_scale` (2.0 here, so the division is exercised)."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    transformer = _sana_transformer(timestep_scale=2.0)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    add_tlora(transformer, targets=("Attention",))  # not GLUMBConv: LyCORIS T-LoRA breaks its grouped conv
    kw = dict(prompt_embeds=_randn(1, 6, 8), prompt_attention_mask=torch.ones(1, 6),
              negative_prompt_embeds=_randn(1, 6, 8, seed=2), negative_prompt_attention_mask=torch.ones(1, 6),
              negative_prompt=None, use_resolution_binning=False, num_inference_steps=steps, guidance_scale=4.5,
              height=64, width=64, output_type="latent")  # without a VAE the pipeline assumes 32x downsampling
    return _quiet(pipe), kw


def sana_sprint(*, steps: int = 2):
    """Sana-Sprint: the SCM scheduler steps TrigFlow angles; the transformer gets sin/(sin+cos) of the angle."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    transformer = _sana_transformer(guidance_embeds=True, qk_norm="rms_norm_across_heads")
    pipe = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                              scheduler=SCMScheduler())
    add_tlora(transformer, targets=("Attention",))
    kw = dict(prompt_embeds=_randn(1, 6, 8), prompt_attention_mask=torch.ones(1, 6), use_resolution_binning=False,
              num_inference_steps=steps,
              guidance_scale=4.5, height=64, width=64, output_type="latent")
    return _quiet(pipe), kw


def pixart_sigma(*, steps: int = 4):
    """PixArt-Sigma: int64 DPM-Solver t; legacy `callback(step, t, latents)` only."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    add_tlora(transformer)
    kw = dict(prompt_embeds=_randn(1, 6, 32), prompt_attention_mask=torch.ones(1, 6),
              negative_prompt_embeds=_randn(1, 6, 32, seed=2), negative_prompt_attention_mask=torch.ones(1, 6),
              negative_prompt=None, use_resolution_binning=False, num_inference_steps=steps, guidance_scale=4.5,
              height=16, width=16, output_type="latent")
    return _quiet(pipe), kw


def auraflow(*, steps: int = 4):
    """AuraFlow: t/1000 cast to the latents dtype (fp16 here)."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    dtype = torch.float16
    torch.manual_seed(0)
    transformer = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.to(dtype)
    add_tlora(transformer)
    kw = dict(prompt_embeds=_randn(1, 6, 16, dtype=dtype), prompt_attention_mask=torch.ones(1, 6),
              negative_prompt_embeds=_randn(1, 6, 16, seed=2, dtype=dtype),
              negative_prompt_attention_mask=torch.ones(1, 6), num_inference_steps=steps, guidance_scale=4.0,
              height=16, width=16, output_type="latent")
    return _quiet(pipe), kw


def lumina2(*, steps: int = 4):
    """Lumina2: the pipeline passes 1 - t/1000 (0 = pure noise), cond and uncond calls."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8,
    )
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                           text_encoder=None, tokenizer=None)
    add_tlora(transformer)
    kw = dict(prompt_embeds=_randn(1, 6, 8), prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
              negative_prompt_embeds=_randn(1, 6, 8, seed=2),
              negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
              num_inference_steps=steps, guidance_scale=4.0, height=16, width=16, output_type="latent")
    return _quiet(pipe), kw


def _clip_text(hidden_size: int = 32, projection_dim: int = 32, max_length: int = 8):
    """A tiny CLIP text encoder and an in-memory tokenizer, for pipelines that take no prompt embeddings."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden_size,
                            projection_dim=projection_dim, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, vocab_size=8, max_position_embeddings=max_length)
    tokenizer = CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "a</w>": 3}, merges=[],
                              model_max_length=max_length)
    return CLIPTextModelWithProjection(config).eval(), tokenizer


def hidream(*, steps: int = 4):
    """HiDream-I1: the parameter is `timesteps` (plural); mixture-of-experts feed-forwards."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
    ).eval()
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, text_encoder_4=None,
        tokenizer_4=None, transformer=transformer,
    )
    pipe.default_sample_size = 4  # the pipeline rescales any size to this area (default 1024x1024: 4096 tokens)
    add_tlora(transformer, targets=("HiDreamAttention",))
    kw = dict(prompt_embeds_t5=_randn(1, 6, 32), prompt_embeds_llama3=_randn(2, 1, 6, 16, seed=1),
              negative_prompt_embeds_t5=_randn(1, 6, 32, seed=2),
              negative_prompt_embeds_llama3=_randn(2, 1, 6, 16, seed=3), pooled_prompt_embeds=_randn(1, 64, seed=4),
              negative_pooled_prompt_embeds=_randn(1, 64, seed=5), num_inference_steps=steps, guidance_scale=5.0,
              height=32, width=32, output_type="latent")
    return _quiet(pipe), kw


def hunyuan_dit(*, steps: int = 4):
    """HunyuanDiT: DDPM t cast to the latents dtype, passed positionally."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(
        sample_size=4, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, in_channels=4,
        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
        activation_fn="gelu-approximate", text_len=6, text_len_t5=6,
    ).eval()
    pipe = HunyuanDiTPipeline(vae=None, text_encoder=None, tokenizer=None, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False)
    add_tlora(transformer)
    ones = torch.ones(1, 6, dtype=torch.long)
    kw = dict(prompt_embeds=_randn(1, 6, 32), prompt_embeds_2=_randn(1, 6, 32, seed=1),
              negative_prompt_embeds=_randn(1, 6, 32, seed=2), negative_prompt_embeds_2=_randn(1, 6, 32, seed=3),
              prompt_attention_mask=ones, prompt_attention_mask_2=ones, negative_prompt_attention_mask=ones,
              negative_prompt_attention_mask_2=ones, use_resolution_binning=False, num_inference_steps=steps,
              guidance_scale=5.0, height=32, width=32, output_type="latent")
    return _quiet(pipe), kw


def _kandinsky22_prior_parts():
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    text_encoder, tokenizer = _clip_text()
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1,
                             num_embeddings=8).eval()
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, image_size=8, projection_dim=32, intermediate_size=37, num_attention_heads=4,
        num_channels=3, num_hidden_layers=1, patch_size=4,
    )).eval()
    image_processor = CLIPImageProcessor(crop_size=8, do_center_crop=True, do_normalize=True, do_resize=True,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3, size=8)
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample=True, clip_sample_range=10.0)
    return dict(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler, image_processor=image_processor)


def _kandinsky22_decoder_parts():
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=32, encoder_hid_dim_type="image_proj",
        cross_attention_dim=16, attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
        norm_num_groups=4,
    ).eval()
    torch.manual_seed(0)
    movq = VQModel(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                   up_block_types=("UpDecoderBlock2D",), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                   num_vq_embeddings=4, vq_embed_dim=4).eval()
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1, prediction_type="epsilon", thresholding=False)
    return dict(unet=unet, scheduler=scheduler, movq=movq)


def kandinsky22(part: str = "decoder", *, steps: int = 4):
    """Kandinsky 2.2: the PriorTransformer (UnCLIP scheduler) and the decoder UNet (DDPM), alone or combined."""
    from diffusers import KandinskyV22CombinedPipeline, KandinskyV22Pipeline, KandinskyV22PriorPipeline

    if part == "prior":
        parts = _kandinsky22_prior_parts()
        pipe = KandinskyV22PriorPipeline(**parts)
        add_tlora(parts["prior"], targets=("BasicTransformerBlock",))
        return _quiet(pipe), dict(prompt="a", negative_prompt="", num_inference_steps=steps, guidance_scale=4.0,
                                  output_type="pt")
    decoder = _kandinsky22_decoder_parts()
    add_tlora(decoder["unet"])
    if part == "decoder":
        kw = dict(image_embeds=_randn(1, 32), negative_image_embeds=_randn(1, 32, seed=1), height=16, width=16,
                  num_inference_steps=steps, guidance_scale=4.0, output_type="latent")
        return _quiet(KandinskyV22Pipeline(**decoder)), kw
    prior = _kandinsky22_prior_parts()
    add_tlora(prior["prior"], targets=("BasicTransformerBlock",))
    pipe = KandinskyV22CombinedPipeline(**decoder, **{f"prior_{name}": part for name, part in prior.items()})
    # Different step counts, so a hook snapping to the other loop's scheduler would pick other ranks.
    kw = dict(prompt="a", negative_prompt="", num_inference_steps=steps + 1, prior_num_inference_steps=steps - 1,
              guidance_scale=4.0, prior_guidance_scale=4.0, height=16, width=16, output_type="latent")
    return _quiet(pipe), kw


def kandinsky3(*, steps: int = 4):
    """Kandinsky 3: DDPM t passed positionally to Kandinsky3UNet."""
    from diffusers import DDPMScheduler, Kandinsky3Pipeline, Kandinsky3UNet, VQModel

    torch.manual_seed(0)
    unet = Kandinsky3UNet(in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=3,
                          block_out_channels=(32, 64), cross_attention_dim=4, encoder_hid_dim=32).eval()
    torch.manual_seed(0)
    movq = VQModel(block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                   up_block_types=("UpDecoderBlock2D",), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                   num_vq_embeddings=4, vq_embed_dim=4).eval()
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, thresholding=False)
    pipe = Kandinsky3Pipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler, movq=movq)
    add_tlora(unet)
    ones = torch.ones(1, 6, dtype=torch.long)
    kw = dict(prompt_embeds=_randn(1, 6, 32), negative_prompt_embeds=_randn(1, 6, 32, seed=1), attention_mask=ones,
              negative_attention_mask=ones, num_inference_steps=steps, guidance_scale=3.0, height=16, width=16,
              output_type="latent")
    return _quiet(pipe), kw


def _cascade_prior():
    from diffusers import StableCascadeUNet

    torch.manual_seed(0)
    return StableCascadeUNet(
        in_channels=16, out_channels=16, conditioning_dim=32, block_out_channels=(32, 32), num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1), clip_image_in_channels=32,
        clip_text_in_channels=32, clip_text_pooled_in_channels=32, dropout=(0.0, 0.0), switch_level=(False,),
    ).eval()


def _cascade_decoder():
    from diffusers import StableCascadeUNet

    torch.manual_seed(0)
    return StableCascadeUNet(
        in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=(16, 32), num_attention_heads=(-1, 2),
        down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                               ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
        clip_text_pooled_in_channels=32, effnet_in_channels=16, dropout=(0.0, 0.0), switch_level=None,
    ).eval()


def stable_cascade(part: str = "prior", *, steps: int = 4):
    """Stable Cascade: `timestep_ratio` in (0, 1] from DDPMWuerstchen, for the prior and the decoder."""
    from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline

    embeds = dict(prompt_embeds=_randn(1, 6, 32), prompt_embeds_pooled=_randn(1, 1, 32, seed=1),
                  negative_prompt_embeds=_randn(1, 6, 32, seed=2),
                  negative_prompt_embeds_pooled=_randn(1, 1, 32, seed=3),
                  num_inference_steps=steps, guidance_scale=4.0)
    if part == "prior":
        prior = _cascade_prior()
        text_encoder, tokenizer = _clip_text()  # encode_prompt reads its dtype even with embeddings given
        pipe = StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior,
                                          scheduler=DDPMWuerstchenScheduler())
        add_tlora(prior, targets=("SDCascadeAttnBlock",))
        return _quiet(pipe), dict(embeds, height=128, width=128, output_type="pt")
    if part == "combined":
        from diffusers import StableCascadeCombinedPipeline

        prior, decoder = _cascade_prior(), _cascade_decoder()
        text_encoder, tokenizer = _clip_text()
        pipe = StableCascadeCombinedPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, decoder=decoder, scheduler=DDPMWuerstchenScheduler(),
            vqgan=None, prior_prior=prior, prior_text_encoder=text_encoder, prior_tokenizer=tokenizer,
            prior_scheduler=DDPMWuerstchenScheduler(),
        )
        add_tlora(prior, targets=("SDCascadeAttnBlock",), seed=1)
        add_tlora(decoder, targets=("SDCascadeAttnBlock",), seed=2)
        # Ratios 1, .5 (prior) and 1, .8, .6, .4, .2 (decoder): snapping to the other loop would change ranks.
        kw = dict(prompt="a", negative_prompt="", num_inference_steps=steps + 1, prior_num_inference_steps=2,
                  prior_guidance_scale=4.0, decoder_guidance_scale=4.0, height=128, width=128, output_type="latent")
        return _quiet(pipe), kw
    decoder = _cascade_decoder()
    text_encoder, tokenizer = _clip_text()
    pipe = StableCascadeDecoderPipeline(decoder=decoder, tokenizer=tokenizer, text_encoder=text_encoder,
                                        scheduler=DDPMWuerstchenScheduler(), vqgan=None)
    add_tlora(decoder, targets=("SDCascadeAttnBlock",))
    return _quiet(pipe), dict(embeds, image_embeddings=_randn(1, 16, 2, 2, seed=4), output_type="latent")


# ---------------------------------------------------------------------------------------------- video
def cogvideox(*, steps: int = 4):
    """CogVideoX: raw int64 t from CogVideoX's DDIM."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6,
    ).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    add_tlora(transformer)
    kw = dict(prompt_embeds=_randn(1, 6, 32), negative_prompt_embeds=_randn(1, 6, 32, seed=1), num_frames=5,
              height=16, width=16, num_inference_steps=steps, guidance_scale=6.0, max_sequence_length=6,
              output_type="latent")
    return _quiet(pipe), kw


def hunyuan_video(*, steps: int = 4):
    """HunyuanVideo: raw t in the latents dtype, which is fp32 at step 0 and bf16 after the first scheduler step."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    dtype = torch.bfloat16
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.to(dtype)
    add_tlora(transformer, targets=("Attention", "FeedForward", "HunyuanVideoTokenRefiner"))
    kw = dict(prompt_embeds=_randn(1, 6, 16, dtype=dtype), pooled_prompt_embeds=_randn(1, 8, seed=1, dtype=dtype),
              prompt_attention_mask=torch.ones(1, 6, dtype=torch.long), num_frames=5, height=16, width=16,
              num_inference_steps=steps, guidance_scale=6.0, output_type="latent")
    return _quiet(pipe), kw


def wan_transformer(architecture: str = "WanTransformer3DModel"):
    """Wan's transformer; SkyReels-V2's takes the same configuration."""
    import diffusers

    return getattr(diffusers, architecture)(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def wan(variant: str = "2.1", *, steps: int | None = None, rank: int | None = 8):
    """Wan 2.1: raw int64 UniPC flow t, separate cond and uncond calls. "2.2_a14b": `transformer` above
    boundary_ratio * 1000, `transformer_2` below (6 steps, so both run). "2.2_ti2v" (TI2V-5B style):
    `expand_timesteps=True` passes one timestep per latent token. `rank=None`: no T-LoRA."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    two_experts = variant == "2.2_a14b"
    torch.manual_seed(0)
    experts = {"transformer": wan_transformer()}
    if two_experts:
        experts["transformer_2"] = wan_transformer()
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, **experts,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        boundary_ratio=0.875 if two_experts else None, expand_timesteps=variant == "2.2_ti2v",
    )
    if rank:
        for seed, transformer in zip((1, 2) if two_experts else (0,), experts.values()):
            add_tlora(transformer, rank, seed=seed)
    kw = dict(_text_embeds(32), num_inference_steps=steps or (6 if two_experts else 4), guidance_scale=4.0,
              height=16, width=16, num_frames=5, output_type="latent")
    if two_experts:
        kw.update(guidance_scale_2=3.0)
    return _quiet(pipe), kw


def _ltx_transformer():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    ).eval()


def _ltx_vae():
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    return AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()


def ltx(variant: str = "t2v", *, steps: int = 4):
    """LTX-Video: text-to-video (raw t, (2B,)); image-to-video and Condition pass one t per token, 0 on the
    conditioning tokens (Condition: min(t, (1 - strength) * 1000))."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline, LTXImageToVideoPipeline, LTXPipeline

    transformer = _ltx_transformer()
    pipeline_class = {"t2v": LTXPipeline, "i2v": LTXImageToVideoPipeline, "condition": LTXConditionPipeline}[variant]
    vae = _ltx_vae() if variant == "condition" else None  # Condition encodes its image
    pipe = pipeline_class(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    add_tlora(transformer)
    kw = dict(prompt_embeds=_randn(1, 6, 32), prompt_attention_mask=torch.ones(1, 6),
              negative_prompt_embeds=_randn(1, 6, 32, seed=1), negative_prompt_attention_mask=torch.ones(1, 6),
              num_frames=9, height=64, width=64, num_inference_steps=steps, guidance_scale=3.0, output_type="latent")
    if variant == "i2v":
        # Packed latents (2 frames x 2 x 2 tokens, 8 channels) stand in for the encoded image: no VAE needed.
        kw.update(image=torch.zeros(1, 3, 64, 64), latents=_randn(1, 8, 8, seed=2))
    elif variant == "condition":
        kw.update(image=_randn(1, 3, 32, 32, seed=2).clamp(-1, 1) * 0.5 + 0.5, strength=0.6, height=32, width=32,
                  num_inference_steps=8)
    return _quiet(pipe), kw


def mochi(*, steps: int = 8):
    """Mochi: the scheduler's sigmas are inverted, so t = (1 - sigma) * 1000 and 0 is pure noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True), vae=None, text_encoder=None,
                         tokenizer=None, transformer=transformer)
    add_tlora(transformer, targets=("MochiAttention", "FeedForward"))
    kw = dict(prompt_embeds=_randn(1, 6, 32), prompt_attention_mask=torch.ones(1, 6),
              negative_prompt_embeds=_randn(1, 6, 32, seed=1), negative_prompt_attention_mask=torch.ones(1, 6),
              num_frames=7, height=16, width=16, num_inference_steps=steps, guidance_scale=4.5, output_type="latent")
    return _quiet(pipe), kw


def allegro(*, steps: int = 4):
    """Allegro: raw fp32 t from Euler ancestral (any Karras-family scheduler)."""
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, EulerAncestralDiscreteScheduler

    torch.manual_seed(0)
    transformer = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=24,
    ).eval()
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                                timestep_spacing="linspace")
    pipe = AllegroPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    add_tlora(transformer)
    kw = dict(prompt_embeds=_randn(1, 6, 24), prompt_attention_mask=torch.ones(1, 6),
              negative_prompt_embeds=_randn(1, 6, 24, seed=1), negative_prompt_attention_mask=torch.ones(1, 6),
              negative_prompt=None, num_frames=9, height=16, width=16, num_inference_steps=steps, guidance_scale=7.5,
              output_type="latent")
    return _quiet(pipe), kw


def _skyreels_transformer():
    torch.manual_seed(0)
    return wan_transformer("SkyReelsV2Transformer3DModel").eval()


def skyreels_v2(*, steps: int = 4):
    """SkyReels-V2 text-to-video (no diffusion forcing): raw int64 t, cond and uncond calls."""
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    transformer = _skyreels_transformer()
    pipe = SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                              scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                use_flow_sigmas=True, flow_shift=8.0))
    add_tlora(transformer, targets=("SkyReelsV2Attention", "FeedForward"))
    kw = dict(prompt_embeds=_randn(1, 6, 32), negative_prompt_embeds=_randn(1, 6, 32, seed=1),
              num_inference_steps=steps, guidance_scale=6.0, height=16, width=16, num_frames=5, output_type="latent")
    return _quiet(pipe), kw


def skyreels_v2_df(*, ar_step: int = 0, steps: int = 4):
    """SkyReels-V2 diffusion forcing: one int64 t per latent frame, each frame stepped by its own deep copy of
    the scheduler. `ar_step=0` (synchronous) moves all frames together; `ar_step > 0` staggers them."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

    transformer = _skyreels_transformer()
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0),
    )
    add_tlora(transformer, targets=("SkyReelsV2Attention", "FeedForward"))
    kw = dict(prompt=None, prompt_embeds=_randn(1, 6, 32), negative_prompt_embeds=_randn(1, 6, 32, seed=1),
              num_inference_steps=steps, guidance_scale=6.0, height=16, width=16, num_frames=9, ar_step=ar_step,
              causal_block_size=1, output_type="latent")
    return _quiet(pipe), kw


def _cosmos_safety_checker():
    """Cosmos pipelines refuse to run without a guardrail object; the real one is a multi-GB model."""
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin

    class AllowEverything(ModelMixin, ConfigMixin):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("_device_tracker", torch.zeros(1), persistent=False)  # gives it a device

        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames):
            return frames

    return AllowEverything()


def cosmos_transformer(in_channels: int = 16):
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    return CosmosTransformer3DModel(
        in_channels=in_channels, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        mlp_ratio=2, text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,  # True needs torchvision
        extra_pos_embed_type="learnable",
    ).eval()


def _wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def cosmos(version: str = "1", *, steps: int = 4):
    """Cosmos 1.0 (EDM Euler, c_noise), 2 (sigma/(sigma+1) of a Karras-sigma flow scheduler) and 2.5 (the flow
    sigma): the same CosmosTransformer3DModel receives a different timestep in each pipeline."""
    from diffusers import (
        Cosmos2_5_PredictBasePipeline,
        Cosmos2TextToImagePipeline,
        CosmosTextToWorldPipeline,
        EDMEulerScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    dtype = torch.bfloat16
    common = dict(text_encoder=None, tokenizer=None, safety_checker=_cosmos_safety_checker())
    if version == "1":
        transformer = cosmos_transformer()
        scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule="karras",
                                      num_train_timesteps=1000, prediction_type="epsilon", rho=7.0,
                                      final_sigmas_type="sigma_min")
        pipe = CosmosTextToWorldPipeline(transformer=transformer, vae=None, scheduler=scheduler, **common)
        frames = dict(num_frames=9)
    elif version == "2":
        transformer = cosmos_transformer()
        pipe = Cosmos2TextToImagePipeline(transformer=transformer, vae=None,
                                          scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), **common)
        frames = {}
    else:
        transformer = cosmos_transformer(in_channels=17)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
        pipe = Cosmos2_5_PredictBasePipeline(transformer=transformer, vae=_wan_vae(), scheduler=scheduler, **common)
        frames = dict(num_frames=9)
    pipe.transformer.to(dtype)
    add_tlora(transformer, targets=("Attention", "FeedForward"))
    kw = dict(prompt_embeds=_randn(1, 6, 32, dtype=dtype),
              negative_prompt_embeds=_randn(1, 6, 32, seed=1, dtype=dtype), num_inference_steps=steps,
              guidance_scale=3.0, height=32, width=32, output_type="latent", **frames)
    return _quiet(pipe), kw
