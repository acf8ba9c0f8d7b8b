"""Training-call test tools: tiny denoisers called the way diffusers' DreamBooth scripts call them, and the reference
a per-sample training step is checked against: LyCORIS's own forward, one sample at a time, each with the (1, R)
mask SimpleTuner computes from that sample's own timestep (`compute_timestep_mask(int(t), ...)`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from lycoris import LycorisNetwork, create_lycoris
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask
from torch import nn

import tiny
from devtools.lycoris_build import lycoris_without_gc

RANK = 8
# Distinct ranks at R = 8 (1, 3, 5, 7): one batch of 4 needs four different masks.
TIMESTEPS = (999, 700, 400, 50)


@dataclass
class TrainingCase:
    """A denoiser with a T-LoRA network, a batch of inputs, and how a training script calls it.

    `call(rows, t)` runs the denoiser on the rows `rows` of every batched input with the training timesteps `t`
    (the scheduler's t, one per row), passing them as the script does (SDXL: int64 positionally; Flux: t / 1000).
    """

    denoiser: nn.Module
    network: LycorisNetwork
    call: Callable[[slice, torch.Tensor], torch.Tensor]
    timesteps: torch.Tensor
    batch: int
    sample: torch.Tensor | None = None  # the batched noisy input (reentrant checkpointing needs it to require grad)
    weights: torch.Tensor = field(default=None)  # the loss is (output * weights).sum(): every output element counts

    def loss(self, rows: slice = slice(None), timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.call(rows, self.timesteps[rows] if timesteps is None else timesteps)
        if self.weights is None:
            self.weights = torch.randn(out.shape[1:], generator=torch.Generator().manual_seed(5))
        return (out.float() * self.weights).sum(), out


def trainable(denoiser: nn.Module, network: LycorisNetwork) -> None:
    """The base frozen, the T-LoRA parameters trainable, as diffusers' LoRA scripts set them up."""
    denoiser.requires_grad_(False)
    network.requires_grad_(True)


def tlora_parameters(network: LycorisNetwork) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in network.named_parameters() if p.requires_grad}


def gradients(network: LycorisNetwork) -> dict[str, torch.Tensor]:
    """Every T-LoRA parameter's gradient (zeros where none flowed), then zeroed for the next run."""
    grads = {}
    for name, parameter in tlora_parameters(network).items():
        grads[name] = parameter.grad.clone() if parameter.grad is not None else torch.zeros_like(parameter)
        parameter.grad = None
    return grads


def lycoris_per_sample(case: TrainingCase, min_rank: int = 1, alpha: float = 1.0, masked: bool = True):
    """The reference step: LyCORIS's own forward, one sample at a time with that sample's (1, R) mask (no hooks
    installed), every sample's loss backpropagated. Returns (outputs, gradients). `masked=False`: every rank."""
    outputs = []
    for b in range(case.batch):
        if masked:
            set_timestep_mask(compute_timestep_mask(int(case.timesteps[b]), 1000, RANK, min_rank, alpha))
        try:
            loss, out = case.loss(slice(b, b + 1))
            loss.backward()
        finally:
            clear_timestep_mask()
        outputs.append(out.detach())
    return torch.cat(outputs), gradients(case.network)


def batched_step(case: TrainingCase, timesteps: torch.Tensor | None = None):
    """One training call on the whole batch and its backward: (outputs, gradients)."""
    loss, out = case.loss(timesteps=timesteps)
    loss.backward()
    return out.detach(), gradients(case.network)


# -- a toy denoiser: one layer kind, the inputs it is fed -------------------------------------------------------------
class ToyBlock(nn.Module):
    """Two same-shaped layers with a nonlinearity between them (the first one's gradient flows through the second)."""

    def __init__(self, kind: str, channels: int = 16) -> None:
        super().__init__()
        layer = {"conv": lambda: nn.Conv2d(channels, channels, 1), "linear": lambda: nn.Linear(channels, channels)}
        self.first, self.second = layer[kind](), layer[kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(nn.functional.gelu(self.first(x)))


class ToyDenoiser(nn.Module):
    """`forward(x, timestep)`: a denoiser-shaped toy; enable it with `timestep_fn=read_toy_timestep`."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.block = ToyBlock(kind)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def read_toy_timestep(module, args, kwargs):
    return kwargs["timestep"] if "timestep" in kwargs else args[1]


# input shape of each toy: Linear on (B, C) and (B, N, C), 1×1 Conv2d on (B, C, H, W)
TOY_INPUTS = {"linear_2d": (4, 16), "linear_tokens": (4, 5, 16), "conv_1x1": (4, 16, 3, 3)}


def toy(kind: str, batch: int = 4) -> TrainingCase:
    torch.manual_seed(0)
    denoiser = ToyDenoiser("conv" if kind == "conv_1x1" else "linear")
    LycorisNetwork.apply_preset({"target_module": ["ToyBlock"]})
    with lycoris_without_gc():
        network = create_lycoris(denoiser, 1.0, linear_dim=RANK, linear_alpha=RANK, algo="tlora")
    network.apply_to()
    tiny.perturbed(network, seed=1)
    trainable(denoiser, network)
    x = torch.randn(batch, *TOY_INPUTS[kind][1:], generator=torch.Generator().manual_seed(2))
    return TrainingCase(denoiser, network, lambda rows, t: denoiser(x[rows], t), torch.tensor(TIMESTEPS), batch, x)


# -- tiny SDXL UNet and Flux transformer, called as diffusers' DreamBooth LoRA scripts call them -------------------
def sdxl(batch: int = 4, prompt_embeds: torch.Tensor | None = None) -> TrainingCase:
    """int64 (B,) timesteps, positional: `unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=...)`.
    `prompt_embeds` (batch, 8, 64) replaces the random ones (a textual inversion's trainable embeddings)."""
    unet = tiny.sdxl_unet()
    network = tiny.add_tlora(unet, RANK)
    trainable(unet, network)
    return sdxl_case(unet, network, batch, prompt_embeds)


def sdxl_case(unet: nn.Module, network: LycorisNetwork, batch: int = 4, prompt_embeds: torch.Tensor | None = None
              ) -> TrainingCase:
    """`sdxl`'s inputs and call for a UNet of `tiny.sdxl`'s layout that already holds `network`."""
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(batch, 4, 8, 8, generator=generator)
    embeds = torch.randn(batch, 8, 64, generator=generator)
    embeds = embeds if prompt_embeds is None else prompt_embeds
    added = {"text_embeds": torch.randn(batch, 32, generator=generator),
             "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(batch, 1)}

    def call(rows, t):
        rows_added = {name: value[rows] for name, value in added.items()}
        return unet(noisy[rows], t, embeds[rows], added_cond_kwargs=rows_added).sample

    return TrainingCase(unet, network, call, torch.tensor(TIMESTEPS[:batch]), batch, noisy)


def flux(batch: int = 4) -> TrainingCase:
    """float timesteps, `timestep=timesteps / 1000`, as `train_dreambooth_lora_flux.py` passes them."""
    transformer = tiny.flux_transformer()
    network = tiny.add_tlora(transformer, RANK)
    trainable(transformer, network)
    generator = torch.Generator().manual_seed(4)
    tokens, text = 16, 8
    latents = torch.randn(batch, tokens, 4, generator=generator)
    embeds = torch.randn(batch, text, 32, generator=generator)
    pooled = torch.randn(batch, 32, generator=generator)
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)

    def call(rows, t):
        return transformer(hidden_states=latents[rows], timestep=t / 1000, pooled_projections=pooled[rows],
                           encoder_hidden_states=embeds[rows], txt_ids=torch.zeros(text, 3),
                           img_ids=image_ids.reshape(tokens, 3), return_dict=False)[0]

    # 437.6: not a whole step; its rank is int(t)'s, 437's
    return TrainingCase(transformer, network, call, torch.tensor([999.0, 700.0, 437.6, 50.0])[:batch], batch, latents)


def wan_ti2v(batch: int = 4) -> TrainingCase:
    """Per-token timesteps, (B, tokens), as Wan 2.2 TI2V passes them: the conditioning frame's tokens at 0, the
    sample's own t elsewhere."""
    transformer = tiny.wan_transformer()
    network = tiny.add_tlora(transformer, RANK)
    trainable(transformer, network)
    generator = torch.Generator().manual_seed(6)
    latents = torch.randn(batch, 16, 2, 4, 4, generator=generator)  # 2 frames of 2×2 patches: 8 tokens
    embeds = torch.randn(batch, 8, 32, generator=generator)

    def call(rows, t):
        per_token = t.float()[:, None].repeat(1, 8)
        per_token[:, :4] = 0  # the first (conditioning) frame
        return transformer(hidden_states=latents[rows], timestep=per_token, encoder_hidden_states=embeds[rows],
                           return_dict=False)[0]

    return TrainingCase(transformer, network, call, torch.tensor(TIMESTEPS[:batch]), batch, latents)


DENOISERS = {"sdxl": sdxl, "flux": flux, "wan_ti2v": wan_ti2v}
