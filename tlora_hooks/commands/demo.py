"""`tlora-hooks demo`: the main job on its embedded default, a tiny stock SDXL pipeline with a random T-LoRA, on CPU.

It prints, per denoising step, the scheduler timestep, the noise level, the rank the T-LoRA modules
used, and how far the masked run has drifted from the unmasked one.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
from unittest import mock

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DemoConfig:
    """The embedded default: small enough to run in seconds on a CPU."""

    steps: int = 12
    rank: int = 16
    min_rank: int = 1
    alpha: float = 1.0
    seed: int = 0
    size: int = 64


def build_demo_pipeline(config: DemoConfig):
    """A stock `StableDiffusionXLPipeline` with random weights and a random LyCORIS T-LoRA on its UNet.

    Args:
        config (`DemoConfig`): the rank, seed and latent size to build with.

    Returns:
        The pipeline and the applied LyCORIS network.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from lycoris import LycorisNetwork, create_lycoris

    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=config.size // 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(4, 8), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    LycorisNetwork.apply_preset({"target_module": ["Attention", "FeedForward"]})
    with mock.patch("lycoris.modules.tlora.gc.collect", lambda *args: 0):  # LyCORIS collects once per module
        network = create_lycoris(
            unet, 1.0, linear_dim=config.rank, linear_alpha=config.rank, algo="tlora", warn_on_unmatched=False
        )
    network.apply_to()
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():  # move the adapter away from its zero-delta initialisation
        for module in network.loras:
            module.lambda_layer.mul_(1 + 0.5 * torch.randn(module.lambda_layer.shape, generator=generator))
            module.p_layer.weight.add_(0.1 * torch.randn(module.p_layer.weight.shape, generator=generator))
    return pipe, network


def demo_inputs(config: DemoConfig) -> dict[str, Any]:
    """Seeded random prompt embeddings and latents, so the pipeline needs no text encoders or VAE.

    Args:
        config (`DemoConfig`): the steps, seed and latent size to use.
    """
    import torch

    generator = torch.Generator().manual_seed(config.seed + 1)
    return dict(
        prompt_embeds=torch.randn(1, 77, 64, generator=generator),
        pooled_prompt_embeds=torch.randn(1, 32, generator=generator),
        negative_prompt_embeds=torch.zeros(1, 77, 64),
        negative_pooled_prompt_embeds=torch.zeros(1, 32),
        latents=torch.randn(1, 4, config.size // 8, config.size // 8, generator=generator),
        num_inference_steps=config.steps, guidance_scale=5.0, height=config.size, width=config.size,
        output_type="latent",
    )


def run_with_trace(pipe, inputs: dict[str, Any], on_call: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Run the pipeline; return the latents after every step.

    Args:
        pipe: the pipeline from `build_demo_pipeline`.
        inputs (`dict`): the call's keyword arguments, from `demo_inputs`; its latents are not modified.
        on_call (`Callable[[], None]`, *optional*): called before every UNet forward.
    """
    latents: list[torch.Tensor] = []

    def record(pipeline, step, timestep, tensors):
        latents.append(tensors["latents"].clone())
        return {}

    probe = pipe.unet.register_forward_pre_hook(lambda module, args: on_call()) if on_call else None
    try:
        pipe(**{**inputs, "latents": inputs["latents"].clone()}, callback_on_step_end=record)
    finally:
        if probe is not None:
            probe.remove()
    return latents


def run_demo(config: DemoConfig = DemoConfig()) -> list[dict[str, float]]:
    """Run the demo, print its table, and return its rows.

    Args:
        config (`DemoConfig`, *optional*): the embedded default unless given.

    Returns:
        `list[dict[str, float]]`: per step, its timestep, noise level, sigma, rank and drift from the unmasked run.
    """
    from lycoris.modules.tlora import get_timestep_mask

    from ..api import enable_tlora

    pipe, _ = build_demo_pipeline(config)
    inputs = demo_inputs(config)
    unmasked = run_with_trace(pipe, inputs)

    handle = enable_tlora(pipe, max_rank=config.rank, min_rank=config.min_rank, alpha=config.alpha)
    group = handle.mask_groups["unet"]
    ranks: list[int] = []
    masked = run_with_trace(pipe, inputs, on_call=lambda: ranks.append(int(get_timestep_mask(group).sum())))
    handle.remove()

    scheduler = pipe.scheduler
    T = scheduler.config.num_train_timesteps
    rows = []
    print(f"T-LoRA demo: tiny SDXL UNet, rank {config.rank}, min_rank {config.min_rank}, alpha {config.alpha}, "
          f"{config.steps} Euler steps, CPU, offline")
    print(f"{'step':>4} {'timestep':>9} {'t/T':>6} {'sigma':>8} {'rank':>5}  {'|masked - unmasked| / |unmasked|':>33}")
    for step, (t, sigma, rank, a, b) in enumerate(zip(scheduler.timesteps, scheduler.sigmas, ranks, masked, unmasked)):
        drift = float((a - b).norm() / b.norm())
        rows.append(dict(step=step, timestep=float(t), noise=float(t) / T, sigma=float(sigma), rank=rank, drift=drift))
        print(f"{step:>4} {float(t):>9.1f} {float(t) / T:>6.3f} {float(sigma):>8.3f} {rank:>5}  {drift:>33.4f}")
    print(f"final latents: masked vs unmasked relative difference {rows[-1]['drift']:.4f} "
          "(0 would mean the mask did nothing)")
    return rows


def _quiet_dependencies() -> None:
    """The demo shows its own table; the stock pipelines' deprecation chatter would hide it. LyCORIS sets its
    logger to INFO when imported, so it is imported first and quieted after."""
    from lycoris.logging import logger as lycoris_logger

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    lycoris_logger.setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> None:
    _quiet_dependencies()
    run_demo(DemoConfig(steps=args.steps, rank=args.rank, min_rank=args.min_rank, alpha=args.alpha, seed=args.seed))


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `demo` and its options.

    Args:
        subparsers (`argparse._SubParsersAction`): what `ArgumentParser.add_subparsers` returned.
    """
    parser = subparsers.add_parser("demo", help="run a tiny stock SDXL pipeline with a random T-LoRA, offline")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--min-rank", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=_run)
