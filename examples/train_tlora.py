#!/usr/bin/env python
"""DreamBooth-style T-LoRA training on stock Diffusers components: a folder of images and one prompt, SDXL or Flux.

The loop is diffusers' DreamBooth LoRA loop (`examples/dreambooth/train_dreambooth_lora_{sdxl,flux}.py`) with PEFT's
`add_adapter` replaced by `create_tlora`: accelerate, gradient checkpointing, mixed precision, the prompt encoded
once, the optimizer given `[p for p in denoiser.parameters() if p.requires_grad]`. The hooks mask every denoiser
call by its timestep; `save_tlora` writes a file `load_tlora(pipe, path)` loads with no arguments; the validation
images come from the stock pipeline through `enable_tlora`.

    accelerate launch examples/train_tlora.py --model sdxl \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir tlora-dog \\
        --mixed_precision bf16 --gradient_checkpointing

`--tiny` builds a random tiny pipeline offline instead (no hub, no text encoders: random prompt embeddings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image

from tlora_hooks import create_tlora, enable_tlora, save_tlora

# SimpleTuner's defaults for T-LoRA (linear_dim 64, linear_alpha 32); the targets default to the family's.
DEFAULT_CONFIG = {"algo": "tlora", "multiplier": 1.0, "linear_dim": 64, "linear_alpha": 32, "tlora_min_rank": 1}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FLUX_GUIDANCE = 3.5  # the guidance embedded while training a guidance-distilled Flux, as diffusers' script does


# -- the two families ----------------------------------------------------------------------------------------------
class Family:
    """What a family names: its pipeline class, the attribute holding its denoiser, the scheduler it trains with
    (built from the pipeline's scheduler config, as diffusers' scripts build it)."""

    pipeline: str
    denoiser: str
    training_scheduler: str

    def load(self, name: str, dtype: torch.dtype) -> Any:
        return getattr(diffusers, self.pipeline).from_pretrained(name, torch_dtype=dtype)

    def noise_scheduler(self, pipe: Any) -> Any:
        return getattr(diffusers, self.training_scheduler).from_config(pipe.scheduler.config)


class SDXL(Family):
    """UNet, epsilon (or v) prediction on DDPM timesteps, called positionally with one int64 timestep per sample."""

    pipeline, denoiser, training_scheduler = "StableDiffusionXLPipeline", "unet", "DDPMScheduler"

    def tiny(self) -> Any:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=1, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        )
        vae = AutoencoderKL(block_out_channels=(4,), latent_channels=4, norm_num_groups=1, layers_per_block=1)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler)

    def encode(self, pipe: Any, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        if pipe.text_encoder is None:  # --tiny
            generator = torch.Generator().manual_seed(len(prompt))
            return {"prompt_embeds": torch.randn(1, 8, 64, generator=generator),
                    "pooled_prompt_embeds": torch.randn(1, 32, generator=generator)}
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def loss(self, unet, config, scheduler, latents: torch.Tensor, embeds: dict, resolution: int) -> torch.Tensor:
        batch = latents.shape[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=latents.device)
        added = {"text_embeds": embeds["pooled_prompt_embeds"].expand(batch, -1),
                 "time_ids": time_ids.expand(batch, -1)}
        prediction = unet(noisy, timesteps, embeds["prompt_embeds"].expand(batch, -1, -1), added_cond_kwargs=added,
                          return_dict=False)[0]
        target = noise
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        return F.mse_loss(prediction.float(), target.float())


class Flux(Family):
    """Transformer on packed latents, flow matching on the scheduler's shifted sigmas, called with t / 1000."""

    pipeline, denoiser, training_scheduler = "FluxPipeline", "transformer", "FlowMatchEulerDiscreteScheduler"

    def tiny(self) -> Any:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        vae = AutoencoderKL(block_out_channels=(4,), latent_channels=1, norm_num_groups=1, layers_per_block=1,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                            scaling_factor=1.5035)
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)

    def encode(self, pipe: Any, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        if pipe.text_encoder is None:  # --tiny
            generator = torch.Generator().manual_seed(len(prompt))
            return {"prompt_embeds": torch.randn(1, 8, 32, generator=generator),
                    "pooled_prompt_embeds": torch.randn(1, 32, generator=generator)}
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def loss(self, transformer, config, scheduler, latents: torch.Tensor, embeds: dict, resolution: int
             ) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        noise = torch.randn_like(latents)
        index = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        timesteps = scheduler.timesteps[index].to(latents.device)
        sigmas = scheduler.sigmas[index].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * latents + sigmas * noise
        dtype = embeds["prompt_embeds"].dtype
        guidance = torch.full((batch,), FLUX_GUIDANCE, device=latents.device) if config.guidance_embeds else None
        prediction = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, batch, channels, height, width).to(dtype),
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=embeds["pooled_prompt_embeds"].expand(batch, -1),
            encoder_hidden_states=embeds["prompt_embeds"].expand(batch, -1, -1),
            txt_ids=torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, dtype),
            return_dict=False,
        )[0]
        target = FluxPipeline._pack_latents(noise - latents, batch, channels, height, width)
        return F.mse_loss(prediction.float(), target.float())


FAMILIES = {"sdxl": SDXL(), "flux": Flux()}


# -- data ----------------------------------------------------------------------------------------------------------
class InstanceImages(torch.utils.data.Dataset):
    """The instance images, resized and center-cropped to `resolution`, in [-1, 1]."""

    def __init__(self, folder: str, resolution: int) -> None:
        self.paths = sorted(
            os.path.join(folder, name) for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES)
        )
        if not self.paths:
            raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = Image.open(self.paths[index]).convert("RGB")
        scale = self.resolution / min(image.size)
        image = image.resize((max(self.resolution, round(image.width * scale)),
                              max(self.resolution, round(image.height * scale))), Image.BICUBIC)
        left, top = (image.width - self.resolution) // 2, (image.height - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        return pixels.permute(2, 0, 1)


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents on the denoiser's scale (Flux's VAE also shifts them)."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


# -- training ------------------------------------------------------------------------------------------------------
@dataclass
class Trained:
    """What `train` leaves: the validation pipeline (the trained denoiser, masked by `enable_tlora`), its network and
    the saved file."""

    pipeline: Any
    network: Any
    path: str | None  # None on the processes other than the main one


def train(args: argparse.Namespace) -> Trained:
    family = FAMILIES[args.model]
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision)
    if args.seed is not None:
        set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = family.tiny() if args.tiny else family.load(args.pretrained_model_name_or_path, weight_dtype)
    with torch.no_grad():  # the prompt is encoded once; the text encoders are not trained
        encoded = family.encode(pipe.to(accelerator.device), args.instance_prompt, accelerator.device)
    embeds = {name: value.to(accelerator.device, weight_dtype) for name, value in encoded.items()}
    config = dict(DEFAULT_CONFIG)
    if args.lycoris_config:
        with open(args.lycoris_config, encoding="utf-8") as file:
            config = json.load(file)

    denoiser, vae = getattr(pipe, family.denoiser), pipe.vae
    vae.requires_grad_(False)
    vae.to(accelerator.device, torch.float32)  # the SDXL VAE overflows in fp16
    denoiser.requires_grad_(False)  # the base stays frozen; create_tlora's parameters are trainable
    denoiser.to(accelerator.device, weight_dtype)
    network = create_tlora(denoiser, config, mode=args.mode)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=args.learning_rate)
    loader = torch.utils.data.DataLoader(InstanceImages(args.instance_data_dir, args.resolution),
                                         batch_size=args.train_batch_size, shuffle=True, drop_last=False)
    config_of_denoiser = denoiser.config
    denoiser, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    scheduler = family.noise_scheduler(pipe)

    step = 0
    epochs = math.ceil(args.max_train_steps * args.gradient_accumulation_steps / len(loader))
    for _ in range(epochs):
        for pixels in loader:
            with accelerator.accumulate(denoiser):
                with torch.no_grad():
                    latents = encode_images(vae, pixels).to(weight_dtype)
                loss = family.loss(denoiser, config_of_denoiser, scheduler, latents, embeds, args.resolution)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
            if step >= args.max_train_steps:
                break
        if step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:  # one process writes the file and the images, as diffusers' scripts do
        os.makedirs(args.output_dir, exist_ok=True)
        path = save_tlora(network, os.path.join(args.output_dir, "pytorch_lora_weights.safetensors"))
        validate(pipe, embeds, config, args)  # `pipe` holds the trained denoiser itself, unwrapped
    accelerator.end_training()
    return Trained(pipe, network, path)


@torch.no_grad()
def validate(pipe: Any, embeds: dict, config: dict, args: argparse.Namespace) -> None:
    """Validation images from the stock pipeline, masked as at inference (snapped to its scheduler's timesteps)."""
    enable_tlora(pipe, max_rank=None, min_rank=config.get("tlora_min_rank", 1), alpha=config.get("tlora_alpha", 1.0))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed or 0)
    for index in range(args.num_validation_images):
        image = pipe(**embeds, num_inference_steps=args.validation_steps, height=args.resolution,
                     width=args.resolution, generator=generator).images[0]
        image.save(os.path.join(args.output_dir, f"validation_{index}.png"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--pretrained_model_name_or_path", help="Hub id or folder of the stock pipeline.")
    parser.add_argument("--tiny", action="store_true", help="A random tiny pipeline, offline, for a smoke test.")
    parser.add_argument("--instance_data_dir", required=True, help="A folder of images of the subject.")
    parser.add_argument("--instance_prompt", required=True, help='e.g. "a photo of sks dog"')
    parser.add_argument("--lycoris_config", help="SimpleTuner's LyCORIS JSON (algo tlora); default: rank 64.")
    parser.add_argument("--mode", default="auto", help="The hooks' mode (enable_tlora's mode).")
    parser.add_argument("--output_dir", default="tlora-model")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=500)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--num_validation_images", type=int, default=4)
    parser.add_argument("--validation_steps", type=int, default=25, help="Inference steps per validation image.")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.tiny and not args.pretrained_model_name_or_path:
        parser.error("--pretrained_model_name_or_path is required without --tiny")
    return args


if __name__ == "__main__":
    train(parse_args())
