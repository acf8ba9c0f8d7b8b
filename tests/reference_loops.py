"""Hand-written denoising loops that set the LyCORIS mask from the scheduler's own timestep before every call.

This is what SimpleTuner's vendored pipelines do: `compute_timestep_mask(int(t), num_train_timesteps, ...)`
with `t` the loop's `scheduler.timesteps` entry. Each loop reproduces the stock pipeline's math for the
arguments the tests use (CFG, no extras) and starts from the `latents` given, so its output can be
compared with the hooked stock pipeline run on the same `latents`.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask


@contextmanager
def scheduler_mask(t: torch.Tensor, scheduler, max_rank: int, min_rank: int, alpha: float, group_id: int = 0):
    """Set the mask from the scheduler timestep `t` around one denoiser call, as a vendored pipeline does."""
    T = scheduler.config.num_train_timesteps
    set_timestep_mask(compute_timestep_mask(int(t), T, max_rank, min_rank, alpha), group_id)
    try:
        yield
    finally:
        clear_timestep_mask(group_id)


def batched_guidance(scheduler, latents, kw, schedule, predict):
    """Classifier-free guidance as SDXL and SD3 run it: uncond and cond in one batch, one masked call per step.

    `predict(latents_for_both, t)` is the family's denoiser call; it returns the uncond and cond predictions stacked.
    """
    for t in scheduler.timesteps:
        with scheduler_mask(t, scheduler, *schedule):
            uncond, cond = predict(torch.cat([latents] * 2), t).chunk(2)
        pred = uncond + kw["guidance_scale"] * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents


def negative_first(kw, name: str) -> torch.Tensor:
    """The uncond and cond inputs of a batched call: `negative_<name>` stacked over `<name>`."""
    return torch.cat([kw[f"negative_{name}"], kw[name]])


@torch.no_grad()
def sdxl(pipe, kw, latents, schedule):
    scheduler, unet = pipe.scheduler, pipe.unet
    scheduler.set_timesteps(kw["num_inference_steps"])
    scheduler.set_begin_index(0)
    embeds, pooled = negative_first(kw, "prompt_embeds"), negative_first(kw, "pooled_prompt_embeds")
    h, w = kw["height"], kw["width"]
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=embeds.dtype)

    def predict(model_input, t):
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return unet(scheduler.scale_model_input(model_input, t), t, encoder_hidden_states=embeds,
                    added_cond_kwargs=added).sample

    return batched_guidance(scheduler, latents * scheduler.init_noise_sigma, kw, schedule, predict)


@torch.no_grad()
def sd3(pipe, kw, latents, schedule):
    scheduler, transformer = pipe.scheduler, pipe.transformer
    scheduler.set_timesteps(kw["num_inference_steps"])
    embeds, pooled = negative_first(kw, "prompt_embeds"), negative_first(kw, "pooled_prompt_embeds")

    def predict(model_input, t):
        return transformer(hidden_states=model_input, timestep=t.expand(2), encoder_hidden_states=embeds,
                           pooled_projections=pooled).sample

    return batched_guidance(scheduler, latents, kw, schedule, predict)


@torch.no_grad()
def flux(pipe, kw, latents, schedule):
    """True CFG: a cond and an uncond call per step, each with the mask of the step's scheduler timestep."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler, transformer = pipe.scheduler, pipe.transformer
    steps, dtype = kw["num_inference_steps"], latents.dtype
    config = scheduler.config
    mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len,
                         config.base_shift, config.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    side = int(latents.shape[1] ** 0.5)
    # (0, row, column) of each packed latent token, as FluxPipeline numbers them for the rotary embedding
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(side * side, 3).to(dtype)
    text_ids = torch.zeros(kw["prompt_embeds"].shape[1], 3, dtype=dtype)
    guidance = torch.full([1], kw["guidance_scale"], dtype=torch.float32)
    for t in scheduler.timesteps:
        timestep = t.expand(1).to(dtype) / 1000
        common = dict(hidden_states=latents, timestep=timestep, guidance=guidance, txt_ids=text_ids, img_ids=image_ids)
        with scheduler_mask(t, scheduler, *schedule):
            cond = transformer(pooled_projections=kw["pooled_prompt_embeds"],
                               encoder_hidden_states=kw["prompt_embeds"], **common).sample
        with scheduler_mask(t, scheduler, *schedule):
            uncond = transformer(pooled_projections=kw["negative_pooled_prompt_embeds"],
                                 encoder_hidden_states=kw["negative_prompt_embeds"], **common).sample
        pred = uncond + kw["true_cfg_scale"] * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents


@torch.no_grad()
def wan(pipe, kw, latents, schedule):
    """Wan 2.1 / 2.2: expert switch at boundary_ratio, separate cond/uncond calls, optional per-token timesteps."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(kw["num_inference_steps"])
    scheduler.set_begin_index(0)
    boundary = pipe.config.boundary_ratio
    boundary = boundary * scheduler.config.num_train_timesteps if boundary is not None else None
    tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
    for t in scheduler.timesteps:
        high_noise = boundary is None or t >= boundary
        model = pipe.transformer if high_noise else pipe.transformer_2
        scale = kw["guidance_scale"] if high_noise else kw["guidance_scale_2"]
        timestep = t.float().expand(1, tokens) if pipe.config.expand_timesteps else t.expand(1)
        common = dict(hidden_states=latents, timestep=timestep)
        with scheduler_mask(t, scheduler, *schedule):
            cond = model(encoder_hidden_states=kw["prompt_embeds"], **common).sample
        with scheduler_mask(t, scheduler, *schedule):
            uncond = model(encoder_hidden_states=kw["negative_prompt_embeds"], **common).sample
        pred = uncond + scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return latents
